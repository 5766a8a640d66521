"""A semantic response cache for text generation: near-duplicate prompts share one answer.

A prompt's embedding (from the ``encoder_embed`` model) is compared with cached prompts' embeddings;
the most similar entry above ``threshold`` answers, unless the guard sees that the two prompts
differ in negation or in a number ("... did not approve ..." / "... 40 ..." vs "... 45 ..."),
which cosine similarity alone barely notices (all-MiniLM-L6-v2 scores such pairs 0.80-0.99, above
most true paraphrases). Entries live in an in-process store (default) or in Redis when
``redis_url`` is set, shared by every gateway instance:

    cache = SemanticCache(SemanticCacheConfig(redis_url="redis://127.0.0.1:6379/0"))
    found = cache.lookup("llm|mt=16", prompt, vector)        # .status: hit | miss | guarded
    if found.status != "hit": cache.insert("llm|mt=16", prompt, vector, answer)

This module runs in two environments: the pipeline's (tests, benchmarks) and the Triton python
stub's, where ``semantic_gateway/model.py`` imports the copy written beside it. It therefore
imports only the standard library and numpy at module level (redis and tritonclient lazily).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Mapping, Protocol, Sequence

import numpy as np

try:
    from tasks.errors import ConfigError, ServingError
except ImportError:  # inside the Triton python stub, which has no `tasks` package

    class ConfigError(ValueError):  # type: ignore[no-redef]
        def __init__(self, where: str, value: object, problem: str) -> None:
            self.where, self.value, self.problem = where, value, problem
            super().__init__(f"invalid config {where}={value!r}: {problem}")

    class ServingError(RuntimeError):  # type: ignore[no-redef]
        pass


class CacheUnavailable(ServingError):
    """The cache's store failed (Redis down, timeout); callers answer uncached instead of failing."""


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SemanticCacheConfig:
    """How the semantic cache decides and where it keeps entries.

    Args:
        threshold: smallest cosine similarity between a prompt and a cached prompt for a hit
            (default 0.75; chosen on the dev split of ``serving/data/paraphrases.jsonl`` with
            all-MiniLM-L6-v2, see ``serving/data/README.md``).
        guard: refuse hits between prompts that differ in negation or numbers (default True).
        top_k: most similar entries examined per lookup; the best one the guard accepts wins (default 4).
        max_entries: entries kept per namespace; the oldest are evicted first (default 10000).
        ttl_s: seconds an entry lives; 0 keeps entries until evicted (default 3600: answers of an
            updated model age out within the hour).
        redis_url: ``redis://host:port/db`` of a shared store (default None: in-process store).
        key_prefix: prefix of every Redis key (default ``trimflow:semcache:``).
        namespace: extra namespace component; change it to start from an empty cache, e.g.
            after deploying a new encoder (default ``v1``).
        redis_timeout_s: socket timeout of Redis calls (default 0.5).
    """

    threshold: float = 0.75
    guard: bool = True
    top_k: int = 4
    max_entries: int = 10000
    ttl_s: float = 3600.0
    redis_url: str | None = None
    key_prefix: str = "trimflow:semcache:"
    namespace: str = "v1"
    redis_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        conv = {"threshold": float, "top_k": int, "max_entries": int, "ttl_s": float, "redis_timeout_s": float}
        for name, cast in conv.items():
            try:
                object.__setattr__(self, name, cast(getattr(self, name)))
            except (TypeError, ValueError):
                raise ConfigError(f"semantic_cache.{name}", getattr(self, name), f"must be a {cast.__name__}") from None
        if isinstance(self.guard, str):
            object.__setattr__(self, "guard", _parse_bool("semantic_cache.guard", self.guard))
        if not self.redis_url:
            object.__setattr__(self, "redis_url", None)
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError("semantic_cache.threshold", self.threshold, "must be a cosine similarity in [-1, 1]")
        if self.top_k < 1:
            raise ConfigError("semantic_cache.top_k", self.top_k, "must be >= 1")
        if self.max_entries < 1:
            raise ConfigError("semantic_cache.max_entries", self.max_entries, "must be >= 1")
        if self.ttl_s < 0:
            raise ConfigError("semantic_cache.ttl_s", self.ttl_s, "must be >= 0 (0: no expiry)")
        if self.redis_timeout_s <= 0:
            raise ConfigError("semantic_cache.redis_timeout_s", self.redis_timeout_s, "must be > 0")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("semantic_cache.redis_url", self.redis_url, "must start with redis://, rediss:// or unix://")
        if not self.namespace or "|" in self.namespace:
            raise ConfigError("semantic_cache.namespace", self.namespace, "must be non-empty without '|'")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], prefix: str = "cache_") -> "SemanticCacheConfig":
        """Build from string key/values (``config.pbtxt`` parameters), keys ``<prefix><field>``.

        Unknown ``<prefix>*`` keys are rejected, so a typo in a model config fails the load.
        """
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in params.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name not in names:
                raise ConfigError(key, value, f"unknown semantic cache parameter; known: {sorted(prefix + n for n in names)}")
            kwargs[name] = value
        return cls(**kwargs)

    def to_parameters(self, prefix: str = "cache_") -> dict[str, str]:
        """The inverse of ``from_parameters`` (``redis_url`` None becomes an empty string)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[prefix + f.name] = "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
        return out


def _parse_bool(where: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(where, value, "must be true/false")


# -- the guard --------------------------------------------------------------------------------------
# Sentence encoders place "X happened" and "X did not happen" (or "40" and "45") close together:
# on all-MiniLM-L6-v2 such pairs score 0.85-0.98, above most true paraphrases. The guard compares
# the two surface features that flip meaning without moving the embedding much.
NEGATION_CUES = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere", "cannot", "without",
})
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?")
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if w != "_"}
_SCALES = {"hundred": 100.0, "thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12, "dozen": 12.0,
           "bn": 1e9}


def _tokens(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # "twenty-five" reads as "twenty five"
    return _WORD.findall(text)


def negation_count(text: str) -> int:
    """Negation cues in ``text`` (``not``, ``never``, ``no`` ..., every ``n't``), ``not only`` excluded."""
    toks = _tokens(text)
    n = 0
    for i, t in enumerate(toks):
        if t.endswith("n't") or t in NEGATION_CUES:
            if t == "not" and i + 1 < len(toks) and toks[i + 1] == "only":
                continue  # "not only ... but also" asserts, it does not negate
            n += 1
    return n


def _number_at(toks: list[str], i: int) -> tuple[float | None, int]:
    """The number starting at ``toks[i]`` (scale words included) and the index after it."""
    t = toks[i]
    if t[0].isdigit():
        value = float(re.sub(r"(st|nd|rd|th)$", "", t).replace(",", ""))
        i += 1
    elif t in _UNITS:
        value, i = float(_UNITS[t]), i + 1
    elif t in _TENS:
        value, i = float(_TENS[t]), i + 1
        if i < len(toks) and 0 < _UNITS.get(toks[i], 0) < 10:  # "twenty five"
            value, i = value + _UNITS[toks[i]], i + 1
    elif t in ("a", "an") and i + 1 < len(toks) and toks[i + 1] in _SCALES:  # "a million", "a dozen"
        value, i = 1.0, i + 1
    else:
        return None, i + 1
    while i < len(toks) and toks[i] in _SCALES:  # "40 million", "three hundred thousand"
        value *= _SCALES[toks[i]]
        i += 1
    return value, i


def numbers(text: str) -> Counter:
    """The numeric values ``text`` mentions, as a multiset, written in digits or in words.

    ``$40 million``, ``40 million dollars`` and ``forty million`` all give 40000000; ``3%`` and
    ``3 percent`` give 3; ``1,200`` gives 1200; ``2nd`` gives 2. Ordinal words and fractions are
    not read (``first`` is mostly not a number).
    """
    toks = _tokens(text)
    values: Counter = Counter()
    i = 0
    while i < len(toks):
        value, i = _number_at(toks, i)
        if value is not None:
            values[round(value, 6)] += 1
    return values


def guard_conflict(a: str, b: str) -> str | None:
    """Why ``a`` and ``b`` must not share an answer (``negation`` / ``number``), or None."""
    if negation_count(a) != negation_count(b):
        return "negation"
    if numbers(a) != numbers(b):
        return "number"
    return None


# -- stores -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A cached prompt close to the query; its answer is fetched only if it is used."""

    id: str
    prompt: str
    similarity: float


class Store(Protocol):
    def add(self, namespace: str, vector: np.ndarray, prompt: str, response: str) -> str: ...

    def search(self, namespace: str, vector: np.ndarray, k: int) -> list[Candidate]: ...

    def response(self, namespace: str, entry_id: str) -> str | None: ...

    def clear(self, namespace_prefix: str = "") -> None: ...


def _unit(vector: np.ndarray) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n == 0.0:
        raise ValueError("embedding must be a finite, non-zero vector")
    return v / n


class _Ring:
    """Fixed-capacity vectors of one namespace: slot = insertion number mod capacity (FIFO eviction)."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.matrix = np.zeros((capacity, dim), np.float32)
        self.ids: list[str | None] = [None] * capacity
        self.prompts: list[str] = [""] * capacity
        self.expires = np.full(capacity, np.inf)
        self.slot_of: dict[str, int] = {}
        self.count = 0

    def put(self, entry_id: str, vector: np.ndarray, prompt: str, expires: float) -> str | None:
        """Store an entry; returns the id it evicted, if any."""
        slot = self.count % len(self.ids)
        old = self.ids[slot]
        if old is not None:
            self.slot_of.pop(old, None)
        self.matrix[slot], self.ids[slot], self.prompts[slot], self.expires[slot] = vector, entry_id, prompt, expires
        self.slot_of[entry_id] = slot
        self.count += 1
        return old

    def drop(self, entry_id: str) -> None:
        slot = self.slot_of.pop(entry_id, None)
        if slot is not None:
            self.ids[slot], self.expires[slot] = None, -np.inf

    def top(self, vector: np.ndarray, k: int, now: float) -> list[Candidate]:
        n = min(self.count, len(self.ids))
        if n == 0:
            return []
        if vector.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"embedding has {vector.shape[0]} dims, the cache holds {self.matrix.shape[1]}-dim "
                             f"vectors: use another namespace for another encoder")
        sims = self.matrix[:n] @ vector
        sims[self.expires[:n] <= now] = -np.inf  # expired and dropped slots never win
        k = min(k, n)
        best = np.argpartition(-sims, k - 1)[:k]
        best = best[np.argsort(-sims[best])]
        return [Candidate(self.ids[i], self.prompts[i], float(sims[i])) for i in best  # type: ignore[arg-type]
                if np.isfinite(sims[i])]


class EmbeddedStore:
    """Entries in this process's memory; each Triton model instance has its own.

    Args:
        max_entries: entries kept per namespace, oldest evicted first (default 10000).
        ttl_s: entry lifetime in seconds; 0 = until evicted (default 3600).
    """

    def __init__(self, max_entries: int = 10000, ttl_s: float = 3600.0) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._rings: dict[str, _Ring] = {}
        self._responses: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._next = 0

    def add(self, namespace: str, vector: np.ndarray, prompt: str, response: str) -> str:
        v = _unit(vector)
        with self._lock:
            ring = self._rings.get(namespace)
            if ring is None:
                ring = self._rings[namespace] = _Ring(v.shape[0], self.max_entries)
            responses = self._responses.setdefault(namespace, {})
            self._next += 1
            entry_id = str(self._next)
            evicted = ring.put(entry_id, v, prompt, time.time() + self.ttl_s if self.ttl_s else np.inf)
            if evicted is not None:
                responses.pop(evicted, None)
            responses[entry_id] = response
            return entry_id

    def search(self, namespace: str, vector: np.ndarray, k: int) -> list[Candidate]:
        with self._lock:
            ring = self._rings.get(namespace)
            return ring.top(_unit(vector), k, time.time()) if ring else []

    def response(self, namespace: str, entry_id: str) -> str | None:
        with self._lock:
            ring = self._rings.get(namespace)
            if ring is None or entry_id not in ring.slot_of:
                return None
            if ring.expires[ring.slot_of[entry_id]] <= time.time():
                ring.drop(entry_id)
                self._responses.get(namespace, {}).pop(entry_id, None)
                return None
            return self._responses.get(namespace, {}).get(entry_id)

    def clear(self, namespace_prefix: str = "") -> None:
        """Forget every namespace whose name starts with ``namespace_prefix`` (default: all)."""
        with self._lock:
            for ns in [n for n in self._rings if n.startswith(namespace_prefix)]:
                self._rings.pop(ns, None)
                self._responses.pop(ns, None)

    def size(self, namespace: str) -> int:
        ring = self._rings.get(namespace)
        return len(ring.slot_of) if ring else 0


# Insert atomically: the sequence number, the entry and its index position appear together, so a
# reader that syncs "everything after the last number I saw" never skips an entry written by a
# slower concurrent writer. Evicts the oldest entries past max_entries.
_ADD_LUA = """
local seq = redis.call('INCR', KEYS[1])
local key = ARGV[1] .. seq
redis.call('HSET', key, 'vec', ARGV[2], 'prompt', ARGV[3], 'response', ARGV[4])
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
redis.call('ZADD', KEYS[2], seq, seq)
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], extra)
  for i = 1, #old, 2 do redis.call('DEL', ARGV[1] .. old[i]) end
