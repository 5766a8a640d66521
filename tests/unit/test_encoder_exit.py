"""Encoder early exit: heads, calibration, and a runtime that honours exits item by item."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.encoder_common import ENCODER_META, batch_arrays
from tasks.encoder_exit import (NEVER_EXIT, RESULT_FILE, EncoderEarlyExitConfig, calibrate, check_exit_layers, early_exit_encoder,
                                fit_heads, head_embeddings, simulate_exits)
from tasks.encoder_runtime import OnnxEarlyExitEncoder, load_encoder
from tasks.errors import ConfigError
from tests.tiny import CORPUS, make_tiny_encoder

# Items of different lengths, so exits and padding interact.
TEXTS = [" ".join(CORPUS[i % 5:i % 5 + 1 + i % 3]) for i in range(24)] + ["Rain.", "Shares rose."]
CFG = EncoderEarlyExitConfig(fit_items=64, calib_items=32, threads=1)


@pytest.fixture(scope="module")
def strong(tmp_path_factory):
    """A tiny 4-layer encoder whose layers really change its embeddings (large random weights)."""
    import torch
    from transformers import AutoModel

    folder = make_tiny_encoder(tmp_path_factory.mktemp("enc") / "bert", layers=4)
    model = AutoModel.from_pretrained(folder)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def exported(strong, tmp_path_factory):
    out = tmp_path_factory.mktemp("ee") / "export"
    result = early_exit_encoder(CFG, strong, out, TEXTS * 3, TEXTS)
    return out, result


def _per_layer(folder, texts):
    """Every layer's exit embedding from the exported graphs, all items run to full depth."""
    enc = OnnxEarlyExitEncoder(folder, threads=1)
    f = batch_arrays(enc.tokenizer, texts)
    hidden = enc.embed_session.run(None, {"input_ids": f["input_ids"], "token_type_ids": f["token_type_ids"]})[0]
    embs = []
    for sess in enc.layer_sessions:
        hidden, e = sess.run(None, {"hidden_states": hidden, "attention_mask": f["attention_mask"]})
        embs.append(e)
    return embs, f


def test_early_exit_encoder_writes_segments_and_metadata_when_run(exported):
    out, r = exported
    meta = json.loads((out / ENCODER_META).read_text())
    assert meta["format"] == "trimflow-encoder-early-exit/1"
    assert meta["exit_layers"] == [2, 3] == r["exit_layers"]  # 4 layers: after 2 and 3
    assert len(meta["layer_files"]) == 4 and all((out / f).is_file() for f in [meta["embed_file"], *meta["layer_files"]])
    assert meta["threshold"] == r["threshold"]
    assert r["parity_max_abs_diff"] <= CFG.atol
    assert 2 <= r["avg_layers"] <= 4 and r["speedup_b16"] > 0
    assert isinstance(load_encoder(out), OnnxEarlyExitEncoder)
    saved = json.loads((out / RESULT_FILE).read_text())
    assert EncoderEarlyExitConfig.model_validate(saved["config"]) == CFG


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_early_exit_runtime_honours_exits_per_item_when_threshold_is_set(exported, quantile):
    out, r = exported
    embs, f = _per_layer(out, TEXTS)
    cos = np.concatenate([(embs[l - 1] * embs[l - 2]).sum(1) for l in r["exit_layers"]])
    threshold = float(np.quantile(cos, quantile))
    want, want_used = simulate_exits(embs, r["exit_layers"], threshold)
    enc = OnnxEarlyExitEncoder(out, threads=1, threshold=threshold)
    got = enc.embed_arrays(f)
    np.testing.assert_array_equal(enc.last_layers_used, want_used)
    assert 0 < (want_used < 4).sum() < len(TEXTS)  # some items exit, some run on
    assert np.abs(got - want).max() < 1e-5


def test_early_exit_runtime_drops_finished_items_from_the_batch_when_they_exit(exported):
    out, r = exported
    enc = OnnxEarlyExitEncoder(out, threads=1, threshold=-1.0)  # every item exits at the first chance
    seen = []
    for sess in enc.layer_sessions:
        real = sess.run
        sess_rows = []
        seen.append(sess_rows)
        sess.run = lambda names, feed, real=real, rows=sess_rows: rows.append(len(feed["hidden_states"])) or \
            real(names, feed)
    enc.embed_arrays(batch_arrays(enc.tokenizer, TEXTS))
    np.testing.assert_array_equal(enc.last_layers_used, 2)
    assert seen[0] == [len(TEXTS)] and seen[1] == [len(TEXTS)] and seen[2] == [] and seen[3] == []


