"""The load generator without a server: workload, bounds, percentiles and statistics arithmetic.

A fake async tritonclient stands in for Triton, so the bounds (requests, time, concurrency,
stop) are checked exactly; the real server is exercised in tests/integration/test_triton_search_loadgen.py.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np
import pytest

import serving.client
from serving.client import ModelStats
from serving.loadgen import LoadConfig, LoadGenerator, Router, Target, Workload, percentiles, run_load, triton_deltas
from tasks.errors import ConfigError


class FakeResult:
    def __init__(self, text: str) -> None:
        self.text = text

    def as_numpy(self, name: str):
        return np.array([[self.text.encode()]], dtype=np.object_) if name == "text_output" else None


class FakeClient:
    """An async tritonclient double: each request takes ``delay_s``; prompts with 'FAIL' fail."""

    delay_s = 0.01
    decoupled = False
    in_flight = 0
    peak = 0
    sent: list[tuple[str, str]] = []

    def __init__(self, url: str) -> None:
        self.url = url

    async def get_model_config(self, name, as_json=False, client_timeout=None):
        if name == "absent":
            from tritonclient.utils import InferenceServerException

            raise InferenceServerException(f"Request for unknown model: '{name}' is not found")
        cfg = {"name": name, "max_batch_size": 8, "input": [{"name": "text_input"}, {"name": "max_tokens"}]}
        if self.decoupled:
            cfg["model_transaction_policy"] = {"decoupled": True}
        return {"config": cfg}

    async def _work(self, model: str, version: str, inputs) -> str:
        from tritonclient.utils import InferenceServerException

        cls = type(self)
        cls.in_flight += 1
        cls.peak = max(cls.peak, cls.in_flight)
        cls.sent.append((model, version))
        try:
            await asyncio.sleep(cls.delay_s)
        finally:
            cls.in_flight -= 1
        if b"FAIL" in (inputs[0]._get_content() or b""):
            raise InferenceServerException("model refused the prompt")
        return "out"

    async def infer(self, model, inputs, model_version="", client_timeout=None):
        return FakeResult(await self._work(model, model_version, inputs))

    def stream_infer(self, requests, stream_timeout=None):
        async def gen():
            async for r in requests:
                await self._work(r["model_name"], r.get("model_version", ""), r["inputs"])
                for word in (" a", " b", " c"):
                    await asyncio.sleep(0.002)
                    yield FakeResult(word), None
        return gen()

    async def close(self):
        pass


@pytest.fixture()
def fake(monkeypatch):
    import tritonclient.grpc.aio as aio

    FakeClient.delay_s, FakeClient.decoupled, FakeClient.in_flight, FakeClient.peak = 0.01, False, 0, 0
    FakeClient.sent = []
    monkeypatch.setattr(aio, "InferenceServerClient", FakeClient)
    monkeypatch.setattr(serving.client, "model_stats", lambda url, model, version="", protocol="grpc": [])
    return FakeClient


# -- config and workload ------------------------------------------------------------------------------
def test_load_config_raises_config_error_naming_field_when_value_is_out_of_range() -> None:
    with pytest.raises(ConfigError, match="LoadConfig.concurrency"):
        LoadConfig(concurrency=0)
    with pytest.raises(ConfigError, match="max_tokens"):
        LoadConfig(max_tokens=())
    with pytest.raises(ConfigError, match="repeat_share"):
        LoadConfig.from_dict({"repeat_share": 1.5})


def test_workload_is_reproducible_and_mixes_lengths_when_seeded() -> None:
    cfg = LoadConfig(prompt_words=(3, 9), max_tokens=(2, 7), seed=7)
    a = [r for r, _ in zip(Workload(cfg), range(200))]
    b = [r for r, _ in zip(Workload(cfg), range(200))]
    c = [r for r, _ in zip(Workload(cfg.model_copy(update={"seed": 8})), range(200))]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert [(r.prompt, r.max_tokens) for r in a] == [(r.prompt, r.max_tokens) for r in b]
    assert {len(r.prompt.split()) for r in a} == {3, 9}
    assert {r.max_tokens for r in a} == {2, 7}


def test_workload_never_repeats_a_request_when_repeat_share_is_zero() -> None:
    reqs = [r for r, _ in zip(Workload(LoadConfig(prompt_words=(2,), max_tokens=(4,))), range(1500))]
    assert len({(r.prompt, r.max_tokens) for r in reqs}) == len(reqs)
    assert all(r.repeat_of is None for r in reqs)


def test_workload_repeats_earlier_requests_exactly_when_repeat_share_is_set() -> None:
    w = Workload(LoadConfig(repeat_share=0.4, seed=3))
    reqs = [r for r, _ in zip(w, range(500))]
    repeats = [r for r in reqs if r.repeat_of is not None]
    assert 0.3 < len(repeats) / len(reqs) < 0.5
    assert all((r.prompt, r.max_tokens) == (w.fresh[r.repeat_of].prompt, w.fresh[r.repeat_of].max_tokens)
               for r in repeats)


def test_workload_uses_given_texts_when_texts_are_passed() -> None:
    r = next(Workload(LoadConfig(prompt_words=(4,)), texts=["alpha beta gamma delta epsilon"]))
    assert set(r.prompt.split()) <= {"alpha", "beta", "gamma", "delta", "epsilon"}


# -- arithmetic ------------------------------------------------------------------------------------------
def test_percentiles_are_ordered_and_mean_is_exact_when_values_are_given() -> None:
    values = [0.001 * (i % 37) for i in range(500)]
    p = percentiles(values)
    assert p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
    assert p["mean"] == pytest.approx(statistics.mean(values) * 1000, abs=1e-3) and p["n"] == 500
    assert percentiles([]) is None


def test_triton_deltas_count_new_versions_from_zero_and_list_gone_ones_when_versions_change() -> None:
    before = {("m", "1"): ModelStats("m", "1", inference_count=10, execution_count=5),
              ("m", "2"): ModelStats("m", "2", inference_count=4, execution_count=4, success_count=4)}
    after = {("m", "2"): ModelStats("m", "2", inference_count=20, execution_count=6, success_count=24,
                                    cache_hit_count=4, cache_miss_count=16),
             ("m__canary", "3"): ModelStats("m__canary", "3", inference_count=6, execution_count=2, success_count=6)}
    d = triton_deltas(before, after)
    assert d["inference_count"] == 16 + 6 and d["execution_count"] == 2 + 2
    assert d["avg_batch"] == pytest.approx(22 / 4, abs=1e-3)
    assert d["cache_hit_rate"] == pytest.approx(4 / 20)
    assert d["versions_gone"] == ["m:1"] and set(d["per_version"]) == {"m:2", "m__canary:3"}


# -- bounds (fake server) -------------------------------------------------------------------------------
def test_load_generator_stops_at_max_requests_and_keeps_concurrency_when_requests_bound_first(fake) -> None:
    r = run_load("fake:1", LoadConfig(concurrency=3, max_requests=25, max_duration_s=30), model="m")
    assert r["requests"] == 25 and r["ok"] == 25 and r["stopped_by"] == "max_requests"
    assert fake.peak == 3
    assert r["latency_ms"]["p50"] >= 10 * 0.9  # the fake's 10 ms per request


def test_load_generator_stops_at_max_duration_when_time_bounds_first(fake) -> None:
    fake.delay_s = 0.05
    t0 = time.monotonic()
    r = run_load("fake:1", LoadConfig(concurrency=2, max_requests=100_000, max_duration_s=0.5), model="m")
    assert r["stopped_by"] == "max_duration" and time.monotonic() - t0 < 0.5 + 1.0
    assert 0 < r["requests"] < 100_000 and r["failed"] == 0


def test_load_generator_paces_requests_when_rate_is_set(fake) -> None:
    r = run_load("fake:1", LoadConfig(concurrency=8, rate_rps=40, max_requests=10_000, max_duration_s=1.0), model="m")
    # Poisson arrivals at 40/s for 1 s; far fewer than the closed loop would send at 10 ms each.
    assert 15 <= r["requests"] <= 70


def test_load_generator_stop_ends_background_run_when_called(fake) -> None:
    gen = LoadGenerator("fake:1", LoadConfig(concurrency=2, max_requests=100_000, max_duration_s=60), model="m")
    with gen:
        time.sleep(0.3)
    assert gen.result["stopped_by"] == "stopped" and gen.result["requests"] > 0 and not gen.running


def test_load_generator_counts_failures_per_target_when_router_splits(fake) -> None:
    class Alternate(Router):
        def __init__(self) -> None:
            super().__init__(Target("m"))
            self.n, self.seen = 0, []

        def pick(self) -> Target:
            self.n += 1
            return Target("m", "2") if self.n % 2 else Target("m")

        def done(self, target, ok, latency_s, error="") -> None:
            self.seen.append((target, ok))

    router = Alternate()
    r = run_load("fake:1", LoadConfig(concurrency=1, max_requests=10), router=router)
    assert r["by_target"]["m:2"]["requests"] == 5 and r["by_target"]["m:default"]["requests"] == 5
    assert len(router.seen) == 10 and ("m", "2") in fake.sent and ("m", "") in fake.sent


def test_load_generator_records_each_failure_without_stopping_when_requests_fail(fake) -> None:
    r = run_load("fake:1", LoadConfig(concurrency=2, max_requests=30), model="m",
                 texts=["FAIL"] * 3 + ["fine words only here"] * 3)
    assert r["requests"] == 30 and 0 < r["failed"] < 30 and r["ok"] == 30 - r["failed"]
    assert r["errors"] == {"model refused the prompt": r["failed"]}
    assert r["error_rate"] == pytest.approx(r["failed"] / 30, abs=1e-4)


def test_load_generator_refuses_infer_mode_when_model_is_decoupled(fake) -> None:
    fake.decoupled = True
    with pytest.raises(ConfigError, match="decoupled"):
        run_load("fake:1", LoadConfig(max_requests=1), model="m")


def test_load_generator_reports_ttft_and_tokens_when_mode_is_stream(fake) -> None:
    fake.decoupled = True
    r = run_load("fake:1", LoadConfig(mode="stream", concurrency=2, max_requests=6), model="m")
    assert r["ok"] == 6 and r["stream"]["tokens"] == 18
    assert r["stream"]["ttft_ms"]["p50"] < r["latency_ms"]["p50"]
    assert r["stream"]["decode_tokens_per_s"]["n"] == 6


def test_load_generator_raises_serving_error_when_model_is_absent(fake) -> None:
    from tasks.errors import ServingError

    with pytest.raises(ServingError, match="absent"):
        run_load("fake:1", LoadConfig(max_requests=1), model="absent")
