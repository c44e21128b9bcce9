"""Parity of the MLX backend with the official reference dumps (float32, tiny checkpoint, MLX CPU)."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, Case, check_encode_batch, get_case, rel_err
from safetensors.numpy import load_file, save_file

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_asr.audio import load_audio  # noqa: E402
from mlx_asr.backends.base import Step  # noqa: E402
from mlx_asr.backends.mlx import MlxBackend  # noqa: E402
from mlx_asr.backends.mlx.llm import Decoder  # noqa: E402
from mlx_asr.checkpoint import LM_HEAD, open_checkpoint  # noqa: E402
from mlx_asr.errors import BackendError, ModelError  # noqa: E402

STOP_IDS = [151645, 151643]
MEL_TOL = 1e-4
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def backend() -> MlxBackend:
    return MlxBackend(open_checkpoint(TINY), "float32", "cpu")


@cache
def _stages(backend: MlxBackend, tag: str) -> dict[str, np.ndarray]:
    """Every intermediate tensor of one case, computed once from the reference mel."""
    tensors = get_case(tag).tensors
    tower = backend.audio_tower
    states = tower.hidden_states(mx.array(tensors["mel"]))
    embeds = tower.project(states[-1])
    prompt = tensors["prompt_ids"].tolist()
    llm = backend.decoder.layer_outputs(backend.embed_prompt(prompt, embeds))
    out = {
        "enc_conv_stem": states[0],
        "enc_layer_0": states[1],
        "enc_out": states[-1],
        "audio_embeds": embeds,
        "llm_layer_0": llm[0],
        "llm_last_hidden": llm[-1],
    }
    result = {k: backend.to_numpy(v) for k, v in out.items()}
    result["logits_step0"] = backend.first_logits(prompt, embeds)
    return result


def _prompt(case: Case) -> list[int]:
    return case.tensors["prompt_ids"].tolist()


def test_log_mel_matches_reference(backend: MlxBackend, case: Case) -> None:
    mel = backend.to_numpy(backend.log_mel(load_audio(case.audio)))
    expected = case.tensors["mel"]
    assert mel.dtype == np.float32 and mel.shape == expected.shape
    assert np.abs(mel - expected).max() <= MEL_TOL


@pytest.mark.parametrize(
    "stage",
    ["enc_conv_stem", "enc_layer_0", "enc_out", "audio_embeds", "llm_layer_0", "llm_last_hidden", "logits_step0"],
)
def test_stage_matches_reference(backend: MlxBackend, case: Case, stage: str) -> None:
    actual = _stages(backend, case.tag)[stage]
    assert rel_err(actual, case.tensors[stage]) <= REL_TOL


def test_generated_ids_from_audio(backend: MlxBackend, case: Case) -> None:
    embeds = backend.encode(backend.log_mel(load_audio(case.audio)))
    steps = list(backend.generate(_prompt(case), embeds, 40, STOP_IDS, min_new_tokens=0))
    assert [s.token for s in steps] == case.generated_ids
    assert all(isinstance(s, Step) and s.logprob <= 0.0 for s in steps)


def test_encode_accepts_numpy_mel(backend: MlxBackend) -> None:
    case = get_case("short_2s_wav")
    embeds = backend.to_numpy(backend.encode(case.tensors["mel"]))
    assert rel_err(embeds, case.tensors["audio_embeds"]) <= REL_TOL


@pytest.mark.parametrize("budget", [4096, 150])
def test_encode_batch_equals_one_by_one(backend: MlxBackend, budget: int, monkeypatch) -> None:
    """Recordings encoded together (shared matrix products, a token budget per group) = one by one."""
    monkeypatch.setattr("mlx_asr.backends.mlx.encoder.ENCODE_BATCH_TOKENS", budget)
    check_encode_batch(backend)


def test_float_matrices_are_column_major_on_cpu(backend: MlxBackend) -> None:
    """On the CPU device every float32 Linear/Embedding weight keeps its [out, in] shape and values but is
    stored transposed, so BLAS gets an untransposed right-hand matrix (see ``store_column_major``)."""
    thinker = backend.model.thinker
    layer = thinker.model.layers[0]
    for weight in (layer.self_attn.qkv_proj.weight, layer.mlp.down_proj.weight, thinker.model.embed_tokens.weight,
                   thinker.audio_tower.layers[0].fc1.weight, thinker.audio_tower.conv_out.weight):
        out_dim, _ = weight.shape
        item = weight.itemsize
        assert memoryview(weight).strides == (item, item * out_dim)
    raw = load_file(str(TINY / "model.safetensors"))
    table = raw["thinker.model.embed_tokens.weight"]
    assert np.array_equal(np.array(thinker.model.embed_tokens.weight), table)
    ids = mx.array([0, 7, table.shape[0] - 1])
    assert np.array_equal(np.array(thinker.model.embed_tokens(ids)), table[[0, 7, table.shape[0] - 1]])


def test_first_logprob_is_log_softmax(backend: MlxBackend) -> None:
    case = get_case("short_2s_wav")
    logits = case.tensors["logits_step0"].astype(np.float64)
    top = int(np.argmax(logits))
    expected = logits[top] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    first = next(iter(backend.generate(_prompt(case), backend.encode(case.tensors["mel"]), 1, STOP_IDS)))
    assert first.token == top
    assert abs(first.logprob - expected) <= 1e-4


def test_stop_token_ends_generation(backend: MlxBackend) -> None:
    case = get_case("short_2s_wav")
    embeds = backend.encode(case.tensors["mel"])
    stop = case.generated_ids[2]
    steps = list(backend.generate(_prompt(case), embeds, 40, [stop]))
    assert [s.token for s in steps] == case.generated_ids[:3]


def test_min_new_tokens_suppresses_stop_ids(backend: MlxBackend) -> None:
    case = get_case("short_2s_wav")
    embeds = backend.encode(case.tensors["mel"])
    first, runner_up = (int(t) for t in case.tensors["topk_ids"][0, :2])
    steps = list(backend.generate(_prompt(case), embeds, 3, [first], min_new_tokens=1))
    assert steps[0].token == runner_up
    assert len(steps) == 3 or steps[-1].token == first


def test_zero_new_tokens_yields_nothing(backend: MlxBackend) -> None:
    case = get_case("short_0p3s_wav")
    assert list(backend.generate(_prompt(case), backend.encode(case.tensors["mel"]), 0, STOP_IDS)) == []


def test_audio_placeholder_count_must_match(backend: MlxBackend) -> None:
    case = get_case("short_0p3s_wav")
    embeds = backend.encode(case.tensors["mel"])
    with pytest.raises(ValueError, match="audio placeholder"):
        backend.first_logits(_prompt(case), embeds[:-1])


def test_chunked_prefill_matches(backend: MlxBackend) -> None:
    case = get_case("medium_10s_wav")
    embeds = backend.embed_prompt(_prompt(case), backend.encode(case.tensors["mel"]))
    decoder = Decoder(backend.decoder.model, backend.decoder.head, prefill_step=32)
    logits = backend.to_numpy(decoder.first_logits(embeds))
    assert rel_err(logits, case.tensors["logits_step0"]) <= REL_TOL
    assert [s.token for s in decoder.generate(embeds, 10, STOP_IDS)] == case.generated_ids[:10]


def test_bfloat16_compute_is_close() -> None:
    case = get_case("short_2s_wav")
    bf16 = MlxBackend(open_checkpoint(TINY), "bfloat16", "cpu")
    assert bf16.model.thinker.model.embed_tokens.weight.dtype == mx.bfloat16
    embeds = bf16.encode(bf16.log_mel(load_audio(case.audio)))
    assert embeds.dtype == mx.bfloat16
    logits = bf16.first_logits(_prompt(case), embeds)
    expected = case.tensors["logits_step0"]
    assert logits.dtype == np.float32
    cosine = float(logits @ expected / (np.linalg.norm(logits) * np.linalg.norm(expected)))
    assert cosine >= 0.99, f"cosine {cosine:.5f}, rel err {rel_err(logits, expected):.3g}"
    steps = list(bf16.generate(_prompt(case), embeds, 5, STOP_IDS))
    assert len(steps) == 5 and all(0 <= s.token < logits.shape[0] for s in steps)


# Checkpoint layouts -------------------------------------------------------------------------------


def _write_copy(folder: Path, tensors: dict[str, np.ndarray], config_edit: dict | None = None) -> Path:
    """A copy of the tiny checkpoint in ``folder`` with other tensors (and config text_config edits)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
    config["thinker_config"]["text_config"].update(config_edit or {})
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _tiny_tensors() -> dict[str, np.ndarray]:
    return load_file(str(TINY / "model.safetensors"))


