"""Quality gates and the run report."""

from __future__ import annotations

import json

import pytest

from tasks.config import GateConfig
from tasks.errors import QualityGateFailed
from tasks.gates import check
from tasks.report import cost_per_million_tokens, markdown

TEACHER = {"kind": "causal_lm", "perplexity": 30.0, "tokens_per_s": 10.0, "latency_ms_p50": 3000.0,
           "size_bytes": 500_000_000}
STUDENT = {"kind": "causal_lm", "perplexity": 36.0, "tokens_per_s": 40.0, "latency_ms_p50": 800.0,
           "size_bytes": 100_000_000}


def test_check_passes_and_writes_report_when_every_gate_holds(tmp_path):
    out = check(GateConfig(max_ppl_ratio=1.25, min_speedup=3, max_size_mb=150), TEACHER, STUDENT, tmp_path / "g.json")
    assert out["passed"] and out["ratios"]["ppl_ratio"] == pytest.approx(1.2)
    assert json.loads((tmp_path / "g.json").read_text())["passed"] is True


def test_check_names_every_failed_gate_with_measured_and_allowed_when_all_fail(tmp_path):
    with pytest.raises(QualityGateFailed) as e:
        check(GateConfig(max_ppl_ratio=1.1, min_speedup=5, max_size_mb=50), TEACHER, STUDENT, tmp_path / "g.json")
    assert len(e.value.failures) == 3
    msg = str(e.value)
    for name in ("max_ppl_ratio: measured 1.2 <= allowed 1.1", "min_speedup: measured 4 >= allowed 5",
                 "max_size_mb: measured 100 <= allowed 50"):
        assert name in msg
    assert str(tmp_path / "g.json") in msg
    assert json.loads((tmp_path / "g.json").read_text())["passed"] is False


def test_check_uses_spearman_and_throughput_when_model_is_an_encoder(tmp_path):
    t = {"kind": "encoder", "quality": 0.70, "throughput_b16": 100.0, "latency_ms_p50": 20.0, "size_bytes": 90e6}
    c = {"kind": "encoder", "quality": 0.60, "throughput_b16": 500.0, "latency_ms_p50": 5.0, "size_bytes": 20e6}
    with pytest.raises(QualityGateFailed) as e:
        check(GateConfig(min_quality_ratio=0.97, min_speedup=4, max_size_mb=50), t, c, tmp_path / "g.json")
    assert [f.split(":")[0] for f in e.value.failures] == ["min_quality_ratio"]


def test_cost_per_million_tokens_scales_inversely_with_speed():
    assert cost_per_million_tokens({"tokens_per_s": 10}, 0.36) == pytest.approx(10.0)
    assert cost_per_million_tokens({"tokens_per_s": 40}, 0.36) == pytest.approx(2.5)


def test_markdown_shows_ratios_gates_and_serving():
    gates = {"gates": [{"name": "max_ppl_ratio", "measured": 1.2, "op": "<=", "allowed": 4.0, "passed": True}]}
    text = markdown({"run_id": "r", "source": "smollm2", "profile": "quick", "techniques": ["distill"],
                     "teacher": TEACHER, "student": STUDENT, "gates": gates, "registered_model": {"name": "m"},
                     "triton": {"model_name": "t"}, "smoke_test": {"ok": True, "text": "hi"}})
    assert "| held-out perplexity | 30.00 | 36.00 | 1.20× |" in text and "| max_ppl_ratio |" in text