end
return seq
"""


class RedisStore:
    """Entries in Redis, shared by every gateway instance and replica.

    Plain Redis has no vector search, so each process mirrors the namespace's vectors (and
    prompts) in memory and pulls only the entries added since its last lookup; the answer is
    read from Redis when an entry wins, which also notices entries evicted or expired meanwhile.

    Keys: ``<prefix><ns>:seq`` (counter), ``<prefix><ns>:index`` (zset of entry numbers),
    ``<prefix><ns>:e:<n>`` (hash: vec, prompt, response; TTL ``ttl_s``).

    Args:
        url: ``redis://host:port/db``.
        key_prefix: prefix of every key (default ``trimflow:semcache:``).
        max_entries: entries kept per namespace (default 10000).
        ttl_s: entry lifetime; 0 = until evicted (default 3600).
        timeout_s: socket timeout (default 0.5).

    Raises:
        CacheUnavailable: Redis cannot be reached (at construction, ``PING``) or fails later.
    """

    def __init__(self, url: str, key_prefix: str = "trimflow:semcache:", max_entries: int = 10000,
                 ttl_s: float = 3600.0, timeout_s: float = 0.5) -> None:
        import redis

        self._errors = (redis.RedisError, OSError)
        self.key_prefix, self.max_entries, self.ttl_s = key_prefix, max_entries, ttl_s
        self._r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._url = url
        self._mirrors: dict[str, _Ring] = {}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        try:
            self._r.ping()
            self._add = self._r.register_script(_ADD_LUA)
        except self._errors as e:
            raise CacheUnavailable(f"semantic cache store {url} unreachable: {e}") from e

    def _k(self, namespace: str, *parts: str) -> str:
        return ":".join([self.key_prefix + namespace, *parts])

    def add(self, namespace: str, vector: np.ndarray, prompt: str, response: str) -> str:
        v = _unit(vector)
        try:
            seq = self._add(keys=[self._k(namespace, "seq"), self._k(namespace, "index")],
                            args=[self._k(namespace, "e", ""), v.tobytes(), prompt, response,
                                  int(self.ttl_s * 1000), self.max_entries])
        except self._errors as e:
            raise CacheUnavailable(f"semantic cache insert into {self._url} failed: {e}") from e
        return str(int(seq))

    def _sync(self, namespace: str, dim: int) -> _Ring:
        """Pull entries added since the last sync into the local mirror."""
        ring = self._mirrors.get(namespace)
        if ring is None:
            ring = self._mirrors[namespace] = _Ring(dim, self.max_entries)
        after = self._seen.get(namespace, 0)
        new = self._r.zrangebyscore(self._k(namespace, "index"), f"({after}", "+inf", withscores=True)
        if not new:
            return ring
        seqs = [int(score) for _, score in new]
        pipe = self._r.pipeline(transaction=False)
        for s in seqs:
            pipe.hmget(self._k(namespace, "e", str(s)), "vec", "prompt")
            pipe.pttl(self._k(namespace, "e", str(s)))
        rows = pipe.execute()
        now = time.time()
        for s, (vec, prompt), pttl in zip(seqs, rows[0::2], rows[1::2]):
            if vec is None:  # evicted or expired between the index read and the fetch
                continue
            expires = now + pttl / 1000 if pttl and pttl > 0 else np.inf
            ring.put(str(s), np.frombuffer(vec, np.float32), prompt.decode("utf-8"), expires)
        self._seen[namespace] = max(seqs)
        return ring

    def search(self, namespace: str, vector: np.ndarray, k: int) -> list[Candidate]:
        v = _unit(vector)
        with self._lock:
            try:
                ring = self._sync(namespace, v.shape[0])
            except self._errors as e:
                raise CacheUnavailable(f"semantic cache lookup in {self._url} failed: {e}") from e
            return ring.top(v, k, time.time())

    def response(self, namespace: str, entry_id: str) -> str | None:
        try:
            raw = self._r.hget(self._k(namespace, "e", entry_id), "response")
        except self._errors as e:
            raise CacheUnavailable(f"semantic cache read from {self._url} failed: {e}") from e
        if raw is None:
            with self._lock:
                ring = self._mirrors.get(namespace)
                if ring is not None:
                    ring.drop(entry_id)
            return None
        return raw.decode("utf-8")

    def clear(self, namespace_prefix: str = "") -> None:
        """Delete the keys of every namespace starting with ``namespace_prefix`` (default: all under the key prefix)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.key_prefix + namespace_prefix) + "*"
        try:
            batch = []
            for key in self._r.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    self._r.delete(*batch)
                    batch = []
            if batch:
                self._r.delete(*batch)
        except self._errors as e:
            raise CacheUnavailable(f"semantic cache clear in {self._url} failed: {e}") from e
        with self._lock:
            for ns in [n for n in self._mirrors if n.startswith(namespace_prefix)]:
                self._mirrors.pop(ns, None)
                self._seen.pop(ns, None)

    def close(self) -> None:
        self._r.close()


