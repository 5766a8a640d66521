"""Parsing of Triton's statistics and metrics into batching/cache counters."""

from __future__ import annotations

from serving.client import ModelStats, cache_hits_from_metrics

# gRPC statistics rendered as JSON: uint64 counters arrive as strings, zero sections are left out.
GRPC_JSON = {"name": "m", "version": "2", "inference_count": "40", "execution_count": "6",
             "inference_stats": {"success": {"count": "40", "ns": "123"}, "cache_hit": {"count": "3", "ns": "9"},
                                 "cache_miss": {"count": "37"}, "queue": {"count": "37", "ns": "555"}}}

METRICS = """# HELP nv_cache_num_hits_per_model Number of cache hits per model
# TYPE nv_cache_num_hits_per_model counter
nv_cache_num_hits_per_model{model="m",version="1"} 2
nv_cache_num_hits_per_model{model="m",version="2"} 5
nv_cache_num_hits_per_model{model="mm",version="2"} 7
nv_inference_count{model="m",version="2"} 40
"""


def test_model_stats_reads_string_counters_when_from_grpc_json() -> None:
    s = ModelStats.from_json(GRPC_JSON)
    assert (s.inference_count, s.execution_count, s.cache_hit_count, s.cache_miss_count) == (40, 6, 3, 37)
    assert s.fail_count == 0 and s.queue_ns == 555
    assert round(s.rows_per_execution, 2) == 6.67


def test_model_stats_difference_counts_only_new_work_when_subtracted() -> None:
    before = ModelStats("m", "2", inference_count=10, execution_count=4, cache_hit_count=1)
    d = ModelStats.from_json(GRPC_JSON) - before
    assert (d.inference_count, d.execution_count, d.cache_hit_count) == (30, 2, 2)
    assert d.as_dict()["rows_per_execution"] == 15.0


def test_cache_hits_from_metrics_sums_versions_when_no_version_given() -> None:
    assert cache_hits_from_metrics(METRICS, "m") == 7
    assert cache_hits_from_metrics(METRICS, "m", version=2) == 5
    assert cache_hits_from_metrics(METRICS, "absent") == 0