def _first_logits(folder: Path, case: Case) -> np.ndarray:
    backend = MlxBackend(open_checkpoint(folder), "float32", "cpu")
    return backend.first_logits(_prompt(case), backend.encode(case.tensors["mel"]))


def test_stored_lm_head_is_ignored_when_tied(tmp_path: Path) -> None:
    case = get_case("short_2s_wav")
    tensors = _tiny_tensors()
    tensors[LM_HEAD] = np.zeros_like(tensors["thinker.model.embed_tokens.weight"])
    folder = _write_copy(tmp_path / "head", tensors)
    assert open_checkpoint(folder).has_lm_head
    assert rel_err(_first_logits(folder, case), case.tensors["logits_step0"]) <= REL_TOL


def test_untied_checkpoint_uses_lm_head(tmp_path: Path) -> None:
    case = get_case("short_2s_wav")
    tensors = _tiny_tensors()
    tensors[LM_HEAD] = 2.0 * tensors["thinker.model.embed_tokens.weight"]
    folder = _write_copy(tmp_path / "untied", tensors, {"tie_word_embeddings": False})
    assert rel_err(_first_logits(folder, case), 2.0 * case.tensors["logits_step0"]) <= REL_TOL


def test_untied_checkpoint_without_lm_head_fails(tmp_path: Path) -> None:
    folder = _write_copy(tmp_path / "nohead", _tiny_tensors(), {"tie_word_embeddings": False})
    with pytest.raises(ModelError, match="lm_head"):
        MlxBackend(open_checkpoint(folder), "float32", "cpu")


