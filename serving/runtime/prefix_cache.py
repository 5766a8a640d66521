"""A bounded LRU cache of KV state for shared prompt prefixes (system prompts, few-shot blocks).

Prompts are cut into blocks of ``block_tokens`` token ids; block ``i`` is keyed by a hash
chained over blocks ``0..i``, so a key names the whole prefix up to that block and a stored
KV slice is exact for any prompt that starts with the same tokens. A request whose prompt
starts with cached blocks prefills only the rest:

    cache = PrefixCache(block_tokens=16, max_bytes=256 << 20)
    n, past = cache.match(prompt_ids, limit=len(prompt_ids) - 1)   # past: 2*layers arrays [1, H, n, D]
    cache.insert(prompt_ids, present)                              # after the prefill of the whole prompt

Runs in the Triton python stub: numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class PrefixCacheConfigError(ValueError):
    """An impossible cache setting (the stub has no ``tasks`` package, hence a local ValueError)."""


@dataclass
class _Block:
    tokens: tuple[int, ...]  # kept to rule out hash collisions: a match compares them
    kv: tuple[np.ndarray, ...]  # 2*layers arrays [H, block, D], contiguous copies
    nbytes: int


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since the cache was made.

    Attributes:
        lookups: ``match`` calls.
        hits: lookups that reused at least one block.
        hit_tokens: prompt tokens not prefilled thanks to the cache.
        inserted_blocks / evicted_blocks: blocks stored / dropped for the byte budget.
        blocks / bytes: what is stored now.
    """

    lookups: int
    hits: int
    hit_tokens: int
    inserted_blocks: int
    evicted_blocks: int
    blocks: int
    bytes: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class PrefixCache:
    """Block-hashed token prefixes → stored KV slices, least recently used dropped first.

    Eviction never orphans a block: every time a chain is used its blocks are touched from the
    deepest to the first, so a parent is always more recent than its children and the least
    recently used block is a leaf.

    Args:
        block_tokens: tokens per block; prefixes are reused in whole blocks (default 16).
        max_bytes: budget for stored KV bytes; 0 stores nothing (default 256 MiB).
    """

    def __init__(self, block_tokens: int = 16, max_bytes: int = 256 << 20) -> None:
        if block_tokens < 1:
            raise PrefixCacheConfigError(f"block_tokens={block_tokens} must be >= 1")
        if max_bytes < 0:
            raise PrefixCacheConfigError(f"max_bytes={max_bytes} must be >= 0")
        self.block_tokens = int(block_tokens)
        self.max_bytes = int(max_bytes)
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._bytes = 0
        self._lookups = self._hits = self._hit_tokens = self._inserted = self._evicted = 0

    # -- keys ------------------------------------------------------------------------------
    def _keys(self, tokens: Sequence[int], n_blocks: int) -> list[bytes]:
        keys, prev = [], b""
        bt = self.block_tokens
        arr = np.asarray(tokens[: n_blocks * bt], dtype=np.int64)
        for i in range(n_blocks):
            prev = hashlib.blake2b(prev + arr[i * bt:(i + 1) * bt].tobytes(), digest_size=16).digest()
            keys.append(prev)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        for k in reversed(keys):  # deepest first, so the first block ends most recent
            self._blocks.move_to_end(k)

    # -- use -------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int | None = None) -> tuple[int, list[np.ndarray] | None]:
        """The longest cached block-aligned prefix of ``tokens`` of at most ``limit`` tokens.

        Args:
            tokens: the prompt's token ids.
            limit: most tokens to reuse (default None: all of them). A caller that needs the
                logits of the last prompt token passes ``len(tokens) - 1``.

        Returns:
            ``(n, past)``: ``n`` reused tokens and their KV as ``2*layers`` arrays ``[1, H, n, D]``
            (the decoder's past inputs), or ``(0, None)``.
        """
        self._lookups += 1
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        n_blocks = max(0, limit) // self.block_tokens
        found: list[bytes] = []
        for i, key in enumerate(self._keys(tokens, n_blocks)):
            block = self._blocks.get(key)
            bt = self.block_tokens
            if block is None or block.tokens != tuple(int(t) for t in tokens[i * bt:(i + 1) * bt]):
                break
            found.append(key)
        if not found:
            return 0, None
        self._touch(found)
        blocks = [self._blocks[k] for k in found]
        past = [np.concatenate([b.kv[j] for b in blocks], axis=1)[None] for j in range(len(blocks[0].kv))]
        n = len(found) * self.block_tokens
        self._hits += 1
        self._hit_tokens += n
        return n, past

    def insert(self, tokens: Sequence[int], kv: Sequence[np.ndarray], row: int = 0) -> int:
        """Store every whole block of ``tokens`` whose KV ``kv`` holds; returns the blocks added.

        Args:
            tokens: token ids whose KV is in ``kv`` (position ``i`` of ``kv`` is token ``i``).
            kv: ``2*layers`` arrays ``[B, H, T, D]`` with ``T >= len(tokens)`` (the present
                outputs of a prefill, unpadded).
            row: batch row of ``kv`` that belongs to ``tokens`` (default 0).
        """
        if self.max_bytes == 0 or not kv:
            return 0
        bt = self.block_tokens
        n_blocks = min(len(tokens), kv[0].shape[2]) // bt
        keys = self._keys(tokens, n_blocks)
        added = 0
        for i, key in enumerate(keys):
            if key in self._blocks:
                continue
            parts = tuple(np.ascontiguousarray(a[row, :, i * bt:(i + 1) * bt]) for a in kv)
            nbytes = sum(p.nbytes for p in parts)
            if nbytes > self.max_bytes:
                break  # one block alone exceeds the budget; nothing deeper can be stored either
            self._blocks[key] = _Block(tuple(int(t) for t in tokens[i * bt:(i + 1) * bt]), parts, nbytes)
            self._bytes += nbytes
            self._inserted += 1
            added += 1
        self._touch([k for k in keys if k in self._blocks])
        while self._bytes > self.max_bytes and self._blocks:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= old.nbytes
            self._evicted += 1
        return added

    def clear(self) -> None:
        self._blocks.clear()
        self._bytes = 0

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._lookups, self._hits, self._hit_tokens, self._inserted, self._evicted,
                                len(self._blocks), self._bytes)

    def __len__(self) -> int:
        return len(self._blocks)
