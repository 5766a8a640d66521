"""The KV-prefix cache: exact reuse of block-aligned prefixes, the byte budget, LRU order, and the
batcher prefilling only the uncached rest with unchanged output."""

from __future__ import annotations

import numpy as np
import pytest

from serving.runtime.continuous import BatcherConfig, ContinuousBatcher, SamplingParams
from serving.runtime.generator import OnnxCausalLM
from serving.runtime.prefix_cache import PrefixCache, PrefixCacheConfigError

LAYERS, HEADS, DIM = 2, 2, 3


def _kv(tokens: list[int]) -> list[np.ndarray]:
    """KV whose values identify (token, position, layer slot): a wrong slice cannot look right."""
    t = np.asarray(tokens, np.float32)
    pos = np.arange(len(tokens), dtype=np.float32)
    out = []
    for j in range(2 * LAYERS):
        a = np.broadcast_to((t * 1000 + pos * 10 + j)[None, None, :, None], (1, HEADS, len(tokens), DIM))
        out.append(np.ascontiguousarray(a))
    return out


def test_prefix_cache_returns_stored_kv_when_prompt_shares_whole_blocks() -> None:
    cache = PrefixCache(block_tokens=4, max_bytes=1 << 20)
    first = list(range(1, 12))  # 11 tokens: two whole blocks stored
    cache.insert(first, _kv(first))
    second = first[:9] + [99, 98, 97]  # shares 9 tokens: two whole blocks
    n, past = cache.match(second, limit=len(second) - 1)
    assert n == 8
    want = _kv(first)
    assert len(past) == 2 * LAYERS and all(np.array_equal(p, w[:, :, :8]) for p, w in zip(past, want))
    assert cache.stats().hits == 1 and cache.stats().hit_tokens == 8


def test_prefix_cache_reuses_nothing_when_first_block_differs() -> None:
    cache = PrefixCache(block_tokens=4, max_bytes=1 << 20)
    tokens = list(range(1, 9))
    cache.insert(tokens, _kv(tokens))
    assert cache.match([0] + tokens[1:]) == (0, None)
    # The same tokens in a later block do not match either: keys chain over the whole prefix.
    assert cache.match([5, 6, 7, 8] + tokens) == (0, None)


def test_prefix_cache_stops_at_limit_when_whole_prompt_is_cached() -> None:
    cache = PrefixCache(block_tokens=4, max_bytes=1 << 20)
    tokens = list(range(1, 9))
    cache.insert(tokens, _kv(tokens))
    assert cache.match(tokens)[0] == 8
    assert cache.match(tokens, limit=7)[0] == 4  # the last token must be run for its logits


def test_prefix_cache_drops_least_recent_leaf_first_when_over_budget() -> None:
    block_bytes = 2 * LAYERS * HEADS * 4 * DIM * 4
    cache = PrefixCache(block_tokens=4, max_bytes=3 * block_bytes)
    shared = [1, 2, 3, 4]
    a, b = shared + [5, 6, 7, 8], shared + [9, 10, 11, 12]
    cache.insert(a, _kv(a))
    cache.insert(b, _kv(b))  # 3 blocks: shared root, a's leaf, b's leaf
    assert cache.stats().bytes == 3 * block_bytes and cache.stats().evicted_blocks == 0
    c = [20, 21, 22, 23]
    cache.insert(c, _kv(c))  # a fourth block: a's leaf is the least recent
    assert cache.stats().evicted_blocks == 1 and cache.stats().bytes <= 3 * block_bytes
    assert cache.match(a)[0] == 4 and cache.match(b)[0] == 8 and cache.match(c)[0] == 4


def test_prefix_cache_stores_nothing_when_budget_is_zero() -> None:
    cache = PrefixCache(block_tokens=4, max_bytes=0)
    tokens = list(range(8))
    assert cache.insert(tokens, _kv(tokens)) == 0 and len(cache) == 0


@pytest.mark.parametrize("kwargs", [{"block_tokens": 0}, {"max_bytes": -1}])
def test_prefix_cache_raises_when_config_is_impossible(kwargs) -> None:
    with pytest.raises(PrefixCacheConfigError):
        PrefixCache(**kwargs)


# -- the batcher with a cache, on a tiny exported decoder ------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> OnnxCausalLM:
    from tasks.config import ExportConfig
    from tasks.export import export_causal_lm
    from tests.tiny import make_tiny_llm

    root = tmp_path_factory.mktemp("tiny-prefix")
    export_causal_lm(make_tiny_llm(root / "hf", layers=2), root / "export", ExportConfig())
    return OnnxCausalLM(root / "export", threads=1)


SYSTEM = "The city council voted on Tuesday to approve the new budget for schools and roads. "


def test_prefix_cache_gives_same_tokens_with_fewer_prefill_tokens_when_requests_share_a_system_prompt(
        tiny_lm) -> None:
    prompts = [tiny_lm.encode(SYSTEM + q) for q in ("Shares rose.", "The president said", "Heavy rain")]

    def run(cache):
        b = ContinuousBatcher(tiny_lm, BatcherConfig(max_batch=1), prefix_cache=cache)
        out, reused = [], []
        for i, p in enumerate(prompts):  # one after the other, as separate conversations arrive
            b.submit(str(i), p, SamplingParams(max_tokens=8, ignore_eos=True))
            evs = []
            while b.has_work():
                evs += b.step()
            out.append([t for e in evs for t in e.token_ids])
            reused.append(evs[0].cached_tokens)
        return out, reused, b.stats()

    plain, plain_reused, plain_stats = run(None)
    cached, reused, stats = run(PrefixCache(block_tokens=8, max_bytes=8 << 20))
    assert cached == plain
    assert plain_reused == [0, 0, 0] and reused[0] == 0 and min(reused[1:]) > 0
    shared = len(tiny_lm.encode(SYSTEM)) // 8 * 8
    assert stats["cached_tokens"] >= 2 * (shared - 8) and stats["cached_tokens"] > 0
    assert stats["prefill_tokens"] == plain_stats["prefill_tokens"] - stats["cached_tokens"]
