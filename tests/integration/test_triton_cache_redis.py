"""The semantic cache's Redis store against the real Redis on 127.0.0.1:6379 (unique key prefix, cleaned up)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from serving.semantic_cache import CacheUnavailable, RedisStore, SemanticCache, SemanticCacheConfig

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture()
def prefix():
    import redis

    p = f"trimflow-test:{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(REDIS_URL)
    yield p
    keys = list(client.scan_iter(match=p + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def _keys(prefix: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sorted(client.scan_iter(match=prefix + "*"))
    finally:
        client.close()


def _v(*xs: float) -> np.ndarray:
    return np.array(xs, np.float32)


def test_redis_store_shares_entries_when_two_processes_use_one_prefix(prefix: str) -> None:
    writer, reader = (RedisStore(REDIS_URL, prefix, ttl_s=60) for _ in range(2))
    assert reader.search("ns", _v(1, 0), k=1) == []  # the reader's mirror starts before the write
    entry = writer.add("ns", _v(1, 0), "Summarize the vote", "answer")
    (found,) = reader.search("ns", _v(1, 0.05), k=1)
    assert (found.id, found.prompt) == (entry, "Summarize the vote")
    assert reader.response("ns", entry) == "answer"


def test_redis_store_evicts_oldest_entries_when_max_entries_exceeded(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix, max_entries=2, ttl_s=0)
    ids = [store.add("ns", _v(1, i), f"p{i}", f"r{i}") for i in range(3)]
    assert store.response("ns", ids[0]) is None
    assert [store.response("ns", i) for i in ids[1:]] == ["r1", "r2"]
    assert len([k for k in _keys(prefix) if b":e:" in k]) == 2


def test_redis_store_sets_entry_ttl_when_configured(prefix: str) -> None:
    import redis

    store = RedisStore(REDIS_URL, prefix, ttl_s=30)
    entry = store.add("ns", _v(1, 0), "p", "r")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        ttl_ms = client.pttl(f"{prefix}ns:e:{entry}")
    finally:
        client.close()
    assert 0 < ttl_ms <= 30_000


def test_redis_store_forgets_entry_when_deleted_behind_the_mirror(prefix: str) -> None:
    import redis

    store = RedisStore(REDIS_URL, prefix, ttl_s=0)
    entry = store.add("ns", _v(1, 0), "p", "r")
    assert store.search("ns", _v(1, 0), k=1)[0].id == entry
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(f"{prefix}ns:e:{entry}")  # as TTL expiry or another process's eviction would
    client.close()
    assert store.response("ns", entry) is None
    assert store.search("ns", _v(1, 0), k=1) == []


def test_semantic_cache_clear_deletes_only_its_namespace_when_redis_backed(prefix: str) -> None:
    a, b = (SemanticCache(SemanticCacheConfig(redis_url=REDIS_URL, key_prefix=prefix, namespace=n, ttl_s=60))
            for n in ("a", "b"))
    a.insert("llm", "p", _v(1, 0), "ra")
    b.insert("llm", "p", _v(1, 0), "rb")
    a.clear()
    assert all(k.startswith(f"{prefix}b|".encode()) for k in _keys(prefix)) and _keys(prefix)
    assert b.lookup("llm", "p", _v(1, 0)).response == "rb"


def test_redis_store_raises_cache_unavailable_when_server_unreachable() -> None:
    with pytest.raises(CacheUnavailable, match="unreachable"):
        RedisStore("redis://127.0.0.1:1/0", "trimflow-test:none:", timeout_s=0.2)