def test_sharded_checkpoint(tmp_path: Path) -> None:
    case = get_case("short_2s_wav")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder / "config.json")
    tensors = _tiny_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")
    assert len(open_checkpoint(folder).files) == 2
    assert rel_err(_first_logits(folder, case), case.tensors["logits_step0"]) <= REL_TOL


def test_single_linear_projector_without_ln_post(tmp_path: Path) -> None:
    case = get_case("short_2s_wav")
    tensors = _tiny_tensors()
    prefix = "thinker.audio_tower."
    for name in ("ln_post.weight", "ln_post.bias", "proj1.weight", "proj1.bias"):
        del tensors[prefix + name]
    for kind in ("weight", "bias"):
        tensors[f"{prefix}proj1.{kind}"] = tensors.pop(f"{prefix}proj2.{kind}")
    checkpoint = open_checkpoint(_write_copy(tmp_path / "proj", tensors))
    assert checkpoint.projector_layers == 1 and not checkpoint.has_ln_post
    backend = MlxBackend(checkpoint, "float32", "cpu")
    embeds = backend.to_numpy(backend.encode(case.tensors["mel"]))
    expected = case.tensors["enc_out"] @ tensors[f"{prefix}proj1.weight"].T + tensors[f"{prefix}proj1.bias"]
    assert rel_err(embeds, expected) <= REL_TOL


# Arguments ----------------------------------------------------------------------------------------


def test_unknown_dtype_device_and_options_are_rejected() -> None:
    checkpoint = open_checkpoint(TINY)
    with pytest.raises(BackendError, match="dtype"):
        MlxBackend(checkpoint, "float64", "cpu")
    with pytest.raises(BackendError, match="device"):
        MlxBackend(checkpoint, "float32", "tpu")
    with pytest.raises(BackendError, match="quantize"):
        MlxBackend(checkpoint, "float32", "cpu", quantize=3)
    with pytest.raises(BackendError, match="threads"):
        MlxBackend(checkpoint, "float32", "cpu", threads=2)


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal is available here")
def test_metal_unavailable_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match="Metal"):
        MlxBackend(open_checkpoint(TINY), "float32", "metal")
