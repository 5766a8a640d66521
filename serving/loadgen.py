"""Bounded load generation against Triton over async gRPC: throughput, latency percentiles, batching, cache.

Every run stops by itself: after ``max_requests`` requests or ``max_duration_s`` seconds, whichever
comes first, and waits at most ``request_timeout_s`` for the requests still in flight. Prompt and
output lengths are mixed from a seeded workload; Triton's own statistics are read before and after:

    report = run_load("127.0.0.1:8001", LoadConfig(concurrency=8, max_requests=200), model="tinyllm")
    report["throughput_rps"], report["latency_ms"]["p95"], report["triton"]["avg_batch"]
    with LoadGenerator(url, cfg, router=router) as load: ...    # traffic while something else happens
    load.result["failed"]
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Literal, NamedTuple, Sequence

from pydantic import Field, ValidationError, model_validator

from tasks.config import _Frozen
from tasks.errors import ConfigError, ServingError, TrimflowError

log = logging.getLogger(__name__)

Mode = Literal["infer", "stream"]


def _config_error(cls: type, e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    where = ".".join([cls.__name__] + [str(p) for p in err["loc"]])
    return ConfigError(where, err.get("input"), err["msg"])


class ServingConfig(_Frozen):
    """A frozen config whose bad values raise ``ConfigError`` (a TrimflowError) naming the field."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _config_error(type(self), e) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServingConfig":
        """Build from JSON-like data (Airflow Params, a ``search.json``); errors as in the constructor."""
        return cls(**dict(data))


class LoadConfig(ServingConfig):
    """One bounded load run.

    Args:
        mode: ``infer`` (one response per request) or ``stream`` (gRPC stream; decoupled models send
            one response per token: time to first token and tokens/s are measured) (default infer).
        concurrency: most requests in flight at once (default 4).
        rate_rps: open-loop arrival rate; None sends the next request as soon as one finishes
            (closed loop) (default None).
        max_requests: requests sent at most (default 100).
        max_duration_s: seconds after which no new request is sent (default 30).
        request_timeout_s: a request (or a whole stream) that takes longer fails (default 60).
        prompt_words: prompt lengths in words, one picked per request (default 8, 32, 96).
        max_tokens: output lengths in tokens, one picked per request (default 4, 16, 32).
        repeat_share: share of requests that repeat an earlier request exactly, which the
            response cache can answer (default 0: every request is new).
        temperature: sent when the model takes ``temperature`` (default None: the model's default).
        seed: seed of the workload; equal seeds give the same request sequence (default 0).
        warmup_requests: requests sent (one at a time) and discarded before measuring (default 0).
        text_input / max_tokens_input / temperature_input / text_output: tensor names (defaults those
            of ``llm_generate``); optional inputs the model does not declare are not sent.
    """

    mode: Mode = "infer"
    concurrency: int = Field(4, ge=1, le=512)
    rate_rps: float | None = Field(None, gt=0)
    max_requests: int = Field(100, ge=1, le=100_000)
    max_duration_s: float = Field(30.0, gt=0, le=3600)
    request_timeout_s: float = Field(60.0, gt=0, le=3600)
    prompt_words: tuple[int, ...] = (8, 32, 96)
    max_tokens: tuple[int, ...] = (4, 16, 32)
    repeat_share: float = Field(0.0, ge=0, le=1)
    temperature: float | None = Field(None, ge=0)
    seed: int = 0
    warmup_requests: int = Field(0, ge=0, le=1000)
    text_input: str = "text_input"
    max_tokens_input: str = "max_tokens"
    temperature_input: str = "temperature"
    text_output: str = "text_output"

    @model_validator(mode="after")
    def _lengths(self) -> "LoadConfig":
        if not self.prompt_words or min(self.prompt_words) < 1:
            raise ValueError(f"prompt_words {self.prompt_words} must be non-empty, each >= 1")
        if not self.max_tokens or min(self.max_tokens) < 1:
            raise ValueError(f"max_tokens {self.max_tokens} must be non-empty, each >= 1")
        return self


