"""CALM-style early exit on the tiny random Llama: exits honoured, exact KV, calibration, segmented export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.runtime.early_exit import EarlyExitLM, confidence
from tasks.config import EvalConfig
from tasks.early_exit import (EarlyExitConfig, EarlyExitRunner, calibrate, cost_model, early_exit, evaluate_setting,
                              select_exits)
from tasks.errors import ConfigError
from tests.tiny import CORPUS, make_tiny_llm

LAYERS = 4
EXITS = (1, 2)
PROMPTS = [[5, 17, 42, 99], [7, 3]]
SMALL = dict(exit_layers=EXITS, fit_tokens=96, calib_tokens=96, seq_len=32, eval_windows=1, eval_len=32,
             speed_prompts=1, speed_tokens=3, target_agreement=0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("ee") / "tiny", layers=LAYERS)


@pytest.fixture(scope="module", params=["softmax", "classifier"])
def exported(request, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ee-{request.param}") / "out"
    result = early_exit(EarlyExitConfig(measure=request.param, **SMALL), tiny, out, CORPUS * 6, CORPUS * 6, CORPUS * 6)
    return out, result


def _full_depth_greedy(tiny, prompt, n):
    from tasks.evaluate import TorchRunner

    return TorchRunner(tiny).generate(prompt, n)[0]


def test_early_exit_generation_equals_full_generation_when_no_exit_fires(exported, tiny):
    out, _ = exported
    lm = EarlyExitLM(out, threshold=1.0)
    batch = lm.generate_ids(PROMPTS, 6, stop_at_eos=False)  # left-padded batch of two

    assert lm.last_stats["layers_used"] == [LAYERS] * 6
    assert batch == [_full_depth_greedy(tiny, p, 6) for p in PROMPTS]


def test_early_exit_takes_the_first_exit_for_every_token_when_threshold_is_zero(exported):
    out, _ = exported
    lm = EarlyExitLM(out, threshold=0.0)
    lm.generate_ids(PROMPTS, 5, stop_at_eos=False)

    assert lm.last_stats["layers_used"] == [EXITS[0]] * 5
    assert lm.stats()["exit_counts"] == {str(EXITS[0]): 5, str(EXITS[1]): 0, str(LAYERS): 0}
    # Deep layers were never needed, so they never ran: only layer-1 passes (prompt + 4 fed-back tokens).
    assert lm.stats()["layer_positions_per_token"] == pytest.approx(EXITS[0] * (4 + 4) / 5)


@pytest.mark.parametrize("threshold", [1.0, 1.5])
def test_early_exit_never_exits_when_threshold_is_one_or_more(exported, threshold):
    out, _ = exported
    lm = EarlyExitLM(out, threshold=threshold)
    ids = np.array([PROMPTS[0] * 4])
    lm.logits(ids)
    assert set(np.ravel(lm.last_stats["layers_used"])) == {LAYERS}
    np.testing.assert_array_equal(lm.logits(ids), lm.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None],
                                                             lm.empty_past(1))[0])


def test_early_exit_uses_intermediate_depths_when_threshold_is_between(exported):
    out, _ = exported
    lm = EarlyExitLM(out)
    ids = np.array([(PROMPTS[0] + PROMPTS[1]) * 4])
    first = _first_exit_confidence(lm, ids)
    lm.logits(ids, threshold=float(np.median(first)))
    used = np.ravel(lm.last_stats["layers_used"])
    assert used.min() == EXITS[0] and used.max() > EXITS[0]
    assert EXITS[0] < used.mean() < LAYERS


def _first_exit_confidence(lm, ids):
    am, pos = np.ones_like(ids), np.arange(ids.shape[1])[None]
    res = lm.run_segment(0, lm.embed(ids), am, pos, lm._empty_segment_past(0, 1))
    return confidence(lm.meta.measure, lm.head_logits(res["exit_hidden"])[0], res["exit_score"][0])


def test_early_exit_kv_cache_equals_full_models_when_skipped_layers_catch_up(exported):
    out, _ = exported
    lm = EarlyExitLM(out, threshold=0.0)
    st = lm.begin([PROMPTS[0]], 8)
    for _ in range(4):
        lm.step(st)  # all exit after layer 1: layers 2-4 fall behind
    assert st.done[-1] == 0
    lm.threshold = 1.0
    tok = lm.step(st)  # full depth: the pending positions go through layers 2-4 with it

    seq = st.ids[:, :-1]
    logits, present = lm.forward(seq, np.ones_like(seq), np.arange(seq.shape[1])[None], lm.empty_past(1))
    flat = [a for seg in st.past for a in seg]
    for got, want in zip(flat, present):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert int(tok[0]) == int(logits[0, -1].argmax())


def _threshold_in_widest_gap(conf: np.ndarray) -> float:
    """A threshold far from every observed confidence: incremental decode and a teacher-forced pass
    compute confidences that differ in the last float32 bits, so a threshold on a value (the
    median, say, where the tiny model's probe saturates near 1.0) flips exits between them."""
    v = np.unique(conf.astype(np.float64))
    i = int(np.argmax(np.diff(v)))
    return float((v[i] + v[i + 1]) / 2)


def test_early_exit_generation_matches_teacher_forced_logits_when_exits_fire(exported):
    out, _ = exported
    lm = EarlyExitLM(out)
    lm.threshold = _threshold_in_widest_gap(_first_exit_confidence(lm, np.array([PROMPTS[0] * 3])))
    gen = lm.generate_ids([PROMPTS[0]], 8, stop_at_eos=False)[0]
    depths = lm.last_stats["layers_used"]
    seq = np.array([PROMPTS[0] + gen])
    forced = lm.logits(seq)[0]
    start = len(PROMPTS[0]) - 1
    assert gen == [int(t) for t in forced[start:start + 8].argmax(-1)]
    assert depths == lm.last_stats["layers_used"][0][start:start + 8]
    assert min(depths) < LAYERS, depths  # exits did fire


def test_early_exit_result_meets_the_target_and_writes_config_beside_the_export(exported):
    out, result = exported
    meta = json.loads((out / "trimflow_early_exit.json").read_text())
    saved = json.loads((out / "trimflow_early_exit_result.json").read_text())

    assert result["calibration"]["agreement"] >= SMALL["target_agreement"]
    assert result["exits"] == list(EXITS) and 0.0 <= result["threshold"] <= 1.0
    assert [s["end"] for s in meta["segments"]] == [*EXITS, LAYERS] and meta["threshold"] == result["threshold"]
    assert saved["config"] == EarlyExitConfig(measure=result["measure"], **SMALL).model_dump(mode="json")
    assert max(result["parity"][k] for k in ("prefill_max_abs_diff", "decode_max_abs_diff", "exit_max_abs_diff")) < 1e-3
    assert result["speed"]["speedup"] > 0 and result["eval"]["tokens"] == SMALL["eval_len"]
    assert _vocab_tables(out / "head.onnx") == 1  # the tied embedding and LM head stored once
    assert _heads_keys(out) == {f"exit_{e}.{p}.{w}" for e in EXITS for p in ("adapter", "probe") for w in ("weight", "bias")}


def _vocab_tables(path):
    import onnx

    vocab = json.loads((path.parent / "trimflow_early_exit.json").read_text())["vocab_size"]
    return sum(1 for i in onnx.load(str(path)).graph.initializer if vocab in i.dims)


def _heads_keys(out):
    from safetensors import safe_open

    with safe_open(str(out / "exit_heads.safetensors"), "pt") as f:
        return set(f.keys())


def test_early_exit_runner_satisfies_measure_when_evaluated(exported):
    from tasks.evaluate import Runner, measure

    out, _ = exported
    runner = EarlyExitRunner(out, threads=1)
    assert isinstance(runner, Runner)
    m = measure(runner, EvalConfig(ppl_windows=1, window_len=16, latency_prompts=1, new_tokens=3, repeats=1,
                                   threads=1), CORPUS * 3, ["The city council voted"])
    assert m["runtime"].startswith("onnxruntime-early-exit") and np.isfinite(m["perplexity"])
    assert m["size_bytes"] > 0 and runner.stats()["tokens"] == 3 * 2  # warm-up + one timed request


def test_early_exit_raises_config_error_when_an_exit_is_not_before_the_last_layer(tiny, tmp_path):
    with pytest.raises(ConfigError, match="exit_layers"):
        early_exit(EarlyExitConfig(**(SMALL | {"exit_layers": (2, LAYERS)})), tiny, tmp_path / "out", CORPUS, CORPUS)
    assert not (tmp_path / "out").exists()


def test_evaluate_setting_counts_depth_and_checks_when_exits_fire():
    conf = np.array([[0.9, 0.1, 0.1], [0.9, 0.9, 0.1]])  # 2 exits x 3 tokens
    agree = np.array([[True, True, True], [True, False, True]])
    costs = {"head": 2.0, "check": 2.5, "full": 12.0}
    r = evaluate_setting(conf, agree, [3, 6], 0.5, costs, "softmax", 10)
    # token 0 exits at layer 3 (1 check), token 1 at layer 6 (2 checks, disagrees), token 2 runs all 10 (+head).
    assert r["mean_layers"] == pytest.approx((3 + 6 + 10) / 3)
    assert r["agreement"] == pytest.approx(2 / 3) and r["exit_rate"] == pytest.approx(2 / 3)
    assert r["cost"] == pytest.approx(((3 + 2.5) + (6 + 5) + (10 + 5 + 2)) / 3)


def test_calibrate_never_exits_when_only_full_depth_meets_the_target():
    conf = np.array([[0.2, 0.6, 0.9]])
    agree = np.array([[False, False, False]])
    costs = cost_model(10, 1.0, 4.0, 2, "classifier")
    r = calibrate(conf, agree, [5], costs, "classifier", 10, target=1.0)
    assert r["agreement"] == 1.0 and r["exit_rate"] == 0.0 and r["threshold"] > 0.9


def test_select_exits_prefers_the_cheaper_exit_when_both_meet_the_target():
    n = 200
    stats = {2: {"conf": np.full(n, 0.9), "agree": np.ones(n, bool)},
             6: {"conf": np.full(n, 0.9), "agree": np.ones(n, bool)}}
    costs = cost_model(10, 1.0, 4.0, 2, "classifier")
    best = select_exits(stats, [2, 6], costs, "classifier", 10, 0.95, max_exits=2, fixed=False)
    assert best["exits"] == [2] and best["mean_layers"] == 2.0
