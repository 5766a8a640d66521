"""The serving benchmark harness's bookkeeping: sections missing, incompatible or failing are reported.

No server and no model: the sections here are stand-ins; ``make bench-serving`` runs the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.bench_serving as bench


def test_flatten_turns_one_level_of_nesting_into_dotted_keys_when_result_is_nested() -> None:
    flat = bench.flatten({"dynamic": {"ratio": 2.5, "unbatched": {"throughput_rps": 3}}, "seconds": 9,
                          "prefix_cache.ttft_ratio": 0.4})
    assert flat == {"dynamic.ratio": 2.5, "dynamic.unbatched": {"throughput_rps": 3}, "seconds": 9,
                    "prefix_cache.ttft_ratio": 0.4}


def test_headline_lists_expected_keys_a_section_did_not_give_when_result_is_partial() -> None:
    top, missing = bench.headline("caches", {"dynamic": {"ratio": 2.0, "unbatched": {}}, "cache": {"hit_p50": 1},
                                             "encoder": "x"})
    assert set(top) == {"dynamic.ratio", "dynamic.unbatched", "cache.hit_p50"}
    assert missing == ["dynamic.batched_cached"]


def test_call_with_passes_only_declared_arguments_and_refuses_unknown_required_ones() -> None:
    seen = {}

    def run(server, quick=True, *, threads=2):
        seen.update(server=server, quick=quick, threads=threads)
        return {}

    bench.call_with(run, {"server": "S", "quick": False, "model_dir": Path("m")})
    assert seen == {"server": "S", "quick": False, "threads": 2}
    with pytest.raises(bench.Incompatible, match="needs \\['tokenizer'\\]"):
        bench.call_with(lambda server, tokenizer: {}, {"server": "S"})


def test_run_section_reports_missing_incompatible_and_failed_without_raising_when_sections_are_broken() -> None:
    missing = bench.run_section("generation", None, "benchmarks/serving_generation.py is not in this checkout", {})
    assert missing["status"] == "missing" and "generation.ratio" in missing["missing_keys"]
    incompatible = bench.run_section("caches", lambda server, gpu: {}, "", {"server": "S"})
    assert incompatible["status"] == "incompatible" and "gpu" in incompatible["reason"]

    def boom(server):
        raise RuntimeError("model did not load")

    failed = bench.run_section("caches", boom, "", {"server": "S"})
    assert failed["status"] == "failed" and "model did not load" in failed["reason"] and failed["traceback"]


def test_external_runner_says_why_when_module_is_absent(monkeypatch) -> None:
    monkeypatch.setitem(bench.EXTERNAL, "generation", "benchmarks.no_such_benchmark")
    fn, reason = bench.external_runner("generation")
    assert fn is None and reason == "benchmarks/no_such_benchmark.py is not in this checkout"


def test_assemble_puts_headline_keys_at_top_and_lists_missing_sections_when_written(tmp_path: Path) -> None:
    ok = bench.run_section("rollout", lambda: {"rollout": {"failed_requests": 0, "rollback_ok": True}}, "", {})
    gone = bench.run_section("generation", None, "not here", {})
    report = bench._assemble({"profile": "quick"}, {"rollout": ok, "generation": gone}, started=0.0)
    bench._write(tmp_path / "r.json", report)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["rollout.failed_requests"] == 0 and back["rollout.rollback_ok"] is True
    assert back["missing"]["generation"]["status"] == "missing" and "rollout" not in back["missing"]
    assert back["sections"]["rollout"]["result"]["rollout"]["failed_requests"] == 0