class Target(NamedTuple):
    """A model and version a request is sent to; version "" lets Triton pick (its highest ready one)."""

    model: str
    version: str = ""

    def __str__(self) -> str:
        return f"{self.model}:{self.version or 'default'}"


class Router:
    """Where each request goes. This one sends everything to one target; ``rollout.CanaryRouter`` splits.

    The load generator calls ``pick()`` when it sends a request and ``done()`` when it finishes,
    both on its own thread.

    Args:
        target: the model (and version) every request goes to.
    """

    def __init__(self, target: Target) -> None:
        self.target = target

    def pick(self) -> Target:
        return self.target

    def done(self, target: Target, ok: bool, latency_s: float, error: str = "") -> None:
        """Told about every finished request (a canary router counts canary successes here)."""

    def models(self) -> tuple[str, ...]:
        """Every model name this router may send to (their statistics are read before and after)."""
        return (self.target.model,)


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int
    repeat_of: int | None = None  # index of the earlier request this one repeats


class Workload:
    """A seeded, endless sequence of requests with mixed prompt and output lengths.

    Fresh prompts are word windows of ``texts`` at seeded offsets, never equal to an earlier one
    (a repeat is the only way a request can hit the response cache).

    Args:
        cfg: lengths, repeat share and seed.
        texts: prose to cut prompts from (default None: ``tasks.builtin_texts.BUILTIN_TEXTS``).
    """

    def __init__(self, cfg: LoadConfig, texts: Sequence[str] | None = None) -> None:
        if texts is None:
            from tasks.builtin_texts import BUILTIN_TEXTS

            texts = BUILTIN_TEXTS
        self.words = " ".join(texts).split()
        if not self.words:
            raise ConfigError("load.texts", texts, "need at least one word to build prompts from")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.fresh: list[Request] = []
        self._seen: set[tuple[str, int]] = set()
        self.count = 0

    def __iter__(self) -> "Workload":
        return self

    def __next__(self) -> Request:
        self.count += 1
        if self.fresh and self.cfg.repeat_share > 0 and self.rng.random() < self.cfg.repeat_share:
            i = self.rng.randrange(len(self.fresh))
            return Request(self.fresh[i].prompt, self.fresh[i].max_tokens, repeat_of=i)
        n = self.rng.choice(self.cfg.prompt_words)
        max_tokens = self.rng.choice(self.cfg.max_tokens)
        start, size = self.rng.randrange(len(self.words)), len(self.words)
        for shift in range(size):
            prompt = " ".join(self.words[(start + shift + k) % size] for k in range(n))
            if (prompt, max_tokens) not in self._seen:
                break
        else:  # every window of this length is taken: a numbered variant keeps requests distinct
            prompt = f"{prompt} ({len(self.fresh)})"
        self._seen.add((prompt, max_tokens))
        req = Request(prompt, max_tokens)
        self.fresh.append(req)
        return req


@dataclass
class Record:
    """One finished request (times from ``time.monotonic()``)."""

    index: int
    target: Target
    start: float
    end: float
    ok: bool
    error: str = ""
    repeat: bool = False
    first_response: float | None = None  # stream mode: arrival of the first response
    last_response: float | None = None
    responses: int = 0
    output_chars: int = 0
    text: str = ""  # kept only when the generator's keep_text is set (smoke tests)

    @property
    def latency_s(self) -> float:
        return self.end - self.start


@dataclass
class _ModelIO:
    batched: bool
    decoupled: bool
    inputs: frozenset[str]


def percentiles(values: Iterable[float], scale: float = 1000.0) -> dict[str, float] | None:
    """p50/p95/p99/mean/max of ``values`` times ``scale`` (seconds to ms by default); None when empty."""
    import numpy as np

    v = np.asarray(list(values), dtype=np.float64) * scale
    if v.size == 0:
        return None
    return {"p50": round(float(np.percentile(v, 50)), 3), "p95": round(float(np.percentile(v, 95)), 3),
            "p99": round(float(np.percentile(v, 99)), 3), "mean": round(float(v.mean()), 3),
            "max": round(float(v.max()), 3), "n": int(v.size)}


