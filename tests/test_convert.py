"""``mlx-asr convert``: converted folders (float and 4/8-bit), their accuracy, and the MLX decode step."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import CASES, TINY, get_case, rel_err
from safetensors.numpy import load_file, save_file

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx_asr import AsrPipeline  # noqa: E402
from mlx_asr import convert as convert_module  # noqa: E402
from mlx_asr.audio import load_audio  # noqa: E402
from mlx_asr.backends.mlx import MlxBackend  # noqa: E402
from mlx_asr.backends.mlx import llm as llm_module  # noqa: E402
from mlx_asr.checkpoint import LM_HEAD, open_checkpoint  # noqa: E402
from mlx_asr.convert import convert  # noqa: E402
from mlx_asr.errors import BackendError, ModelError  # noqa: E402
from mlx_asr.quantize import QuantPolicy  # noqa: E402
from mlx_asr.tokenizer import QwenTokenizer  # noqa: E402

STOP_IDS = [151645, 151643]
NEAR_TIE = 0.25  # reference top-1/top-2 logit margin (logits ~50 here) below which 8-bit may flip a token


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@cache
def _converted(root: str, name: str, dtype: str, bits: int | None, group_size: int = 32) -> Path:
    policy = QuantPolicy.create(bits, group_size) if bits else None
    folder = Path(root) / name
    convert(TINY, folder, dtype=dtype, policy=policy, progress=False)
    return folder


def _f32(work: Path) -> Path:
    return _converted(str(work), "f32", "float32", None)


def _q8(work: Path) -> Path:
    return _converted(str(work), "q8", "float32", 8)


def _q4(work: Path) -> Path:
    return _converted(str(work), "q4", "float32", 4)


@cache
def _backend(folder: Path, dtype: str = "float32") -> MlxBackend:
    return MlxBackend(open_checkpoint(folder), dtype, "cpu")


def _prompt(tag: str) -> list[int]:
    return get_case(tag).tensors["prompt_ids"].tolist()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# The converted folder ------------------------------------------------------------------------------


def test_float_conversion_is_exact_and_complete(work: Path) -> None:
    folder = _f32(work)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "README.md",
            "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"} <= names
    checkpoint = open_checkpoint(folder)
    assert checkpoint.format == "mlx" and open_checkpoint(TINY).format == "official"
    assert not checkpoint.is_quantized and checkpoint.config.dtype == "float32"
    assert load_file(str(folder / "model.safetensors")).keys() == load_file(str(TINY / "model.safetensors")).keys()
    backend = _backend(folder)
    case = get_case("short_2s_wav")
    embeds = backend.encode(backend.log_mel(load_audio(case.audio)))
    assert rel_err(backend.first_logits(_prompt(case.tag), embeds), case.tensors["logits_step0"]) <= 1e-4
    assert [s.token for s in backend.generate(_prompt(case.tag), embeds, 40, STOP_IDS)] == case.generated_ids


def test_generated_tokenizer_json_matches_the_slow_files(work: Path) -> None:
    from tokenizers import Tokenizer

    generated = Tokenizer.from_file(str(_f32(work) / "tokenizer.json"))
    ours = QwenTokenizer.from_dir(TINY)
    text = "<|im_start|>system\nNames: Zoë, 東京, naïve café <asr_text> 12345<|im_end|>"
    assert generated.encode(text, add_special_tokens=False).ids == ours.encode(text)
    ids = get_case("short_2s_wav").generated_ids
    assert generated.decode(ids) == ours.decode(ids)


def test_bfloat16_conversion_halves_the_weights(work: Path) -> None:
    folder = _converted(str(work), "bf16", "bfloat16", None)
    size = (folder / "model.safetensors").stat().st_size
    assert size < 0.51 * (TINY / "model.safetensors").stat().st_size
    assert open_checkpoint(folder).config.dtype == "bfloat16"
    assert json.loads((folder / "config.json").read_text())["thinker_config"]["dtype"] == "bfloat16"


def test_tied_lm_head_is_dropped(work: Path) -> None:
    source = work / "with_head"
    shutil.copytree(TINY, source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors[LM_HEAD] = tensors["thinker.model.embed_tokens.weight"]
    save_file(tensors, str(source / "model.safetensors"))
    result = convert(source, work / "no_head", dtype="float32", progress=False)
    assert result.dropped == [LM_HEAD]
    assert LM_HEAD not in open_checkpoint(work / "no_head").tensor_names


def test_conversion_is_deterministic_and_block_size_independent(work: Path, monkeypatch) -> None:
    policy = QuantPolicy.create(4, 32)
    convert(TINY, work / "a" / "m", dtype="bfloat16", policy=policy, progress=False)
    monkeypatch.setattr(convert_module, "BLOCK_ELEMENTS", 1000)  # many row blocks per tensor
    convert(TINY, work / "b" / "m", dtype="bfloat16", policy=policy, progress=False)
    assert _files(work / "a" / "m") == _files(work / "b" / "m")


def test_sharded_output_loads(work: Path) -> None:
    folder = work / "sharded"
    convert(TINY, folder, dtype="float32", policy=QuantPolicy.create(8, 32), progress=False, shard_bytes=1_500_000)
    checkpoint = open_checkpoint(folder)
    assert len(checkpoint.files) > 2 and (folder / "model.safetensors.index.json").is_file()
    case = get_case("short_0p3s_wav")
    mel = case.tensors["mel"]
    sharded, single = MlxBackend(checkpoint, "float32", "cpu"), _backend(_q8(work))
    expected = single.first_logits(_prompt(case.tag), single.encode(mel))
    assert np.array_equal(sharded.first_logits(_prompt(case.tag), sharded.encode(mel)), expected)


def test_quantized_config_records_every_choice(work: Path) -> None:
    folder = _q4(work)
    config = json.loads((folder / "config.json").read_text())
    block = config["quantization"]
    assert (block["bits"], block["group_size"], block["mode"]) == (4, 32, "affine")
    audio_8 = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert block["thinker.audio_tower.layers.0.fc1"] == audio_8 and block["thinker.audio_tower.conv_out"] == audio_8
    assert block["thinker.model.embed_tokens"] == audio_8
    assert "thinker.model.layers.0.mlp.down_proj" not in block  # at the default (4 bit)
    info = config["mlx_asr"]
    assert info["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine", "audio_bits": 8,
                                    "embed_bits": 8, "head_bits": 8}
    assert "tied" in info["policy"]["lm_head"] and info["source"] == "tiny"
    card = (folder / "README.md").read_text()
    assert "4-bit, group 32" in card and "8-bit, group 32" in card and "`tiny`" in card
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["thinker.model.layers.0.mlp.down_proj.weight"].dtype == np.uint32
    assert tensors["thinker.audio_tower.conv2d2.weight"].dtype == np.float32  # convolutions stay float
    assert "thinker.audio_tower.layers.0.fc1.bias" in tensors and "thinker.model.norm.weight" in tensors


def test_quantized_modules_load_as_quantized_layers(work: Path) -> None:
    thinker = _backend(_q4(work)).model.thinker
    layer = thinker.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, nn.QuantizedLinear) and layer.self_attn.qkv_proj.bits == 4
    assert isinstance(layer.mlp.gate_up_proj, nn.QuantizedLinear) and layer.mlp.down_proj.bits == 4
    assert isinstance(thinker.model.embed_tokens, nn.QuantizedEmbedding) and thinker.model.embed_tokens.bits == 8
    assert thinker.audio_tower.layers[0].fc1.bits == 8 and thinker.audio_tower.proj2.bits == 8
    assert isinstance(thinker.audio_tower.conv2d1, nn.Conv2d)


def test_group_size_that_does_not_divide_stays_float(work: Path) -> None:
    result = convert(TINY, work / "g64", dtype="float32", policy=QuantPolicy.create(8, 64), progress=False)
    block = json.loads((work / "g64" / "config.json").read_text())["quantization"]
    # hidden size 32: q/k/v/gate/up (and the embedding) cannot use groups of 64
    assert block["thinker.model.layers.0.self_attn.q_proj"] is False and block["thinker.model.embed_tokens"] is False
    assert "thinker.model.layers.0.self_attn.o_proj" not in block  # 512 inputs: quantized at the default
    assert "thinker.model.layers.0.self_attn.q_proj" in result.float_modules
    backend = MlxBackend(open_checkpoint(work / "g64"), "float32", "cpu")
    assert isinstance(backend.model.thinker.model.layers[0].self_attn.o_proj, nn.QuantizedLinear)
    assert type(backend.model.thinker.model.layers[0].self_attn.qkv_proj) is nn.Linear


# Accuracy against the official float32 reference ---------------------------------------------------


@cache
def _accuracy(folder: Path, tag: str) -> tuple[float, list[int], list[int]]:
    """(first-step cosine, free-running tokens, teacher-forced argmax tokens) of one clip."""
    backend = _backend(folder)
    case = get_case(tag)
    prompt, reference = _prompt(tag), case.generated_ids
    embeds = backend.encode(backend.log_mel(load_audio(case.audio)))
    cosine = _cosine(backend.first_logits(prompt, embeds), case.tensors["logits_step0"])
    tokens = [s.token for s in backend.generate(prompt, embeds, len(reference), STOP_IDS)]
    full = backend.embed_prompt(prompt + reference[:-1], embeds)
    hidden = backend.decoder.model(input_embeddings=full[None])[0, len(prompt) - 1 :]
    forced = np.array(mx.argmax(backend.decoder.logits(hidden), axis=-1)).tolist()
    return cosine, tokens, forced


@pytest.mark.parametrize("tag", CASES)
def test_8bit_matches_float32(work: Path, tag: str) -> None:
    """Cosine >= 0.999; tokens identical up to the first near-tie of the reference, every clear step right."""
    cosine, tokens, forced = _accuracy(_q8(work), tag)
    case = get_case(tag)
    reference, margins = case.generated_ids, case.meta["step_top1_top2_margin"]
    assert cosine >= 0.999
    clear = [i for i, m in enumerate(margins) if m >= NEAR_TIE]
    assert [forced[i] for i in clear] == [reference[i] for i in clear]
    diverge = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), None)
    assert diverge is None or margins[diverge] < NEAR_TIE, f"diverged at step {diverge} (margin {margins[diverge]})"


def test_8bit_tokens_identical_on_most_clips(work: Path) -> None:
    identical = [tag for tag in CASES if _accuracy(_q8(work), tag)[1] == get_case(tag).generated_ids]
    assert len(identical) >= 7, identical


@pytest.mark.parametrize("tag", CASES)
def test_4bit_is_close(work: Path, tag: str) -> None:
    cosine, tokens, forced = _accuracy(_q4(work), tag)
    reference = get_case(tag).generated_ids
    assert cosine >= 0.97
    assert tokens[0] == reference[0]
    assert sum(a == b for a, b in zip(forced, reference, strict=True)) >= 0.6 * len(reference)


def test_8bit_embeddings_cost_no_accuracy(work: Path) -> None:
    """The default 8-bit embedding / tied head against a float one, all else 8-bit (the default's basis)."""
    folder = work / "q8_float_embed"
    convert(TINY, folder, dtype="float32", policy=QuantPolicy.create(8, 32, embed_bits="none"), progress=False)
    def forced_right(model: Path) -> int:
        return sum(a == b for tag in CASES for a, b in zip(_accuracy(model, tag)[2], get_case(tag).generated_ids,
                                                             strict=True))

    for tag in CASES:
        assert _accuracy(_q8(work), tag)[0] >= 0.999 and _accuracy(folder, tag)[0] >= 0.999
    assert forced_right(_q8(work)) >= forced_right(folder) - 1


# Loading: pipeline, torch, on-the-fly quantization ------------------------------------------------


def test_pipeline_detects_converted_folders(work: Path) -> None:
    pipe = AsrPipeline.from_pretrained(_q8(work))  # no backend given: a quantized folder needs MLX
    assert pipe.backend.name == "mlx" and pipe.checkpoint.format == "mlx" and pipe.backend.dtype == "float32"
    case = get_case("medium_10s_wav")
    assert pipe.transcribe_detailed(case.audio, max_new_tokens=5).tokens == case.generated_ids[:5]


def test_torch_loads_float_folders_and_rejects_quantized(work: Path) -> None:
    pytest.importorskip("torch")
    case = get_case("medium_10s_wav")
    folder = _converted(str(work), "bf16", "bfloat16", None)
    torch_pipe = AsrPipeline.from_pretrained(folder, backend="torch", dtype="float32")
    mlx_pipe = AsrPipeline.from_pretrained(folder, backend="mlx", dtype="float32")
    tokens = torch_pipe.transcribe_detailed(case.audio, max_new_tokens=12).tokens
    assert tokens == mlx_pipe.transcribe_detailed(case.audio, max_new_tokens=12).tokens
    assert tokens[:2] == case.generated_ids[:2]  # bfloat16 weights: near ties further on may flip
    with pytest.raises(BackendError, match="MLX-quantized"):
        AsrPipeline.from_pretrained(_q4(work), backend="torch")


def test_quantize_at_load_equals_the_converted_folder(work: Path) -> None:
    case = get_case("short_2s_wav")
    live = MlxBackend(open_checkpoint(TINY), "float32", "cpu", quantize=QuantPolicy.create(8, 32))
    stored = _backend(_q8(work))
    mel = case.tensors["mel"]
    expected = stored.first_logits(_prompt(case.tag), stored.encode(mel))
    assert np.array_equal(live.first_logits(_prompt(case.tag), live.encode(mel)), expected)
    with pytest.raises(BackendError, match="already quantized"):
        MlxBackend(open_checkpoint(_q8(work)), "float32", "cpu", quantize=8)


# Refusals -------------------------------------------------------------------------------------------


def test_existing_output_needs_force(work: Path) -> None:
    folder = work / "exists"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(ModelError, match="--force"):
        convert(TINY, folder, progress=False)
    assert (folder / "keep.txt").exists()
    convert(TINY, folder, progress=False, force=True)
    assert not (folder / "keep.txt").exists() and open_checkpoint(folder).format == "mlx"
    assert not any(p.name.startswith(".") for p in work.iterdir())  # no partial folder left behind


def test_force_never_replaces_the_source(work: Path) -> None:
    source = work / "src_copy"
    shutil.copytree(TINY, source)
    with pytest.raises(ModelError, match="source"):
        convert(source, source, force=True, progress=False)
    assert open_checkpoint(source).format == "official"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "whisper"})), "not a Qwen3-ASR"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    ],
)
def test_not_a_qwen3_asr_folder(work: Path, breakage, message: str) -> None:
    source = work / f"broken_{message.split()[-1]}"
    shutil.copytree(TINY, source)
    breakage(source)
    with pytest.raises(ModelError, match=message):
        convert(source, work / "never", progress=False)
    assert not (work / "never").exists()


