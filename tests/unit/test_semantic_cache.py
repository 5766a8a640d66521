"""The semantic cache without a server: guard, embedded store, thresholds, config, paraphrase set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from serving import semantic_cache as sc
from serving.semantic_cache import (EmbeddedStore, SemanticCache, SemanticCacheConfig, guard_conflict,
                                    negation_count, numbers)
from tasks.errors import ConfigError

DATA = Path(__file__).resolve().parents[2] / "serving" / "data"


def _vec(*xs: float) -> np.ndarray:
    return np.array(xs, np.float32)


# -- guard ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The council approved the budget", 0),
    ("The council did not approve the budget", 1),
    ("The council didn't approve the budget", 1),
    ("The council didn\u2019t approve the budget", 1),  # typographic apostrophe
    ("No one was hurt and nothing was lost", 2),
    ("It was not only cheap but also fast", 0),
    ("They cannot and will never agree", 2),
])
def test_negation_count_counts_cues_when_text_has(text: str, expected: int) -> None:
    assert negation_count(text) == expected


@pytest.mark.parametrize("a, b", [
    ("a $40 million budget", "40 million dollars"),
    ("forty million dollars", "$40,000,000"),
    ("sales rose 3%", "sales rose three percent"),
    ("twenty-five people", "25 people"),
    ("a dozen eggs", "12 eggs"),
    ("1,200 jobs", "1200 jobs"),
    ("her 2nd term", "her 2 terms"),
])
def test_numbers_equal_when_same_value_is_written_differently(a: str, b: str) -> None:
    assert numbers(a) == numbers(b) and numbers(a)


def test_numbers_is_a_multiset_when_values_repeat() -> None:
    assert numbers("3 votes to 3") == Counter({3.0: 2})
    assert numbers("3 votes to 3") != numbers("3 votes")


@pytest.mark.parametrize("a, b, reason", [
    ("Summarize why the council approved 5 roads", "Summarize why the council did not approve 5 roads", "negation"),
    ("Summarize why the council approved 5 roads", "Summarize why the council approved 6 roads", "number"),
    ("Shares rose 12% in 2024", "Shares rose 12% in 2025", "number"),
    ("Summarize why the council approved 5 roads", "Give me a summary of why the council okayed five roads", None),
])
def test_guard_conflict_names_the_flip_when_prompts_differ(a: str, b: str, reason: str | None) -> None:
    assert guard_conflict(a, b) == reason


# -- embedded store ---------------------------------------------------------------------------------
def test_embedded_store_evicts_oldest_when_full() -> None:
    store = EmbeddedStore(max_entries=2, ttl_s=0)
    store.add("ns", _vec(1, 0), "first", "r1")
    store.add("ns", _vec(0, 1), "second", "r2")
    store.add("ns", _vec(1, 1), "third", "r3")
    prompts = {c.prompt for c in store.search("ns", _vec(1, 0), k=5)}
    assert prompts == {"second", "third"} and store.size("ns") == 2


def test_embedded_store_drops_entry_when_ttl_passed(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(sc.time, "time", lambda: now[0])
    store = EmbeddedStore(max_entries=4, ttl_s=10)
    entry = store.add("ns", _vec(1, 0), "p", "r")
    assert store.response("ns", entry) == "r"
    now[0] += 11
    assert store.search("ns", _vec(1, 0), k=1) == [] and store.response("ns", entry) is None


def test_embedded_store_ranks_by_cosine_when_vectors_are_not_normalised() -> None:
    store = EmbeddedStore(ttl_s=0)
    store.add("ns", _vec(10, 0), "x", "rx")
    store.add("ns", _vec(1, 1), "xy", "rxy")
    got = store.search("ns", _vec(3, 0.1), k=2)
    assert [c.prompt for c in got] == ["x", "xy"]
    assert got[0].similarity == pytest.approx(float(_vec(3, 0.1)[0] / np.linalg.norm(_vec(3, 0.1))), abs=1e-6)


@pytest.mark.parametrize("vector, match", [(_vec(0, 0), "non-zero"), (_vec(1, 0, 0), "dims")])
def test_embedded_store_raises_when_vector_is_unusable(vector: np.ndarray, match: str) -> None:
    store = EmbeddedStore(ttl_s=0)
    store.add("ns", _vec(1, 0), "p", "r")
    with pytest.raises(ValueError, match=match):
        store.search("ns", vector, k=1)


# -- the cache --------------------------------------------------------------------------------------
def _cache(**cfg) -> SemanticCache:
    return SemanticCache(SemanticCacheConfig(**{"ttl_s": 0, **cfg}))


def test_semantic_cache_hits_when_prompt_is_close_and_guard_agrees() -> None:
    cache = _cache(threshold=0.9)
    cache.insert("llm", "Summarize the budget vote", _vec(1, 0.1), "answer")
    found = cache.lookup("llm", "Give a summary of the budget vote", _vec(1, 0.12))
    assert (found.status, found.response, found.matched_prompt) == ("hit", "answer", "Summarize the budget vote")


def test_semantic_cache_misses_when_similarity_below_threshold() -> None:
    cache = _cache(threshold=0.9)
    cache.insert("llm", "Summarize the budget vote", _vec(1, 0), "answer")
    found = cache.lookup("llm", "Describe the weather", _vec(0.5, 1))
    assert found.status == "miss" and found.similarity == pytest.approx(0.5 / np.sqrt(1.25), abs=1e-6)


@pytest.mark.parametrize("guard, status", [(True, "guarded"), (False, "hit")])
def test_semantic_cache_refuses_number_flip_when_guard_on_even_at_similarity_one(guard: bool, status: str) -> None:
    cache = _cache(threshold=0.5, guard=guard)
    cache.insert("llm", "Why did 5 towns flood?", _vec(1, 0), "five")
    found = cache.lookup("llm", "Why did 6 towns flood?", _vec(1, 0))
    assert found.status == status
    assert found.reason == ("number" if guard else "")


def test_semantic_cache_takes_next_candidate_when_best_is_guarded() -> None:
    cache = _cache(threshold=0.8, top_k=3)
    cache.insert("llm", "Why did the council not approve 5 roads?", _vec(1, 0), "negated")
    cache.insert("llm", "Why did the council approve 5 roads?", _vec(0.95, 0.2), "plain")
    found = cache.lookup("llm", "Why did the council approve five roads?", _vec(1, 0.01))
    assert (found.status, found.response) == ("hit", "plain")


def test_semantic_cache_keeps_namespaces_apart_when_same_prompt() -> None:
    cache = _cache()
    cache.insert("llm|mt=16", "p", _vec(1, 0), "short")
    assert cache.lookup("llm|mt=64", "p", _vec(1, 0)).status == "miss"
    assert cache.lookup("llm|mt=16", "p", _vec(1, 0)).response == "short"


def test_semantic_cache_clear_forgets_only_own_namespace_when_store_shared() -> None:
    store = EmbeddedStore(ttl_s=0)
    mine, other = (SemanticCache(SemanticCacheConfig(namespace=n, ttl_s=0), store) for n in ("a", "b"))
    mine.insert("llm", "p", _vec(1, 0), "ra")
    other.insert("llm", "p", _vec(1, 0), "rb")
    mine.clear()
    assert mine.lookup("llm", "p", _vec(1, 0)).status == "miss"
    assert other.lookup("llm", "p", _vec(1, 0)).response == "rb"


# -- config -----------------------------------------------------------------------------------------
def test_semantic_cache_config_converts_strings_when_read_from_model_parameters() -> None:
    cfg = SemanticCacheConfig.from_parameters({"cache_threshold": "0.9", "cache_guard": "false", "cache_top_k": "2",
                                               "cache_redis_url": "", "encoder_model": "ignored"})
    assert (cfg.threshold, cfg.guard, cfg.top_k, cfg.redis_url) == (0.9, False, 2, None)
    assert SemanticCacheConfig.from_parameters(cfg.to_parameters()) == cfg


@pytest.mark.parametrize("params, where", [
    ({"cache_threshold": "1.5"}, "semantic_cache.threshold"),
    ({"cache_threshold": "high"}, "semantic_cache.threshold"),
    ({"cache_guard": "maybe"}, "semantic_cache.guard"),
    ({"cache_redis_url": "127.0.0.1:6379"}, "semantic_cache.redis_url"),
    ({"cache_ttl_s": "-1"}, "semantic_cache.ttl_s"),
    ({"cache_treshold": "0.9"}, "cache_treshold"),
])
def test_semantic_cache_config_raises_config_error_when_value_is_bad(params: dict, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        SemanticCacheConfig.from_parameters(params)
    assert e.value.where == where


def test_describe_hides_redis_password_when_url_has_one() -> None:
    text = sc.describe(SemanticCacheConfig(redis_url="redis://user:s3cret@10.0.0.5:6379/0"))
    assert "s3cret" not in text and "10.0.0.5" in text


# -- the paraphrase set -----------------------------------------------------------------------------
def _pairs() -> list[dict]:
    return [json.loads(line) for line in (DATA / "paraphrases.jsonl").read_text().splitlines()]


def test_paraphrase_set_matches_its_builder_when_rebuilt() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_paraphrases", DATA / "build_paraphrases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    assert mod.build() == _pairs()


def test_paraphrase_set_has_hundreds_of_pairs_per_split_when_loaded() -> None:
    pairs = _pairs()
    kinds = Counter((p["kind"], p["split"]) for p in pairs)
    assert len(pairs) >= 300 and all(kinds[(k, s)] >= 30 for k in ("paraphrase", "negation", "number")
                                     for s in ("dev", "test"))
    by_group = {}
    for p in pairs:
        by_group.setdefault(p["group"], set()).add(p["split"])
    assert all(len(s) == 1 for s in by_group.values()), "a fact must not be in both splits"


def test_paraphrase_set_flips_really_differ_when_kind_is_negation_or_number() -> None:
    # Data sanity, not a guard test: a "number" pair whose numbers were not changed would be a paraphrase.
    for p in _pairs():
        if p["kind"] == "number":
            assert numbers(p["a"]) != numbers(p["b"]), p["id"]
        if p["kind"] == "negation":
            assert p["a"] != p["b"] and numbers(p["a"]) == numbers(p["b"]), p["id"]


def test_semantic_eval_scores_hits_wrong_entries_and_flips_when_embeddings_are_controlled() -> None:
    from benchmarks.serving_caches import semantic_eval

    pairs = [
        {"group": "g1", "kind": "paraphrase", "variant": "v", "a": "Summarize the vote", "b": "Sum up the vote"},
        {"group": "g2", "kind": "paraphrase", "variant": "v", "a": "Explain the flood", "b": "Why the flood?"},
        {"group": "g1", "kind": "number", "variant": "v", "a": "Summarize the vote", "b": "Summarize the 2 votes"},
        {"group": "g2", "kind": "negation", "variant": "v", "a": "Explain the flood", "b": "Explain no flood"},
    ]
    vectors = {"Summarize the vote": (1, 0, 0), "Sum up the vote": (0.99, 0.1, 0),
               "Explain the flood": (0, 1, 0), "Why the flood?": (0.98, 0, 0.1),  # closest to g1: wrong entry
               "Summarize the 2 votes": (1, 0, 0), "Explain no flood": (0, 1, 0)}

    def embed(texts):
        return np.array([vectors[t] for t in texts], np.float32)

    guarded = semantic_eval(pairs, embed, threshold=0.9)
    assert (guarded["hit_rate"], guarded["paraphrase_wrong_entry_rate"], guarded["wrong_hit_rate"]) == (0.5, 0.5, 0.0)
    unguarded = semantic_eval(pairs, embed, threshold=0.9, guard=False)
    assert unguarded["wrong_hit_rate"] == 1.0
