"""The load generator against the real tritonserver: bounds, Triton's statistics, cache hits, streams.

Infer-mode runs use the tiny exported Llama behind ``llm_generate``; stream-mode runs use a small
decoupled python model written here that streams exactly ``max_tokens`` words, so token counts
are known in advance.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serving.loadgen import LoadConfig, LoadGenerator, Workload, run_load
from serving.model_config import ModelConfigSpec, TensorSpec, VersionPolicy
from serving.repository import ModelRepository
from serving.rollout import smoke_test
from tasks.errors import ConfigError

pytestmark = pytest.mark.integration
MODEL = "tinyllm_load"
STREAM = "stream_double"

STREAM_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Decoupled test double: one response per word, max_tokens of them, then FINAL."""

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            mt = pb_utils.get_input_tensor_by_name(request, "max_tokens")
            n = int(mt.as_numpy().reshape(-1)[0]) if mt is not None else 4
            words = text.split() or ["?"]
            for i in range(n):
                out = np.array([(" " + words[i % len(words)]).encode()], dtype=np.object_)
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", out)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

# Tiny tokenizer: a word is several tokens, and the tiny model has 512 positions.
SHORT = dict(prompt_words=(4, 12), max_tokens=(4, 8))


@pytest.fixture(scope="module")
def served(triton_server, tiny_llm_export):
    repo = ModelRepository(triton_server.config.model_repository)
    repo.write_version(MODEL, 1, tiny_llm_export)
    repo.write_config(MODEL, ModelConfigSpec.llm_generate(MODEL, max_batch_size=16, max_queue_delay_microseconds=20000,
                                                          version_policy=VersionPolicy.specific(1)).to_pbtxt())
    triton_server.load(MODEL)
    return triton_server


@pytest.fixture(scope="module")
def stream_model(triton_server) -> str:
    folder = Path(triton_server.config.model_repository) / STREAM
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.py").write_text(STREAM_MODEL)
    spec = ModelConfigSpec(name=STREAM, backend="python", max_batch_size=0, decoupled=True,
                           inputs=(TensorSpec("text_input", "TYPE_STRING", (1,)),
                                   TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=True)),
                           outputs=(TensorSpec("text_output", "TYPE_STRING", (1,)),))
    (folder / "config.pbtxt").write_text(spec.to_pbtxt())
    triton_server.load(STREAM)
    return STREAM


def test_load_generator_stops_at_request_bound_and_reads_batching_statistics_when_concurrent(served) -> None:
    r = run_load(served.grpc_url, LoadConfig(concurrency=8, max_requests=40, **SHORT), model=MODEL)
    assert r["stopped_by"] == "max_requests" and r["requests"] == 40 and r["ok"] == 40, r["errors"]
    t = r["triton"]
    # Every request is new, so every one was executed (no cache hit), in fewer executions than requests.
    assert t["inference_count"] == 40 and t["cache_hit_count"] == 0 and t["cache_miss_count"] == 40
    assert 0 < t["execution_count"] < 40 and t["avg_batch"] == pytest.approx(40 / t["execution_count"], abs=1e-3)
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
    # duration_s is reported to the millisecond, so 40 / duration_s carries up to 0.5 ms / duration of error.
    assert r["throughput_rps"] == pytest.approx(40 / r["duration_s"], rel=1e-3 + 0.0006 / r["duration_s"])


def test_load_generator_stops_at_time_bound_when_requests_would_run_longer(served) -> None:
    t0 = time.monotonic()
    r = run_load(served.grpc_url, LoadConfig(concurrency=2, max_requests=100_000, max_duration_s=1.5, seed=1,
                                             **SHORT), model=MODEL)
    assert r["stopped_by"] == "max_duration" and 0 < r["requests"] < 100_000 and r["failed"] == 0
    assert time.monotonic() - t0 < 1.5 + r["config"]["request_timeout_s"]


def test_load_generator_counts_response_cache_hits_when_requests_repeat(served) -> None:
    # One at a time, so each repeat's original has finished and is in the cache.
    r = run_load(served.grpc_url, LoadConfig(concurrency=1, max_requests=40, repeat_share=0.5, seed=2, **SHORT),
                 model=MODEL)
    assert r["ok"] == 40 and r["client_repeats"] > 0
    assert r["triton"]["cache_hit_count"] == r["client_repeats"]
    assert r["triton"]["cache_hit_rate"] == pytest.approx(r["client_repeats"] / 40, abs=1e-3)


def test_load_generator_stops_background_run_when_asked(served) -> None:
    with LoadGenerator(served.grpc_url, LoadConfig(concurrency=2, max_requests=100_000, max_duration_s=120, seed=3,
                                                   **SHORT), model=MODEL) as load:
        time.sleep(1.0)
    assert load.result["stopped_by"] == "stopped" and load.result["requests"] > 0 and load.result["failed"] == 0


def test_load_generator_measures_ttft_and_tokens_when_streaming_from_decoupled_model(served, stream_model) -> None:
    cfg = LoadConfig(mode="stream", concurrency=4, max_requests=20, **SHORT)
    r = run_load(served.grpc_url, cfg, model=stream_model)
    assert r["ok"] == 20, r["errors"]
    expected_tokens = sum(req.max_tokens for req, _ in zip(Workload(cfg), range(20)))
    assert r["stream"]["tokens"] == expected_tokens
    assert r["stream"]["ttft_ms"]["n"] == 20 and r["stream"]["ttft_ms"]["p50"] <= r["latency_ms"]["p50"]
    assert r["stream"]["tokens_per_s"] > 0 and r["triton"]["inference_count"] == 20


def test_load_generator_refuses_infer_mode_when_model_is_decoupled(served, stream_model) -> None:
    with pytest.raises(ConfigError, match="decoupled"):
        run_load(served.grpc_url, LoadConfig(max_requests=1), model=stream_model)


def test_smoke_test_streams_and_reports_ttft_when_endpoint_is_stream(served, stream_model) -> None:
    out = smoke_test(served.grpc_url, stream_model, endpoint="stream", prompt="one two three", max_tokens=5)
    assert out["responses"] == 5 and out["text"] == " one two three one two"
    assert 0 < out["ttft_ms"] <= out["latency_ms"]