def test_quantized_source_and_bad_settings_are_refused(work: Path) -> None:
    with pytest.raises(ModelError, match="already quantized"):
        convert(_q8(work), work / "again", progress=False)
    with pytest.raises(ModelError, match="dtype"):
        convert(TINY, work / "again", dtype="float64", progress=False)
    with pytest.raises(ModelError, match="bits"):
        QuantPolicy.create(3)
    with pytest.raises(ModelError, match="group size"):
        QuantPolicy.create(4, 48)
    with pytest.raises(ModelError, match="audio bits"):
        QuantPolicy.create(4, audio_bits="2")


def test_cli_convert_prints_the_policy(work: Path) -> None:
    from typer.testing import CliRunner

    from mlx_asr.cli import app

    out = work / "cli"
    args = ["convert", str(TINY), "-o", str(out), "--quantize", "4", "--group-size", "32", "--embed-bits", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "llm_linear" in result.output and "4-bit, group 32" in result.output
    assert "embed_tokens                        not quantized" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--force" in again.output


# The MLX decode step ----------------------------------------------------------------------------


def test_fused_quantized_projection_is_exact() -> None:
    parts = [nn.QuantizedLinear(64, n, bias=False, group_size=32, bits=4) for n in (96, 32, 32)]
    fused = llm_module.fuse_linears(parts)
    x = mx.random.normal((1, 3, 64))
    assert np.array_equal(np.array(fused(x)), np.array(mx.concatenate([p(x) for p in parts], axis=-1)))
    mixed = [parts[0], nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=8)]
    assert llm_module.fuse_linears(mixed) is None


@pytest.mark.parametrize("pipelined", [False, True])
def test_decode_modes_and_cache_growth_match_the_reference(monkeypatch, pipelined: bool) -> None:
    monkeypatch.setattr(llm_module, "CACHE_STEP", 16)  # the cache grows (and the step is retraced) twice
    backend = MlxBackend(open_checkpoint(TINY), "float32", "cpu")
    decoder = llm_module.Decoder(backend.decoder.model, backend.decoder.head, pipelined=pipelined)
    case = get_case("short_2s_wav_context")
    embeds = backend.embed_prompt(_prompt(case.tag), backend.encode(case.tensors["mel"]))
    steps = list(decoder.generate(embeds, 40, STOP_IDS))
    assert [s.token for s in steps] == case.generated_ids
    step0 = case.tensors["logits_step0"].astype(np.float64)
    assert abs(steps[0].logprob + np.log(np.exp(step0 - step0.max()).sum())) <= 1e-4
