"""The one measurement code: both runners on the same tiny fp32 model must agree; bad inputs are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.config import EvalConfig, ExportConfig
from tasks.errors import ConfigError, UnsupportedModelError
from tasks.evaluate import OrtRunner, Runner, TorchRunner, measure, perplexity_windows, token_nll
from tasks.export import export_causal_lm
from tests.tiny import CORPUS, make_tiny_encoder, make_tiny_llm

CFG = EvalConfig(ppl_windows=3, window_len=32, latency_prompts=2, new_tokens=6, repeats=2, threads=1)
PROMPTS = ["The city council voted", "Shares of the company"]
FIELDS = ("runtime", "threads", "perplexity", "ppl_windows", "ppl_tokens", "size_bytes", "num_parameters",
          "latency_ms_p50", "latency_ms_p95", "ttft_ms_p50", "tokens_per_s", "new_tokens", "latency_samples",
          "prompt_tokens_mean", "seconds")


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    hf = make_tiny_llm(base / "hf", layers=2)
    export_causal_lm(hf, base / "onnx", ExportConfig())
    return TorchRunner(hf, threads=1), OrtRunner(base / "onnx", threads=1)


def test_measure_reports_every_field_for_both_runtimes(runners):
    for runner in runners:
        assert isinstance(runner, Runner)
        r = measure(runner, CFG, CORPUS, PROMPTS)
        assert set(FIELDS) <= set(r)
        assert r["ppl_windows"] == 3 and r["ppl_tokens"] == 3 * 31
        assert 1 < r["perplexity"] < 10_000 and math.isfinite(r["perplexity"])
        assert r["size_bytes"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_ms_p50"] <= r["latency_ms_p50"] <= r["latency_ms_p95"]
        assert r["latency_samples"] == 2 * 2 and r["threads"] == 1
    assert runners[0].num_parameters() > 0 and runners[1].num_parameters() is None


def test_torch_and_ort_runners_agree_on_perplexity_and_greedy_tokens_of_the_same_model(runners):
    torch_r, ort_r = runners
    a, b = measure(torch_r, CFG, CORPUS, PROMPTS), measure(ort_r, CFG, CORPUS, PROMPTS)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    assert a["runtime"] == "torch-fp32" and b["runtime"] == "onnxruntime:model.onnx"
    prompt = torch_r.encode(PROMPTS[0])
    assert prompt == ort_r.encode(PROMPTS[0])
    assert torch_r.generate(prompt, 8)[0] == ort_r.generate(prompt, 8)[0]


def test_generate_returns_exactly_new_tokens_even_past_eos(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    hf = make_tiny_llm(tmp_path / "hf", layers=1)
    model = AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        # Tied embeddings: a large shared channel dominates every hidden state, and EOS has the most
        # of it, so greedy decoding picks EOS at every step.
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[model.config.eos_token_id, 0] = 2.0
    model.save_pretrained(hf)
    export_causal_lm(hf, tmp_path / "onnx", ExportConfig())
    for runner in (TorchRunner(hf, threads=1), OrtRunner(tmp_path / "onnx", threads=1)):
        ids, ttft, total = runner.generate(runner.encode("Heavy rain"), 12)
        assert len(ids) == 12 and runner.eos_token_id in ids[:-1]
        assert 0 < ttft <= total


def test_token_nll_matches_cross_entropy():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 13)).astype(np.float32)
    ids = rng.integers(0, 13, size=7)
    ref = F.cross_entropy(torch.from_numpy(logits[:-1]), torch.from_numpy(ids[1:]), reduction="none").numpy()
    np.testing.assert_allclose(token_nll(logits, ids), ref, rtol=1e-5)


def test_perplexity_windows_are_non_overlapping_and_capped_by_the_text(runners):
    runner = runners[0]
    stream = []
    for t in CORPUS:
        stream += runner.encode(t) + [runner.eos_token_id]
    w = perplexity_windows(runner, CORPUS, 100, 32)
    assert len(w) == len(stream) // 32
    np.testing.assert_array_equal(w.ravel(), stream[: w.size])


def test_measure_raises_config_error_when_texts_are_shorter_than_a_window(runners):
    with pytest.raises(ConfigError, match="eval.window_len"):
        measure(runners[0], CFG.model_copy(update={"window_len": 4096}), CORPUS[:1], PROMPTS)


def test_measure_raises_config_error_without_prompts(runners):
    with pytest.raises(ConfigError, match="prompts"):
        measure(runners[1], CFG, CORPUS, [])


def test_torch_runner_raises_unsupported_model_error_for_an_encoder(tmp_path):
    with pytest.raises(UnsupportedModelError):
        TorchRunner(make_tiny_encoder(tmp_path / "bert"))
