"""Config parsing, checkpoint validation (every way a folder can be wrong) and long-audio chunking."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY

from mlx_asr.checkpoint import open_checkpoint
from mlx_asr.chunking import split_audio
from mlx_asr.config import batch_runs, encoder_windows, load_config, num_audio_tokens, window_runs
from mlx_asr.errors import ModelError
from mlx_asr.info import describe, format_description


def _copy_tiny(dst):
    shutil.copytree(TINY, dst)
    return dst


def test_config_values_come_from_the_file():
    cfg = load_config(TINY)
    assert (cfg.audio.n_window, cfg.audio.n_window_infer, cfg.audio.d_model) == (50, 800, 64)
    assert cfg.audio.chunk_frames == 100 and cfg.audio.window_chunks == 8 and cfg.audio.freq_after_conv == 16
    assert cfg.text.rope_theta == 1e6 and cfg.text.head_dim == 128 and cfg.text.tie_word_embeddings
    assert (cfg.audio_token_id, cfg.audio_start_token_id, cfg.audio_end_token_id) == (151676, 151669, 151670)


@pytest.mark.parametrize(
    "frames, tokens, windows",
    [(30, 4, [0, 4]), (100, 13, [0, 13]), (208, 27, [0, 27]), (1013, 132, [0, 104, 132]),
     (6000, 780, [0, 104, 208, 312, 416, 520, 624, 728, 780]), (800, 104, [0, 104]), (801, 105, [0, 104, 105])],
)
def test_audio_tokens_and_windows(frames, tokens, windows):
    assert num_audio_tokens(frames) == tokens
    assert encoder_windows(frames, load_config(TINY).audio) == windows


def test_window_runs_group_equal_windows():
    assert window_runs([0, 104, 208, 312, 332]) == [(0, 3, 104), (312, 1, 20)]
    assert window_runs([0, 27], offset=50) == [(50, 1, 27)]
    assert window_runs([0]) == []


def test_batch_runs_group_recordings_up_to_a_token_budget():
    audio = load_config(TINY).audio
    # 132, 27, 104 and 780 tokens; budget 260: [132 + 27], [104], then 780 alone (longer than the budget)
    groups = batch_runs([1013, 208, 800, 6000], audio, 260)
    assert [members for members, _ in groups] == [[0, 1], [2], [3]]
    assert groups[0][1] == [(0, 1, 104), (104, 1, 28), (132, 1, 27)]
    assert groups[1][1] == [(0, 1, 104)]
    assert groups[2][1] == [(0, 7, 104), (728, 1, 52)]
    assert batch_runs([], audio, 260) == []


def test_checkpoint_description():
    ckpt = open_checkpoint(TINY)
    assert ckpt.projector_layers == 2 and ckpt.has_ln_post and not ckpt.has_lm_head and not ckpt.is_quantized
    desc = describe(TINY)
    assert desc["llm"]["layers"] == 2 and "English" in desc["languages"]
    assert "tied to embed_tokens" in format_description(desc)


def _edit_config(folder, edit):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: shutil.rmtree(d), "not found"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{oops"), "unreadable config.json"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda d: _edit_config(d, lambda c: c.update(model_type="whisper")), "not a Qwen3-ASR model"),
        (lambda d: _edit_config(d, lambda c: c["thinker_config"].pop("audio_config")), "audio_config"),
        (lambda d: _edit_config(d, lambda c: c["thinker_config"]["audio_config"].pop("n_window")), "n_window"),
        (lambda d: _edit_config(d, lambda c: c["thinker_config"]["text_config"].pop("rope_theta")), "rope_theta"),
        (lambda d: _edit_config(d, lambda c: c["thinker_config"].pop("audio_token_id")), "audio_token_id"),
        (lambda d: _edit_config(d, lambda c: c["thinker_config"]["audio_config"].update(output_dim=7)),
         "output_dim"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda d: _truncate(d / "model.safetensors", 1000), "truncated"),
        (lambda d: _truncate(d / "model.safetensors", 4), "truncated"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}"),
         "not a readable safetensors"),
        (lambda d: _edit_config(d, lambda c: c["thinker_config"]["text_config"].update(num_hidden_layers=3)),
         "layers.2.self_attn.q_proj"),
    ],
    ids=["no-folder", "no-config", "bad-json", "not-object", "wrong-type", "no-audio-config", "no-n-window",
         "no-rope-theta", "no-token-id", "dim-mismatch", "no-weights", "truncated", "tiny-file", "bad-header",
         "missing-layer"],
)
def test_broken_folders_raise_model_error(tmp_path, breakage, message):
    folder = _copy_tiny(tmp_path / "model")
    breakage(folder)
    with pytest.raises(ModelError, match=message):
        open_checkpoint(folder)


def test_file_instead_of_folder(tmp_path):
    with pytest.raises(ModelError, match="is a file"):
        open_checkpoint(TINY / "config.json")


def test_sharded_index_with_missing_shard(tmp_path):
    folder = _copy_tiny(tmp_path / "model")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="missing weight shard"):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ModelError, match="unreadable shard index"):
        open_checkpoint(folder)


def _truncate(path, size):
    data = path.read_bytes()[:size]
    path.write_bytes(data)


def test_short_audio_is_one_unpadded_piece():
    wav = np.ones(16000 * 3, dtype=np.float32)
    pieces = split_audio(wav, max_seconds=10)
    assert len(pieces) == 1 and pieces[0].samples is not None and pieces[0].samples.shape == wav.shape


def test_long_audio_is_cut_in_the_quietest_place():
    rng = np.random.default_rng(0)
    wav = (0.5 * rng.standard_normal(16000 * 25)).astype(np.float32)
    wav[16000 * 8 : 16000 * 8 + 4000] = 0.0  # a quiet gap 2 s before the 10 s target
    wav[16000 * 18 : 16000 * 18 + 4000] = 0.0
    pieces = split_audio(wav, max_seconds=10)
    cuts = [round(p.offset * 16000) for p in pieces]
    assert 16000 * 8 <= cuts[1] < 16000 * 8 + 4000
    assert np.array_equal(np.concatenate([p.samples for p in pieces]), wav)
    assert all(p.samples.shape[0] <= 16000 * 10 for p in pieces)


def test_tiny_tail_is_padded_to_half_a_second():
    rng = np.random.default_rng(1)
    wav = (0.5 * rng.standard_normal(16000 * 6)).astype(np.float32)
    wav[int(16000 * 5.8) : int(16000 * 5.9)] = 0.0  # the quietest place leaves a 0.1-0.2 s tail
    pieces = split_audio(wav, max_seconds=5)
    assert len(pieces) == 2
    tail = wav[round(pieces[1].offset * 16000) :]
    assert 1600 <= tail.shape[0] < 8000
    assert pieces[1].samples.shape[0] == 8000
    assert np.array_equal(pieces[1].samples[: tail.shape[0]], tail) and not pieces[1].samples[tail.shape[0] :].any()