# -- the cache --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lookup:
    """The outcome of one lookup.

    Attributes:
        status: ``hit`` (``response`` answers the prompt), ``miss`` (nothing similar enough) or
            ``guarded`` (something was similar enough, but the guard refused every such entry).
        similarity: best similarity among the examined entries (-1.0 when the cache was empty).
        response: the cached answer of a hit.
        matched_prompt: the cached prompt that answered, or the best one the guard refused.
        reason: why the guard refused (``negation`` / ``number``), empty otherwise.
    """

    status: Literal["hit", "miss", "guarded"]
    similarity: float = -1.0
    response: str | None = None
    matched_prompt: str | None = None
    reason: str = ""


class SemanticCache:
    """Threshold + guard over a store.

    Args:
        config: thresholds and store settings (default ``SemanticCacheConfig()``).
        store: the store to use (default None: Redis when ``config.redis_url`` is set, else
            an ``EmbeddedStore``).
    """

    def __init__(self, config: SemanticCacheConfig | None = None, store: Store | None = None) -> None:
        self.config = config or SemanticCacheConfig()
        c = self.config
        if store is None:
            store = (RedisStore(c.redis_url, c.key_prefix, c.max_entries, c.ttl_s, c.redis_timeout_s)
                     if c.redis_url else EmbeddedStore(c.max_entries, c.ttl_s))
        self.store = store

    def _ns(self, namespace: str) -> str:
        return f"{self.config.namespace}|{namespace}"

    def lookup(self, namespace: str, prompt: str, vector: np.ndarray) -> Lookup:
        """The best cached answer for ``prompt`` in ``namespace``.

        Raises:
            CacheUnavailable: the store failed.
        """
        ns = self._ns(namespace)
        candidates = self.store.search(ns, vector, self.config.top_k)
        best = candidates[0].similarity if candidates else -1.0
        refused: tuple[Candidate, str] | None = None
        for cand in candidates:
            if cand.similarity < self.config.threshold:
                break
            reason = guard_conflict(prompt, cand.prompt) if self.config.guard else None
            if reason:
                refused = refused or (cand, reason)
                continue
            response = self.store.response(ns, cand.id)
            if response is None:  # evicted or expired since the search
                continue
            return Lookup("hit", cand.similarity, response, cand.prompt)
        if refused is not None:
            return Lookup("guarded", best, None, refused[0].prompt, refused[1])
        return Lookup("miss", best)

    def insert(self, namespace: str, prompt: str, vector: np.ndarray, response: str) -> str:
        """Cache ``response`` for ``prompt``; returns the entry id.

        Raises:
            CacheUnavailable: the store failed.
        """
        return self.store.add(self._ns(namespace), vector, prompt, response)

    def clear(self) -> None:
        """Forget every entry under this cache's ``config.namespace`` (other namespaces stay).

        Raises:
            CacheUnavailable: the store failed.
        """
        self.store.clear(self.config.namespace + "|")