def test_early_exit_runtime_matches_the_plain_encoder_when_exits_are_disabled(exported, strong, tmp_path):
    from tasks.encoder_export import EncoderExportConfig, export_encoder

    out, _ = exported
    export_encoder(strong, tmp_path / "plain", EncoderExportConfig())
    enc = OnnxEarlyExitEncoder(out, threads=1, threshold=NEVER_EXIT)
    full = enc.embed(TEXTS, batch_size=8)
    assert (enc.layers_used == 4).all()
    assert np.abs(full - load_encoder(tmp_path / "plain").embed(TEXTS)).max() < 1e-4


def test_fit_heads_recovers_a_linear_map_when_states_are_linearly_related():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    w = rng.normal(size=(6, 6))
    y = x @ w + 0.5
    heads = fit_heads([x, y], ridge=0.0)
    np.testing.assert_allclose(x @ heads[0][0] + heads[0][1], y, atol=1e-8)
    np.testing.assert_allclose(heads[1][0], np.eye(6))  # the last layer's head is the identity


def test_calibrate_picks_the_loosest_threshold_that_keeps_the_target_when_sweeping():
    rng = np.random.default_rng(1)
    final = rng.normal(size=(40, 8))
    noisy = final + rng.normal(scale=[[0.05]] * 20 + [[2.0]] * 20, size=(40, 8))  # half stable, half not
    embs = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in (noisy, noisy, final)]
    cal = calibrate(embs, [2], [NEVER_EXIT, 0.5, -1.0], target=0.9)
    by_t = {row["threshold"]: row for row in cal["sweep"]}
    assert by_t[NEVER_EXIT]["avg_layers"] == 3 and by_t[NEVER_EXIT]["rank_fidelity"] == pytest.approx(1.0)
    assert by_t[-1.0]["avg_layers"] == 2  # everything exits
    passing = [t for t, row in by_t.items() if row["rank_fidelity"] >= 0.9]
    assert cal["threshold"] == min(passing)
    out, used = simulate_exits(embs, [2], cal["threshold"])
    assert cal["avg_layers"] == pytest.approx(used.mean(), abs=1e-3)


def test_head_embeddings_are_l2_normalized_when_computed():
    rng = np.random.default_rng(2)
    pooled = [rng.normal(size=(10, 4)) for _ in range(3)]
    for e in head_embeddings(pooled, fit_heads(pooled, 0.1)):
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0)


def test_check_exit_layers_raises_config_error_when_layers_are_out_of_range():
    assert check_exit_layers([3, 2, 3], 6) == [2, 3]
    with pytest.raises(ConfigError, match="after layers 2..5"):
        check_exit_layers([6], 6)
    with pytest.raises(ConfigError, match="needs 3 or more layers"):
        check_exit_layers([], 2)


def test_early_exit_encoder_raises_config_error_when_calibration_set_is_empty(strong, tmp_path):
    with pytest.raises(ConfigError, match="calibration set"):
        early_exit_encoder(CFG, strong, tmp_path / "o", TEXTS, [])
    assert not (tmp_path / "o").exists()


def test_quantize_encoder_quantizes_every_segment_when_input_is_an_early_exit_export(exported, tmp_path):
    from tasks.encoder_quantize import EncoderQuantizeConfig, quantize_encoder

    out, _ = exported
    r = quantize_encoder(EncoderQuantizeConfig(), out, tmp_path / "q", TEXTS)
    meta = json.loads((tmp_path / "q" / ENCODER_META).read_text())
    assert meta["embed_file"] == "embed.int8.onnx" and all(f.endswith(".int8.onnx") for f in meta["layer_files"])
    assert r["op_counts"]["MatMulInteger"] > 0 and r["size_bytes"] < r["size_bytes_before"]
    enc = load_encoder(tmp_path / "q", threads=1)
    assert enc.embed(TEXTS[:4]).shape == (4, 32)
