"""Continuous (iteration-level) batching over the ONNX decoder-with-past contract.

Requests join the running batch at any decode step once their prompt is prefilled, and leave
it the step they finish, so a short request never waits for a long one. Each step yields
``Event``s with the new text of every request that advanced:

    batcher = ContinuousBatcher(OnnxCausalLM(model_dir), BatcherConfig(max_batch=8))
    batcher.submit("r1", batcher.lm.encode("The council voted to"), SamplingParams(max_tokens=16))
    while batcher.has_work(): events = batcher.step()

Rows of the batch hold different amounts of KV state; the batch's past is as long as the
longest row and shorter rows are left-padded with zeros that the attention mask hides. Only
numpy and the generator's ``forward`` are used, so it runs in the Triton python stub.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

FINISH_STOP = "stop"  # EOS token or a stop sequence
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


class RequestError(ValueError):
    """A problem with one request's input: that request is refused, the batch carries on."""


class CausalLM(Protocol):
    """What the batcher needs of a model (``serving.runtime.generator.OnnxCausalLM`` has it)."""

    meta: object  # num_layers, num_kv_heads, head_dim, eos_token_ids, max_positions, past_dtype

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def empty_past(self, batch: int) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Args:
        max_tokens: most new tokens (default 16).
        temperature: 0 is greedy; above 0 samples (default 0.0).
        top_p: nucleus sampling mass, in (0, 1] (default 1.0).
        stop: strings that end the output; the matched string is not returned (default none).
        seed: sampling seed; the same seed gives the same tokens whatever else is in the batch
            (default None: fresh entropy).
        ignore_eos: keep generating past EOS until ``max_tokens`` (default False; benchmarks
            use it to fix output lengths).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, (int, np.integer)) or self.max_tokens < 1:
            raise RequestError(f"max_tokens={self.max_tokens} must be an integer >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature={self.temperature} must be a finite number >= 0")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p={self.top_p} must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop={list(self.stop)!r}: stop sequences must be non-empty strings")