class LoadGenerator:
    """Sends a bounded stream of requests from its own asyncio loop; ``run()`` or ``start()``/``stop()``.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        cfg: bounds, concurrency and workload.
        router: where each request goes (default None: ``Router(Target(model, version))``).
        model / version: the single target when no router is given.
        texts: prose for prompts (default None: the built-in texts).
    """

    def __init__(self, url: str, cfg: LoadConfig, *, router: Router | None = None, model: str | None = None,
                 version: str | int = "", texts: Sequence[str] | None = None) -> None:
        if router is None:
            if not model:
                raise ConfigError("load.model", model, "give a model name or a router")
            router = Router(Target(model, str(version)))
        self.url, self.cfg, self.router = url, cfg, router
        self.workload = Workload(cfg, texts)
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._summary: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._io: dict[str, _ModelIO] = {}
        self.started_at: float | None = None
        self.keep_text = False

    # -- public -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run to one of the bounds on this thread; returns the summary (see ``summary()``).

        Raises:
            ConfigError: the mode does not fit the model (``infer`` on a decoupled model).
            ServingError: the server or a model is unreachable before the run starts.
        """
        before = self._stats()
        t0 = time.monotonic()
        self.started_at = t0
        stopped_by = asyncio.run(self._main())
        t1 = time.monotonic()
        self._summary = self.summary(t0, t1, stopped_by, before, self._stats())
        return self._summary

    def start(self) -> "LoadGenerator":
        """Run in a background thread until a bound is reached or ``stop()`` is called."""
        if self._thread is not None:
            raise ServingError("this load generator was already started")

        def target() -> None:
            try:
                self.run()
            except BaseException as e:  # handed to stop(), which re-raises it on the caller's thread
                self._error = e

        self._thread = threading.Thread(target=target, name="trimflow-loadgen", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Stop sending, wait for in-flight requests (bounded), and return the summary."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s if timeout_s is not None else self.cfg.request_timeout_s + 30)
            if self._thread.is_alive():
                raise ServingError(f"load generator did not stop within its bounds ({self.cfg.request_timeout_s}s)")
        if self._error is not None:
            raise self._error
        if self._summary is None:
            raise ServingError("load generator never ran")
        return self._summary

    @property
    def result(self) -> dict[str, Any] | None:
        """The summary once the run has ended (None before)."""
        return self._summary

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "LoadGenerator":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running or self._summary is None:
            try:
                self.stop()
            except Exception:  # the with-block's own exception, if any, matters more
                if exc[0] is None:
                    raise

    # -- the loop ---------------------------------------------------------------------------
    async def _main(self) -> str:
        import tritonclient.grpc.aio as aio

        client = aio.InferenceServerClient(self.url)
        try:
            for i, name in enumerate(self.router.models()):
                try:
                    self._io[name] = await self._describe(client, name)
                except ServingError:
                    # Only the first model must be there now; a canary may be loaded while the load runs.
                    if i == 0:
                        raise
            for _ in range(self.cfg.warmup_requests):
                await self._one(client, -1, self.router.pick(), next(self.workload), record=False)
            return await self._dispatch(client)
        finally:
            await client.close()

    async def _describe(self, client, name: str) -> _ModelIO:
        from tritonclient.utils import InferenceServerException

        try:
            cfg = (await client.get_model_config(name, as_json=True, client_timeout=30))["config"]
        except InferenceServerException as e:
            raise ServingError(f"model {name!r} at {self.url} has no config (not loaded?): {e.message()}") from e
        decoupled = bool(cfg.get("model_transaction_policy", {}).get("decoupled", False))
        if decoupled and self.cfg.mode == "infer":
            raise ConfigError("load.mode", "infer", f"model {name!r} is decoupled: use mode='stream' (gRPC stream)")
        io = _ModelIO(batched=int(cfg.get("max_batch_size", 0)) > 0, decoupled=decoupled,
                      inputs=frozenset(i["name"] for i in cfg.get("input", [])))
        if self.cfg.text_input not in io.inputs:
            raise ConfigError("load.text_input", self.cfg.text_input, f"model {name!r} has inputs {sorted(io.inputs)}")
        return io

    async def _dispatch(self, client) -> str:
        cfg = self.cfg
        t0 = time.monotonic()
        deadline = t0 + cfg.max_duration_s
        slots = asyncio.Semaphore(cfg.concurrency)
        pending: set[asyncio.Task] = set()
        stopped_by = "max_requests"
        rng = random.Random(cfg.seed + 1)
        next_at = t0
        for i in range(cfg.max_requests):
            if cfg.rate_rps is not None:
                # Poisson arrivals: the open-loop pattern of independent users.
                next_at += rng.expovariate(cfg.rate_rps) if i else 0.0
                reason = await self._wait_until(min(next_at, deadline), deadline)
                if reason:
                    stopped_by = reason
                    break
            reason = await self._acquire(slots, deadline)
            if reason:
                stopped_by = reason
                break
            req = next(self.workload)
            task = asyncio.create_task(self._one(client, i, self.router.pick(), req))
            pending.add(task)
            task.add_done_callback(lambda t: (pending.discard(t), slots.release()))
        if pending:
            done, late = await asyncio.wait(pending, timeout=cfg.request_timeout_s + 5)
            for t in late:  # only reachable if a client timeout did not fire
                t.cancel()
        return stopped_by

    async def _wait_until(self, when: float, deadline: float) -> str:
        while True:
            if self._stop.is_set():
                return "stopped"
            now = time.monotonic()
            if now >= deadline:
                return "max_duration"
            if now >= when:
                return ""
            await asyncio.sleep(min(0.05, when - now))

    async def _acquire(self, slots: asyncio.Semaphore, deadline: float) -> str:
        while True:
            if self._stop.is_set():
                return "stopped"
            left = deadline - time.monotonic()
            if left <= 0:
                return "max_duration"
            try:
                # Short waits so that stop() and the deadline are noticed while every slot is busy.
                await asyncio.wait_for(slots.acquire(), timeout=min(0.05, left))
            except asyncio.TimeoutError:
                continue
            if self._stop.is_set() or time.monotonic() >= deadline:
                slots.release()
                return "stopped" if self._stop.is_set() else "max_duration"
            return ""

    def _inputs(self, io: _ModelIO, req: Request) -> list:
        import numpy as np
        import tritonclient.grpc as g

        shape = [1, 1] if io.batched else [1]
        text = g.InferInput(self.cfg.text_input, shape, "BYTES")
        text.set_data_from_numpy(np.array([req.prompt.encode("utf-8")], dtype=np.object_).reshape(shape))
        ins = [text]
        if self.cfg.max_tokens_input in io.inputs:
            mt = g.InferInput(self.cfg.max_tokens_input, shape, "INT32")
            mt.set_data_from_numpy(np.full(shape, req.max_tokens, np.int32))
            ins.append(mt)
        if self.cfg.temperature is not None and self.cfg.temperature_input in io.inputs:
            t = g.InferInput(self.cfg.temperature_input, shape, "FP32")
            t.set_data_from_numpy(np.full(shape, self.cfg.temperature, np.float32))
            ins.append(t)
        return ins

    def _text(self, result) -> str:
        out = result.as_numpy(self.cfg.text_output) if result is not None else None
        if out is None:
            return ""
        return "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in out.reshape(-1))

    async def _one(self, client, index: int, target: Target, req: Request, record: bool = True) -> None:
        from tritonclient.utils import InferenceServerException

        rec = Record(index, target, time.monotonic(), 0.0, False, repeat=req.repeat_of is not None)
        try:
            if target.model not in self._io:
                self._io[target.model] = await self._describe(client, target.model)
            ins = self._inputs(self._io[target.model], req)
            if self.cfg.mode == "infer":
                result = await client.infer(target.model, ins, model_version=target.version,
                                            client_timeout=self.cfg.request_timeout_s)
                text = self._text(result)
                rec.output_chars = len(text)
                rec.text = text if self.keep_text else ""
                rec.responses = 1
                rec.ok = True
            else:
                await self._stream(client, target, ins, rec)
        except InferenceServerException as e:
            rec.error = _short(e.message() if hasattr(e, "message") else str(e))
        except TrimflowError as e:
            rec.error = _short(str(e))
        except asyncio.CancelledError:
            rec.error = "cancelled: still running when the load generator stopped"
        except Exception as e:  # any client-side failure is this request's failure, not the run's
            rec.error = _short(f"{type(e).__name__}: {e}")
        rec.end = time.monotonic()
        if record:
            self.records.append(rec)
            self.router.done(target, rec.ok, rec.latency_s, rec.error)

    async def _stream(self, client, target: Target, ins: list, rec: Record) -> None:
        async def one_request():
            yield {"model_name": target.model, "inputs": ins, "model_version": target.version}

        # One stream per request: Triton ends the stream after the last response of a request whose
        # sender has closed its side, so the end of the iterator is the end of the request (the aio
        # client cannot ask for Triton's empty final-response flag).
        async for result, error in client.stream_infer(one_request(), stream_timeout=self.cfg.request_timeout_s):
            now = time.monotonic()
            if error is not None:
                rec.error = _short(error.message() if hasattr(error, "message") else str(error))
                return
            text = self._text(result)
            if text:
                rec.responses += 1
                rec.output_chars += len(text)
                rec.text += text if self.keep_text else ""
                rec.first_response = rec.first_response or now
                rec.last_response = now
        if rec.responses == 0:
            rec.error = "stream ended without any output"
            return
        rec.ok = True

    # -- statistics -------------------------------------------------------------------------
    def _stats(self) -> dict[tuple[str, str], Any]:
        from serving.client import model_stats

        out = {}
        for name in self.router.models():
            try:
                for s in model_stats(self.url, name):
                    out[(name, s.version)] = s
            except ServingError as e:
                # A model not loaded yet (a canary) has no statistics; the run itself reports failures.
                log.debug("no statistics for %s: %s", name, e)
        return out

    def summary(self, t0: float, t1: float, stopped_by: str, before: dict, after: dict) -> dict[str, Any]:
        """Client-side and Triton-side figures of the run, JSON-serializable.

        Keys: mode, url, config, requests, ok, failed, error_rate, errors (message → count),
        stopped_by, duration_s, throughput_rps, ok_rps, latency_ms {p50,p95,p99,mean,max,n} (successful
        requests), by_target {target → requests, ok, failed, latency_ms}, client_repeats, output_chars,
        stream (stream mode: ttft_ms, tokens, tokens_per_s, decode_tokens_per_s), triton (statistics
        deltas: inference_count, execution_count, avg_batch, cache_hit_count, cache_miss_count,
        cache_hit_rate, queue_ms_avg, compute_infer_ms_avg, per_version).
        """
        recs = self.records
        ok = [r for r in recs if r.ok]
        duration = max(t1 - t0, 1e-9)
        by_target: dict[str, dict[str, Any]] = {}
        for key in sorted({str(r.target) for r in recs}):
            rs = [r for r in recs if str(r.target) == key]
            by_target[key] = {"requests": len(rs), "ok": sum(r.ok for r in rs), "failed": sum(not r.ok for r in rs),
                              "latency_ms": percentiles(r.latency_s for r in rs if r.ok)}
        out: dict[str, Any] = {
            "mode": self.cfg.mode, "url": self.url, "config": self.cfg.model_dump(mode="json"),
            "requests": len(recs), "ok": len(ok), "failed": len(recs) - len(ok),
            "error_rate": round((len(recs) - len(ok)) / len(recs), 4) if recs else 0.0,
            "errors": dict(Counter(r.error for r in recs if not r.ok).most_common(5)),
            "stopped_by": stopped_by, "duration_s": round(duration, 3),
            "throughput_rps": round(len(recs) / duration, 3), "ok_rps": round(len(ok) / duration, 3),
            "latency_ms": percentiles(r.latency_s for r in ok), "by_target": by_target,
            "client_repeats": sum(r.repeat for r in recs), "output_chars": sum(r.output_chars for r in ok),
        }
        if self.cfg.mode == "stream":
            tokens = sum(r.responses for r in ok)
            decode = [(r.responses - 1) / (r.last_response - r.first_response) for r in ok
                      if r.responses > 1 and r.last_response and r.first_response and r.last_response > r.first_response]
            out["stream"] = {"ttft_ms": percentiles(r.first_response - r.start for r in ok if r.first_response),
                             "tokens": tokens, "tokens_per_s": round(tokens / duration, 3),
                             "decode_tokens_per_s": percentiles(decode, scale=1.0)}
        out["triton"] = triton_deltas(before, after)
        return out


def triton_deltas(before: dict, after: dict) -> dict[str, Any]:
    """Counters accrued between two statistics snapshots ``{(model, version): ModelStats}``.

    A version loaded during the run counts from zero; one unloaded during it has lost its counters
    (listed under ``versions_gone``).
    """
    per_version = {}
    for key, s in after.items():
        d = s - before[key] if key in before else s
        per_version[f"{key[0]}:{key[1]}"] = d
    total = {k: sum(getattr(d, k) for d in per_version.values())
             for k in ("inference_count", "execution_count", "success_count", "fail_count", "queue_ns",
                       "compute_infer_ns", "cache_hit_count", "cache_miss_count")}
    lookups = total["cache_hit_count"] + total["cache_miss_count"]
    executed = total["success_count"] - total["cache_hit_count"]
    return {
        "inference_count": total["inference_count"], "execution_count": total["execution_count"],
        "avg_batch": round(total["inference_count"] / total["execution_count"], 3) if total["execution_count"] else None,
        "success_count": total["success_count"], "fail_count": total["fail_count"],
        "cache_hit_count": total["cache_hit_count"], "cache_miss_count": total["cache_miss_count"],
        "cache_hit_rate": round(total["cache_hit_count"] / lookups, 4) if lookups else None,
        "queue_ms_avg": round(total["queue_ns"] / total["success_count"] / 1e6, 3) if total["success_count"] else None,
        "compute_infer_ms_avg": round(total["compute_infer_ns"] / executed / 1e6, 3) if executed > 0 else None,
        "per_version": {k: v.as_dict() for k, v in sorted(per_version.items())},
        "versions_gone": sorted(f"{m}:{v}" for m, v in before if (m, v) not in after),
    }


def _short(msg: str, n: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def run_load(url: str, cfg: LoadConfig, *, model: str | None = None, version: str | int = "",
             router: Router | None = None, texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one bounded load to completion and return its summary (``LoadGenerator.summary`` keys).

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        cfg: bounds, concurrency and workload.
        model / version: the target (version default "": Triton's choice) when no router is given.
        router: splits requests between targets (default None).
        texts: prose for prompts (default None: the built-in texts).
    """
    return LoadGenerator(url, cfg, router=router, model=model, version=version, texts=texts).run()