# -- embeddings from the served encoder (pipeline environment) -------------------------------------
def embed_texts(url: str, model: str, texts: Sequence[str], batch_size: int = 32, timeout_s: float = 60.0,
                version: str | int = "") -> np.ndarray:
    """Embeddings of ``texts`` from an ``encoder_embed`` model over gRPC, ``[len(texts), H]`` float32.

    Args:
        url: ``host:port`` of the gRPC endpoint.
        model: the encoder's Triton model name.
        texts: texts to embed.
        batch_size: rows per request; at most the model's ``max_batch_size`` (default 32).
        timeout_s: per-request timeout (default 60).
        version: model version (default "": the server's choice).

    Raises:
        ServingError: the server refused a request or is unreachable.
    """
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    client = g.InferenceServerClient(url)
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            inp = g.InferInput("text", [len(chunk), 1], "BYTES")
            inp.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in chunk], dtype=np.object_))
            try:
                res = client.infer(model, [inp], model_version=str(version), client_timeout=timeout_s)
            except InferenceServerException as e:
                raise ServingError(f"embedding {len(chunk)} texts with {model} at {url} failed: {e.message()}") from e
            out.append(res.as_numpy("embedding"))
    finally:
        client.close()
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out).astype(np.float32)


def ask_gateway(url: str, model: str, prompts: Sequence[str], max_tokens: int | None = None,
                temperature: float | None = None, decoupled: bool = True,
                timeout_s: float = 120.0) -> list[tuple[str, str] | ServingError]:
    """Send each prompt to a ``semantic_gateway`` model as its own request, all in flight together.

    Args:
        url: ``host:port`` of the gRPC endpoint.
        model: the gateway's Triton model name.
        prompts: one request each.
        max_tokens / temperature: sent when not None (default None: the LLM's defaults).
        decoupled: the gateway's transaction policy; decoupled gateways are reached over a gRPC
            stream (default True).
        timeout_s: time to wait for all answers (default 120).

    Returns:
        Per prompt, in order: ``(text, cache_status)`` or the ``ServingError`` of that request.

    Raises:
        ServingError: some requests were not answered within ``timeout_s``.
    """
    import queue

    import tritonclient.grpc as g

    def inputs(prompt: str) -> list:
        ins = [g.InferInput("text_input", [1, 1], "BYTES")]
        ins[0].set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=np.object_))
        if max_tokens is not None:
            ins.append(g.InferInput("max_tokens", [1, 1], "INT32"))
            ins[-1].set_data_from_numpy(np.array([[max_tokens]], np.int32))
        if temperature is not None:
            ins.append(g.InferInput("temperature", [1, 1], "FP32"))
            ins[-1].set_data_from_numpy(np.array([[temperature]], np.float32))
        return ins

    def outcome(result, error) -> tuple[str, str] | ServingError:
        if error is not None:
            return ServingError(f"{model} at {url}: {error.message() if hasattr(error, 'message') else error}")
        text, status = (result.as_numpy(n).reshape(-1)[0] for n in ("text_output", "cache_status"))
        return text.decode("utf-8"), status.decode("utf-8")

    answers: queue.Queue = queue.Queue()
    client = g.InferenceServerClient(url)
    results: list = [None] * len(prompts)
    try:
        if decoupled:
            # tritonclient calls back with keyword arguments result= and error=; the request id
            # pairs each streamed answer with its prompt.
            client.start_stream(callback=lambda result=None, error=None: answers.put((result, error)))
            for i, p in enumerate(prompts):
                client.async_stream_infer(model, inputs(p), request_id=str(i))
        else:
            for i, p in enumerate(prompts):
                client.async_infer(model, inputs(p), lambda result=None, error=None, i=i: answers.put((i, result, error)),
                                   client_timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        for _ in prompts:
            try:
                item = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                missing = sum(r is None for r in results)
                raise ServingError(f"{missing} of {len(prompts)} requests to {model} at {url} unanswered "
                                   f"after {timeout_s:.0f}s") from None
            if decoupled:
                result, error = item
                if result is None:  # a stream error carries no request id; fail the first open slot
                    i = results.index(None)
                else:
                    i = int(result.get_response().id)
            else:
                i, result, error = item
            results[i] = outcome(result, error)
        return results
    finally:
        if decoupled:
            client.stop_stream()
        client.close()


_GATEWAY_METRIC = re.compile(r'^trimflow_semantic_cache_requests_total\{([^}]*)\}\s+([0-9.eE+]+)\s*$', re.M)


def gateway_counts(metrics_text: str, model: str) -> dict[str, int]:
    """The gateway's outcome counters (hit, miss, guarded, bypass, error) from Triton's Prometheus text."""
    counts: dict[str, int] = {}
    for labels, value in _GATEWAY_METRIC.findall(metrics_text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if lab.get("model") == model:
            counts[lab["result"]] = counts.get(lab["result"], 0) + int(float(value))
    return counts


def describe(config: SemanticCacheConfig) -> str:
    """One line for logs: where entries live and how hits are decided (never the URL's password)."""
    where = "embedded"
    if config.redis_url:
        where = "redis " + re.sub(r"//[^@/]*@", "//***@", config.redis_url)
    return json.dumps({"store": where, "threshold": config.threshold, "guard": config.guard,
                       "top_k": config.top_k, "ttl_s": config.ttl_s, "max_entries": config.max_entries})


# -- publishing the encoder and gateway models (pipeline environment) ------------------------------
# ModelRepository.write_version stages LLM exports (it requires trimflow_model.json and copies the
# generator); the encoder and the gateway have other files, so they are staged here and published
# with the same rules: a staging folder whose name Triton ignores, a marker written last, an atomic
# rename, and no overwriting of a version with other content.
SERVING_DIR = Path(__file__).resolve().parent
ENCODER_CODE = SERVING_DIR / "triton_models" / "encoder_embed"
GATEWAY_CODE = SERVING_DIR / "triton_models" / "semantic_gateway"
ENCODER_REQUIRED = ("tokenizer.json", "trimflow_encoder.json")


def write_encoder_version(repository, name: str, version: int, export_dir) -> dict:
    """Publish an encoder export as ``<name>/<version>`` of a local repository (idempotent).

    Args:
        repository: a ``serving.repository.ModelRepository`` on a local folder.
        name: Triton model name.
        version: version number (>= 1).
        export_dir: the encoder export (``model.onnx``, ``tokenizer.json``, ``trimflow_encoder.json``).

    Returns:
        ``{uri, digest, reused, files}``.

    Raises:
        DeployError: the export lacks files, the version exists with other content, or the
            repository is on S3 (not supported for these models yet).
    """
    from tasks.errors import DeployError

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "trimflow_encoder.json").read_text()) \
        if (export_dir / "trimflow_encoder.json").is_file() else {}
    if meta.get("format", "trimflow-encoder/1") != "trimflow-encoder/1":
        raise DeployError(f"{export_dir}: format {meta.get('format')!r} is not served by encoder_embed, which "
                          f"runs single-graph trimflow-encoder/1 exports")
    onnx_name = meta.get("onnx_file", "model.onnx")
    missing = [n for n in ENCODER_REQUIRED + (onnx_name,) if not (export_dir / n).is_file()]
    if missing:
        raise DeployError(f"cannot build an encoder version from {export_dir}: missing {', '.join(missing)}")
    files = {n: export_dir / n for n in ENCODER_REQUIRED + (onnx_name,)}
    if (export_dir / f"{onnx_name}.data").is_file():
        files[f"{onnx_name}.data"] = export_dir / f"{onnx_name}.data"
    files["model.py"] = ENCODER_CODE / "model.py"
    return _publish(repository, name, version, files, source=str(export_dir))


