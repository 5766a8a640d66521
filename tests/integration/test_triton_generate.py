"""The llm_generate python-backend model in the real tritonserver: text, batching, cache, errors."""

from __future__ import annotations

import pytest

from serving.client import cache_hits_from_metrics, generate, generate_batch, generate_concurrent, model_stats
from tasks.errors import ServingError

pytestmark = pytest.mark.integration


def _stats(served):
    (s,) = model_stats(served.server.grpc_url, served.name, served.version)
    return s


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_generate_returns_text_when_called_over(triton_llm, protocol: str) -> None:
    s = triton_llm.server
    url = s.grpc_url if protocol == "grpc" else s.http_url
    text = generate(url, triton_llm.name, f"The president said over {protocol}", max_tokens=6, protocol=protocol)
    assert isinstance(text, str) and text.strip()


def test_triton_generate_answers_each_row_when_one_request_has_several_prompts(triton_llm) -> None:
    texts = generate_batch(triton_llm.server.grpc_url, triton_llm.name, ["Heavy rain", "Scientists announced"],
                           max_tokens=4)
    assert len(texts) == 2 and all(t.strip() for t in texts)


def test_triton_batches_requests_when_sent_concurrently(triton_llm) -> None:
    before = _stats(triton_llm)
    prompts = [f"Shares of company {i} rose" for i in range(16)]  # distinct: no cache hits
    results = generate_concurrent(triton_llm.server.grpc_url, triton_llm.name, prompts, max_tokens=8)
    assert all(isinstance(r, str) and r for r in results), results
    d = _stats(triton_llm) - before
    assert d.inference_count == 16
    assert d.execution_count < d.inference_count, d.as_dict()


def test_triton_answers_from_response_cache_when_request_repeats(triton_llm) -> None:
    s = triton_llm.server
    before = _stats(triton_llm)
    metric_hits = cache_hits_from_metrics(s.metrics(), triton_llm.name)
    first = generate(s.grpc_url, triton_llm.name, "The city council voted twice", max_tokens=8)
    second = generate(s.grpc_url, triton_llm.name, "The city council voted twice", max_tokens=8)
    d = _stats(triton_llm) - before
    assert first == second
    assert d.cache_hit_count == 1 and d.cache_miss_count == 1 and d.execution_count == 1, d.as_dict()
    assert cache_hits_from_metrics(s.metrics(), triton_llm.name) == metric_hits + 1


@pytest.mark.parametrize("prompt, max_tokens, problem", [
    ("", 4, "empty prompt"),
    ("fine prompt", 100000, "max_tokens=100000"),
])
def test_triton_fails_only_bad_request_when_batched_with_good_ones(triton_llm, prompt: str, max_tokens: int,
                                                                   problem: str) -> None:
    from serving.client import _inputs
    import tritonclient.grpc as g
    import threading

    # Three requests in flight together: the bad one in the middle must not take the others down.
    client = g.InferenceServerClient(triton_llm.server.grpc_url)
    results: dict[int, object] = {}
    done = threading.Semaphore(0)

    def cb(i):
        def f(result=None, error=None):
            results[i] = error if error is not None else result.as_numpy("text_output")
            done.release()
        return f

    try:
        for i, (p, mt) in enumerate([("The city council", 4), (prompt, max_tokens), ("The president", 4)]):
            client.async_infer(triton_llm.name, _inputs("grpc", [p], mt, None), cb(i))
        assert all(done.acquire(timeout=60) for _ in range(3))
    finally:
        client.close()
    assert problem in results[1].message() and "INVALID_ARG" in str(results[1].status())
    assert results[0][0][0] and results[2][0][0]
    assert triton_llm.server.is_ready(triton_llm.name, triton_llm.version)
    assert generate(triton_llm.server.http_url, triton_llm.name, "Still answering", max_tokens=3, protocol="http")


def test_triton_generate_raises_serving_error_when_prompt_is_empty_over_http(triton_llm) -> None:
    with pytest.raises(ServingError, match="empty prompt"):
        generate(triton_llm.server.http_url, triton_llm.name, "", protocol="http")


def test_triton_generate_raises_serving_error_when_model_unknown(triton_llm) -> None:
    with pytest.raises(ServingError, match="no_such_model"):
        generate(triton_llm.server.grpc_url, "no_such_model", "hi")
