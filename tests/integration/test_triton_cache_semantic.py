"""The semantic_gateway model in the real tritonserver, in front of tinyllm with tinyenc embeddings.

The tiny encoder is random, so paraphrases are not close in its space; the tests use what it does
map together: case variants (its tokenizer lowercases) and unseen digits (all ``[UNK]``).
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from serving.client import model_stats
from serving.semantic_cache import SemanticCacheConfig, ask_gateway, embed_texts, gateway_counts
from tasks.errors import ServingError

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def deploy_gateway(triton_server, triton_llm, triton_encoder):
    """``deploy(name, cache=SemanticCacheConfig(), decoupled=True, ...)`` loads a gateway; all unloaded after."""
    from serving.model_config import ModelConfigSpec
    from serving.repository import ModelRepository
    from serving.semantic_cache import write_gateway_version

    repo = ModelRepository(triton_server.config.model_repository)
    loaded: list[str] = []

    def deploy(name: str, cache: SemanticCacheConfig | None = None, load: bool = True, **spec) -> str:
        write_gateway_version(repo, name, 1)
        cfg = ModelConfigSpec.semantic_gateway(name, encoder_model=triton_encoder.name, llm_model=triton_llm.name,
                                               cache_parameters=(cache or SemanticCacheConfig()).to_parameters(),
                                               **spec)
        repo.write_config(name, cfg.to_pbtxt())
        if load:
            triton_server.load(name)
            loaded.append(name)
        return name

    yield deploy
    for name in loaded:
        if triton_server.is_ready(name):
            triton_server.unload(name)


@pytest.fixture(scope="module")
def gateway(deploy_gateway) -> str:
    """The default gateway (decoupled, embedded store), shared by tests that use distinct prompts."""
    return deploy_gateway("semgw")


@pytest.fixture()
def redis_prefix():
    import redis

    prefix = f"trimflow-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def _llm_successes(triton_llm) -> int:
    (s,) = model_stats(triton_llm.server.grpc_url, triton_llm.name, triton_llm.version)
    return s.success_count


def _ask(server, model: str, prompts: list[str], decoupled: bool = True, **kw) -> list[tuple[str, str]]:
    out = ask_gateway(server.grpc_url, model, prompts, decoupled=decoupled, **kw)
    errors = [o for o in out if isinstance(o, ServingError)]
    assert not errors, errors
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("decoupled", [True, False])
def test_triton_gateway_answers_from_semantic_cache_when_prompt_differs_in_case(
        deploy_gateway, gateway, triton_server, triton_llm, decoupled: bool) -> None:
    name = gateway if decoupled else deploy_gateway("semgw_unary", decoupled=False)
    before_llm, before = _llm_successes(triton_llm), gateway_counts(triton_server.metrics(), name)
    ((text1, status1),) = _ask(triton_server, name, ["The City Council voted on the Budget"], decoupled, max_tokens=6)
    ((text2, status2),) = _ask(triton_server, name, ["the city council voted on the budget"], decoupled, max_tokens=6)
    assert (status1, status2) == ("miss", "hit") and text2 == text1
    assert _llm_successes(triton_llm) - before_llm == 1
    after = gateway_counts(triton_server.metrics(), name)
    assert after.get("hit", 0) - before.get("hit", 0) == 1 and after.get("miss", 0) - before.get("miss", 0) == 1


def test_triton_gateway_asks_llm_when_only_a_number_changes(gateway, triton_server, triton_llm,
                                                            triton_encoder) -> None:
    name = gateway
    a, b = "The council approved 5 roads", "The council approved 6 roads"
    # Unseen digits are one [UNK] token to the tiny tokenizer: the two prompts embed identically,
    # so only the guard can tell them apart.
    va, vb = embed_texts(triton_server.grpc_url, triton_encoder.name, [a, b])
    np.testing.assert_allclose(va, vb, atol=1e-6)
    before_llm, before = _llm_successes(triton_llm), gateway_counts(triton_server.metrics(), name)
    (_, s1), (_, s2) = (_ask(triton_server, name, [p], max_tokens=4)[0] for p in (a, b))
    assert (s1, s2) == ("miss", "guarded")
    assert _llm_successes(triton_llm) - before_llm == 2
    assert gateway_counts(triton_server.metrics(), name).get("guarded", 0) - before.get("guarded", 0) == 1


def test_triton_gateway_bypasses_cache_when_sampling(gateway, triton_server) -> None:
    name = gateway
    out = [_ask(triton_server, name, ["Tell a story about rain"], max_tokens=4, temperature=0.9)[0] for _ in range(2)]
    assert [s for _, s in out] == ["bypass", "bypass"]


def test_triton_gateway_sends_hit_before_slow_miss_when_decoupled(gateway, triton_server) -> None:
    import queue

    import tritonclient.grpc as g

    name = gateway
    _ask(triton_server, name, ["Shares of the company rose"], max_tokens=4)  # cached now

    def request(prompt: str, max_tokens: int):
        ins = [g.InferInput("text_input", [1, 1], "BYTES"), g.InferInput("max_tokens", [1, 1], "INT32")]
        ins[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        ins[1].set_data_from_numpy(np.array([[max_tokens]], np.int32))
        return ins

    answers: queue.Queue = queue.Queue()
    client = g.InferenceServerClient(triton_server.grpc_url)
    client.start_stream(callback=lambda result=None, error=None: answers.put((result, error)))
    try:
        # A long generation first, then a cache hit: the instance answers the hit while it waits for the LLM.
        client.async_stream_infer(name, request("Heavy rain caused flooding in several towns", 250), request_id="slow")
        time.sleep(0.05)
        client.async_stream_infer(name, request("shares of the company rose", 4), request_id="hit")
        order = []
        for _ in range(2):
            result, error = answers.get(timeout=120)
            assert error is None, error
            order.append((result.get_response().id, result.as_numpy("cache_status").reshape(-1)[0].decode()))
    finally:
        client.stop_stream()
        client.close()
    assert order == [("hit", "hit"), ("slow", "miss")]


def test_triton_gateway_keeps_entries_across_reload_when_redis_backed(deploy_gateway, triton_server,
                                                                     redis_prefix: str) -> None:
    import redis

    cache = SemanticCacheConfig(redis_url=REDIS_URL, key_prefix=redis_prefix, ttl_s=300)
    name = deploy_gateway("semgw_redis", cache=cache, instances=2)
    ((text, status),) = _ask(triton_server, name, ["The President Said the talks would continue"], max_tokens=5)
    assert status == "miss"
    client = redis.Redis.from_url(REDIS_URL)
    entries = [k for k in client.scan_iter(match=redis_prefix + "*:e:*")]
    assert len(entries) == 1 and client.hget(entries[0], "response").decode() == text
    client.close()
    # New stub processes start with empty memory: a hit now can only come from Redis.
    triton_server.unload(name)
    triton_server.load(name)
    ((text2, status2),) = _ask(triton_server, name, ["the president said the talks would continue"], max_tokens=5)
    assert (status2, text2) == ("hit", text)


def test_triton_gateway_load_fails_when_redis_is_unreachable(deploy_gateway, triton_server) -> None:
    name = deploy_gateway("semgw_noredis", cache=SemanticCacheConfig(redis_url="redis://127.0.0.1:1/0",
                                                                     redis_timeout_s=0.2), load=False)
    with pytest.raises(ServingError, match="unreachable"):
        triton_server.load(name)
    assert not triton_server.is_ready(name)


def test_triton_response_cache_answers_exact_repeat_before_unary_gateway_runs(deploy_gateway,
                                                                              triton_server) -> None:
    name = deploy_gateway("semgw_exact", decoupled=False, response_cache=True)
    first = _ask(triton_server, name, ["Scientists announced a new study"], decoupled=False, max_tokens=4)
    second = _ask(triton_server, name, ["Scientists announced a new study"], decoupled=False, max_tokens=4)
    assert first == second
    (s,) = model_stats(triton_server.grpc_url, name, 1)
    assert (s.cache_hit_count, s.cache_miss_count, s.execution_count) == (1, 1, 1), s.as_dict()