def write_gateway_version(repository, name: str, version: int) -> dict:
    """Publish the semantic gateway's code (``model.py`` + this module) as ``<name>/<version>``.

    Returns and raises as ``write_encoder_version``.
    """
    files = {"model.py": GATEWAY_CODE / "model.py", "semantic_cache.py": Path(__file__).resolve()}
    return _publish(repository, name, version, files, source=str(GATEWAY_CODE))


def _publish(repository, name: str, version: int, files: dict, source: str) -> dict:
    import os
    import shutil
    import tempfile

    from serving.repository import MARKER
    from tasks.errors import DeployError
    from tasks.store import tree_digest

    if repository.is_s3:
        raise DeployError(f"publishing {name} to {repository.root}: only local repositories are supported for "
                          f"encoder/gateway models")
    version = int(version)
    if version < 1:
        raise DeployError(f"Triton versions start at 1, got {version} for {name}")
    model_dir = Path(repository.root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    # WAR: Triton reads any sub-folder whose name starts with digits as a version; staging starts with '.'.
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        for rel, src in sorted(files.items()):
            shutil.copy2(src, staging / rel)
        digest = tree_digest(staging)
        existing = repository.marker(name, version)
        if existing is not None and existing.get("digest") == digest:
            return {"uri": repository.uri(name, version), "digest": digest, "reused": True, "files": sorted(files)}
        target = model_dir / str(version)
        if existing is not None or target.exists():
            raise DeployError(f"refusing to overwrite {target}: it exists with other content "
                              f"(Triton versions are immutable; use a new version number)")
        marker = {"model": name, "version": version, "digest": digest, "files": sorted(files), "source": source,
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        os.rename(staging, target)
        return {"uri": str(target), "digest": digest, "reused": False, "files": sorted(files)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