@dataclass(frozen=True)
class BatcherConfig:
    """Scheduling limits.

    Args:
        max_batch: rows decoding together; a request waits for a free row (default 8).
        max_prefill_tokens: prompt tokens prefilled per step before the decode step runs. A
            longer prompt is prefilled in chunks over several steps, so running rows keep
            getting a token every step (default 256).
        max_waiting: requests allowed to wait for a row; more are refused (default 256).
        max_tokens_limit: largest ``max_tokens`` a request may ask for (default 512).
    """

    max_batch: int = 8
    max_prefill_tokens: int = 256
    max_waiting: int = 256
    max_tokens_limit: int = 512

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_prefill_tokens", "max_waiting", "max_tokens_limit"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BatcherConfig.{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class Event:
    """What one request got from one step.

    Attributes:
        request_id: the id given to ``submit``.
        text: new text since the request's previous event ("" when held back: an incomplete
            UTF-8 character, or what could be the start of a stop sequence).
        token_ids: new token ids (EOS excluded).
        finished: the request's last event.
        finish_reason: ``stop``, ``length``, ``cancelled`` or ``error`` when finished.
        error: the failure message when ``finish_reason`` is ``error``.
        batch_rows: rows in the decode step that produced it (0 for a prefill-only event).
        cached_tokens: prompt tokens taken from the prefix cache (first event only).
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    batch_rows: int = 0
    cached_tokens: int = 0


@dataclass
class _Seq:
    id: str
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    past: list[np.ndarray] | None = None  # the prompt's KV while it is being prefilled
    prefilled: int = 0  # prompt tokens whose KV exists
    cached_tokens: int = 0

    @property
    def kv_len(self) -> int:
        # The last sampled token has not been fed to the model yet.
        return len(self.prompt) + len(self.generated) - 1


class ContinuousBatcher:
    """Iteration-level scheduler: prefill new requests, then one decode step for every row.

    ``submit`` and ``cancel`` may be called from any thread; ``step`` from one thread only.

    Args:
        lm: the model (``OnnxCausalLM`` or anything with its ``forward``/``empty_past``/``decode``).
        config: scheduling limits (default ``BatcherConfig()``).
        prefix_cache: a ``PrefixCache`` to reuse KV of shared prompt prefixes (default None: off).
    """

    def __init__(self, lm: CausalLM, config: BatcherConfig | None = None, prefix_cache=None) -> None:
        self.lm = lm
        self.config = config or BatcherConfig()
        self.prefix_cache = prefix_cache
        meta = lm.meta
        self._eos = frozenset(int(e) for e in meta.eos_token_ids)
        self._max_positions = int(meta.max_positions)
        self._lock = threading.Condition()
        self._inbox: deque[_Seq] = deque()
        self._cancels: set[str] = set()
        self._known: set[str] = set()  # ids submitted and not yet finished
        self._waiting: deque[_Seq] = deque()
        self._prefilling: _Seq | None = None
        self._rows: list[_Seq] = []
        self._past: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)
        self._counters = {"steps": 0, "decode_steps": 0, "decode_rows": 0, "max_rows": 0, "joined": 0,
                          "joined_running": 0, "finished": 0, "cancelled": 0, "failed": 0,
                          "prefill_tokens": 0, "cached_tokens": 0}

    # -- thread-safe entry points ----------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> None:
        """Queue a request; it joins the batch at a later ``step``.

        Raises:
            RequestError: empty or too long a prompt, ``max_tokens`` over the limit, a duplicate
                id, or the queue is full. Nothing is queued then.
        """
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise RequestError("empty prompt: at least one token is needed")
        if params.max_tokens > self.config.max_tokens_limit:
            raise RequestError(f"max_tokens={params.max_tokens} exceeds the limit {self.config.max_tokens_limit}")
        if len(ids) + params.max_tokens > self._max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the "
                               f"model's {self._max_positions} positions")
        seq = _Seq(request_id, ids, params, np.random.default_rng(params.seed))
        with self._lock:
            if request_id in self._known:
                raise RequestError(f"request id {request_id!r} is already in flight")
            if len(self._inbox) + len(self._waiting) >= self.config.max_waiting:
                raise RequestError(f"server busy: {self.config.max_waiting} requests already waiting")
            self._known.add(request_id)
            self._inbox.append(seq)
            self._lock.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Ask for ``request_id`` to stop; its row is freed at the next ``step``. False if unknown."""
        with self._lock:
            if request_id not in self._known:
                return False
            self._cancels.add(request_id)
            self._lock.notify_all()
            return True

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._waiting or self._prefilling or self._rows or self._cancels)

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until there is something to step (or ``timeout_s`` passes); returns ``has_work()``."""
        with self._lock:
            self._lock.wait_for(lambda: bool(self._inbox or self._waiting or self._prefilling or self._rows
                                             or self._cancels), timeout=timeout_s)
        return self.has_work()

    def wake(self) -> None:
        """Release a thread blocked in ``wait_for_work`` (used when shutting down)."""
        with self._lock:
            self._lock.notify_all()

    # -- introspection ---------------------------------------------------------------------
    @property
    def running(self) -> list[str]:
        """Ids of the rows in the decode batch."""
        return [s.id for s in self._rows]

    @property
    def waiting(self) -> list[str]:
        with self._lock:
            return [s.id for s in self._inbox] + [s.id for s in self._waiting]

    def stats(self) -> dict:
        """Counters since start: steps, decode rows, joins (``joined_running``: joins into a batch
        that was already decoding), finished/cancelled/failed requests, prefill and cached tokens."""
        d = dict(self._counters)
        d["mean_rows"] = round(d["decode_rows"] / d["decode_steps"], 3) if d["decode_steps"] else 0.0
        if self.prefix_cache is not None:
            d["prefix_cache"] = self.prefix_cache.stats().as_dict()
        return d

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit and prefill waiting requests within the prefill budget, then decode one token for every row."""
        events: list[Event] = []
        self._counters["steps"] += 1
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = self._cancels, set()
        if cancels:
            events += self._drop(cancels)
        was_running = bool(self._rows)
        joined = self._admit(events)
        if joined:
            self._join(joined, was_running)
        if self._rows:
            events += self._decode()
        return events

    def _drop(self, ids: set[str]) -> list[Event]:
        events = []
        for s in [s for s in self._waiting if s.id in ids]:
            self._waiting.remove(s)
            events.append(self._finish(s, FINISH_CANCELLED))
        if self._prefilling is not None and self._prefilling.id in ids:
            events.append(self._finish(self._prefilling, FINISH_CANCELLED))
            self._prefilling = None
        keep = [i for i, s in enumerate(self._rows) if s.id not in ids]
        if len(keep) != len(self._rows):
            events += [self._finish(s, FINISH_CANCELLED) for s in self._rows if s.id in ids]
            self._keep_rows(keep)
        return events

    def _admit(self, events: list[Event]) -> list[_Seq]:
        """Prefill within the step's token budget; returns requests ready to join the decode batch."""
        budget = self.config.max_prefill_tokens
        ready: list[_Seq] = []
        while budget > 0:
            if self._prefilling is None:
                if not self._waiting or len(self._rows) + len(ready) >= self.config.max_batch:
                    break
                self._prefilling = self._start_prefill(self._waiting.popleft())
            seq = self._prefilling
            chunk = min(budget, len(seq.prompt) - seq.prefilled)
            try:
                logits = self._prefill_chunk(seq, chunk)
            except Exception as e:  # an onnxruntime failure fails this request, not the others
                events.append(self._finish(seq, FINISH_ERROR, f"prefill failed: {type(e).__name__}: {e}"))
                self._prefilling = None
                continue
            budget -= chunk
            if seq.prefilled < len(seq.prompt):
                break  # the rest of this prompt goes into the next steps' budgets
            self._prefilling = None
            if self.prefix_cache is not None:
                self.prefix_cache.insert(seq.prompt, seq.past)
            token = int(self._sample([seq], logits[:, -1, :])[0])
            ev = self._advance(seq, token, batch_rows=0)
            if ev.finished:
                seq.past = None
            else:
                ready.append(seq)
            events.append(ev)
        return ready

    def _start_prefill(self, seq: _Seq) -> _Seq:
        seq.past = self.lm.empty_past(1)
        if self.prefix_cache is not None:
            # The last prompt token is always run: its logits give the first new token.
            n, past = self.prefix_cache.match(seq.prompt, limit=len(seq.prompt) - 1)
            if n:
                seq.past, seq.prefilled, seq.cached_tokens = past, n, n
                self._counters["cached_tokens"] += n
        return seq

    def _prefill_chunk(self, seq: _Seq, n: int) -> np.ndarray:
        start, end = seq.prefilled, seq.prefilled + n
        ids = np.asarray([seq.prompt[start:end]], np.int64)
        mask = np.ones((1, end), np.int64)
        pos = np.arange(start, end, dtype=np.int64)[None]
        logits, seq.past = self.lm.forward(ids, mask, pos, seq.past)
        seq.prefilled = end
        self._counters["prefill_tokens"] += n
        return logits

    def _join(self, new: list[_Seq], was_running: bool) -> None:
        """Add prefilled requests to the batch, left-padding whichever side has the shorter past."""
        self._counters["joined"] += len(new)
        if was_running:
            self._counters["joined_running"] += len(new)
        lens = [s.kv_len for s in new]
        t_new = max([self._mask.shape[1]] + lens)
        old = [self._pad_left(p, t_new) for p in self._past] if self._rows else None
        mask = self._pad_left(self._mask, t_new) if self._rows else np.zeros((0, t_new), np.int64)
        add_masks = [np.concatenate([np.zeros(t_new - n, np.int64), np.ones(n, np.int64)]) for n in lens]
        self._past = [np.concatenate(([old[j]] if old else []) + [self._pad_left(s.past[j], t_new) for s in new],
                                     axis=0)
                      for j in range(len(new[0].past))]
        self._mask = np.concatenate([mask, np.stack(add_masks)], axis=0)
        self._rows += new
        for s in new:
            s.past = None

    @staticmethod
    def _pad_left(a: np.ndarray, total: int) -> np.ndarray:
        """``a`` left-padded with zeros along its length axis (2 for KV ``[B,H,T,D]``, 1 for a mask)."""
        axis = 2 if a.ndim == 4 else 1
        missing = total - a.shape[axis]
        if missing <= 0:
            return a
        shape = list(a.shape)
        shape[axis] = missing
        return np.concatenate([np.zeros(shape, a.dtype), a], axis=axis)

    def _decode(self) -> list[Event]:
        rows = self._rows
        b = len(rows)
        ids = np.asarray([[s.generated[-1]] for s in rows], np.int64)
        pos = np.asarray([[s.kv_len] for s in rows], np.int64)
        mask = np.concatenate([self._mask, np.ones((b, 1), np.int64)], axis=1)
        try:
            logits, present = self.lm.forward(ids, mask, pos, self._past)
        except Exception as e:  # the whole batch shared the failed run; each request gets the error
            msg = f"decode step failed: {type(e).__name__}: {e}"
            events = [self._finish(s, FINISH_ERROR, msg) for s in rows]
            self._keep_rows([])
            return events
        self._past, self._mask = present, mask
        self._counters["decode_steps"] += 1
        self._counters["decode_rows"] += b
        self._counters["max_rows"] = max(self._counters["max_rows"], b)
        tokens = self._sample(rows, logits[:, -1, :])
        events = [self._advance(s, int(t), batch_rows=b) for s, t in zip(rows, tokens)]
        done = {e.request_id for e in events if e.finished}
        if done:
            self._keep_rows([i for i, s in enumerate(rows) if s.id not in done])
        return events

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` and drop past columns no remaining row attends to."""
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._past, self._mask = [], np.zeros((0, 0), np.int64)
            return
        idx = np.asarray(keep)
        mask = self._mask[idx]
        live = np.flatnonzero(mask.any(axis=0))
        start = int(live[0]) if live.size else mask.shape[1]
        self._mask = np.ascontiguousarray(mask[:, start:])
        self._past = [np.ascontiguousarray(p[idx, :, start:]) for p in self._past]

    # -- sampling and text -----------------------------------------------------------------
    def _sample(self, seqs: Sequence[_Seq], logits: np.ndarray) -> np.ndarray:
        picks = logits.argmax(-1).astype(np.int64)
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature > 0:
                picks[i] = _sample_row(logits[i], p.temperature, p.top_p, s.rng)
        return picks

    def _advance(self, seq: _Seq, token: int, batch_rows: int) -> Event:
        """Record ``token`` for ``seq`` and say what the client gets; finishes the request when due."""
        p = seq.params
        cached = seq.cached_tokens if not seq.generated else 0
        if token in self._eos and not p.ignore_eos:
            return self._finish(seq, FINISH_STOP, batch_rows=batch_rows, cached=cached)
        seq.generated.append(token)
        text = self.lm.decode(seq.generated)
        if p.stop:
            # Search only where a stop string could newly end; earlier text was already checked.
            longest = max(len(s) for s in p.stop)
            from_ = max(0, seq.emitted_chars - longest)
            hits = [i for i in (text.find(s, from_) for s in p.stop) if i >= 0]
            if hits:
                return self._finish(seq, FINISH_STOP, batch_rows=batch_rows, cached=cached,
                                    final_text=text[: min(hits)], new_ids=(token,))
        if len(seq.generated) >= p.max_tokens:
            return self._finish(seq, FINISH_LENGTH, batch_rows=batch_rows, cached=cached, final_text=text,
                                new_ids=(token,))
        safe = len(text) - _held_back(text, p.stop)
        new = text[seq.emitted_chars:safe] if safe > seq.emitted_chars else ""
        seq.emitted_chars = max(seq.emitted_chars, safe)
        return Event(seq.id, new, (token,), batch_rows=batch_rows, cached_tokens=cached)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, *, batch_rows: int = 0, cached: int = 0,
                final_text: str | None = None, new_ids: tuple[int, ...] = ()) -> Event:
        if final_text is None:
            final_text = self.lm.decode(seq.generated) if reason in (FINISH_STOP, FINISH_LENGTH) else ""
        rest = final_text[seq.emitted_chars:] if len(final_text) > seq.emitted_chars else ""
        seq.emitted_chars = max(seq.emitted_chars, len(final_text))
        seq.past = None
        with self._lock:
            self._known.discard(seq.id)
            self._cancels.discard(seq.id)
        key = {FINISH_CANCELLED: "cancelled", FINISH_ERROR: "failed"}.get(reason, "finished")
        self._counters[key] += 1
        return Event(seq.id, rest, new_ids, finished=True, finish_reason=reason, error=error,
                     batch_rows=batch_rows, cached_tokens=cached)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` must wait for more tokens before being sent.

    An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives, and a tail that
    is the beginning of a stop sequence may turn out to be one.
    """
    hold = 0
    if text.endswith("\ufffd"):
        hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _sample_row(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(len(keep), p=q)])
    return int(rng.choice(len(p), p=p))


def stage_model_code(dest: "str | os.PathLike") -> "Path":
    """Fill ``dest`` with the ``llm_continuous`` python-backend code and the runtime modules it imports.

    Pass the folder as ``ModelRepository.write_version(..., model_code=dest)``: the writer copies
    the ``*.py`` of ``model_code`` (plus ``generator.py``) into the version folder, and the stub
    has no ``serving`` package to import ``continuous``/``prefix_cache`` from.
    """
    here = Path(__file__).resolve().parent
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(here.parent / "triton_models" / "llm_continuous" / "model.py", dest / "model.py")
    for name in ("continuous.py", "prefix_cache.py"):
        shutil.copy2(here / name, dest / name)
    return dest