def send_one(url: str, model: str, prompt: str, max_tokens: int = 8, *, version: str | int = "",
             mode: Mode = "infer", timeout_s: float = 60.0, cfg: LoadConfig | None = None) -> Record:
    """Send one request and return its ``Record`` with the output text (smoke tests).

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        model / version: the target (version default "": Triton's choice).
        prompt / max_tokens: the request (max_tokens default 8).
        mode: ``infer`` or ``stream`` (default infer).
        timeout_s: request timeout (default 60).
        cfg: tensor names and temperature (default None: ``LoadConfig()``'s).

    Raises:
        ConfigError / ServingError: as ``LoadGenerator.run`` before sending; a failed request is
            returned with ``ok`` False and its ``error``.
    """
    base = (cfg or LoadConfig()).model_dump()
    gen = LoadGenerator(url, LoadConfig(**{**base, "mode": mode, "request_timeout_s": timeout_s}),
                        model=model, version=version)
    gen.keep_text = True
    target = Target(model, str(version))

    async def main() -> None:
        import tritonclient.grpc.aio as aio

        client = aio.InferenceServerClient(url)
        try:
            gen._io[model] = await gen._describe(client, model)
            await gen._one(client, 0, target, Request(prompt, max_tokens))
        finally:
            await client.close()

    asyncio.run(main())
    return gen.records[0]
