"""A small client for trimflow's Triton text-generation models, plus batching/cache statistics.

    text = generate("127.0.0.1:8001", "tinyllm", "The council voted to", max_tokens=16)
    texts = generate_concurrent("127.0.0.1:8001", "tinyllm", prompts)      # one in-flight request each
    s = model_stats("127.0.0.1:8001", "tinyllm")[0]; s.execution_count < s.inference_count
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, fields
from typing import Literal, Sequence

import numpy as np
from tritonclient.utils import InferenceServerException

from tasks.errors import ServingError

Protocol = Literal["grpc", "http"]


def _module(protocol: Protocol):
    if protocol == "grpc":
        import tritonclient.grpc as m
    elif protocol == "http":
        import tritonclient.http as m
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
    return m


def _client(url: str, protocol: Protocol, timeout_s: float, concurrency: int = 1):
    m = _module(protocol)
    if protocol == "http":
        return m.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s,
                                       concurrency=concurrency)
    return m.InferenceServerClient(url)


def _inputs(protocol: Protocol, prompts: Sequence[str], max_tokens: int | None, temperature: float | None):
    m = _module(protocol)
    n = len(prompts)
    text = m.InferInput("text_input", [n, 1], "BYTES")
    text.set_data_from_numpy(np.array([[p.encode("utf-8")] for p in prompts], dtype=np.object_))
    ins = [text]
    if max_tokens is not None:
        mt = m.InferInput("max_tokens", [n, 1], "INT32")
        mt.set_data_from_numpy(np.full((n, 1), max_tokens, np.int32))
        ins.append(mt)
    if temperature is not None:
        t = m.InferInput("temperature", [n, 1], "FP32")
        t.set_data_from_numpy(np.full((n, 1), temperature, np.float32))
        ins.append(t)
    return ins


def _texts(result) -> list[str]:
    out = result.as_numpy("text_output")
    if out is None:
        raise ServingError("response has no text_output")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in out.reshape(-1)]


def _serving_error(e: Exception, url: str, model: str, version: str) -> ServingError:
    where = f"{model}" + (f" v{version}" if version else "") + f" at {url}"
    status = getattr(e, "status", lambda: None)()
    msg = e.message() if hasattr(e, "message") else str(e)
    return ServingError(f"inference on {where} failed" + (f" ({status})" if status else "") + f": {msg}")


def generate(url: str, model: str, prompt: str, max_tokens: int | None = 16, temperature: float | None = None,
             version: str | int = "", protocol: Protocol = "grpc", timeout_s: float = 60.0) -> str:
    """Generate text for one prompt.

    Args:
        url: ``host:port`` of the gRPC (default) or HTTP endpoint.
        model: Triton model name.
        prompt: the prompt text.
        max_tokens: new tokens (default 16; None: the model's default).
        temperature: sampling temperature (default None: the model's default, greedy).
        version: model version (default "": the server's choice).
        protocol: ``grpc`` or ``http`` (default grpc).
        timeout_s: request timeout (default 60).

    Raises:
        ServingError: the server refused the request (the message has Triton's reason) or is unreachable.
    """
    return generate_batch(url, model, [prompt], max_tokens, temperature, version, protocol, timeout_s)[0]


def generate_batch(url: str, model: str, prompts: Sequence[str], max_tokens: int | None = 16,
                   temperature: float | None = None, version: str | int = "", protocol: Protocol = "grpc",
                   timeout_s: float = 60.0) -> list[str]:
    """Generate for several prompts sent as one request (one row each); all succeed or all fail."""
    check_model_name(model)
    version = str(version)
    client = _client(url, protocol, timeout_s)
    try:
        kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        result = client.infer(model, _inputs(protocol, prompts, max_tokens, temperature), model_version=version, **kw)
        return _texts(result)
    except (InferenceServerException, OSError) as e:
        raise _serving_error(e, url, model, version) from e
    finally:
        client.close()


def generate_concurrent(url: str, model: str, prompts: Sequence[str], max_tokens: int | None = 16,
                        temperature: float | None = None, version: str | int = "",
                        timeout_s: float = 120.0) -> list[str | ServingError]:
    """Send every prompt as its own gRPC request, all in flight at once; results in prompt order.

    A failed request gives a ``ServingError`` in its slot instead of raising, so callers can
    check that one bad request did not take the others down.
    """
    import tritonclient.grpc as g

    check_model_name(model)
    version = str(version)
    client = g.InferenceServerClient(url)
    results: list[str | ServingError | None] = [None] * len(prompts)
    done = threading.Semaphore(0)

    def callback(i: int):
        # tritonclient calls back with keyword arguments result= and error=.
        def cb(result=None, error=None):
            try:
                results[i] = _serving_error(error, url, model, version) if error is not None else _texts(result)[0]
            except Exception as e:  # a malformed response must still release the waiter
                results[i] = ServingError(f"bad response for prompt {i}: {e}")
            done.release()
        return cb

    try:
        for i, p in enumerate(prompts):
            client.async_infer(model, _inputs("grpc", [p], max_tokens, temperature), callback(i),
                               model_version=version, client_timeout=timeout_s)
        for _ in prompts:
            if not done.acquire(timeout=timeout_s):
                raise ServingError(f"{sum(r is None for r in results)} of {len(prompts)} requests to {model} "
                                   f"at {url} unanswered after {timeout_s:.0f}s")
        return results  # type: ignore[return-value]
    finally:
        client.close()


@dataclass(frozen=True)
class ModelStats:
    """Counters of one model version from Triton's statistics API.

    ``inference_count`` counts requests' rows, ``execution_count`` the model executions: with
    dynamic batching the first grows faster. Cache hits are answered without an execution.
    """

    name: str
    version: str
    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    fail_count: int = 0
    queue_ns: int = 0
    compute_infer_ns: int = 0
    cache_hit_count: int = 0
    cache_miss_count: int = 0

    @property
    def rows_per_execution(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0

    @classmethod
    def from_json(cls, d: dict) -> "ModelStats":
        s = d.get("inference_stats", {})

        def n(section: str, key: str = "count") -> int:
            return int(s.get(section, {}).get(key, 0))  # gRPC JSON renders uint64 as strings

        return cls(name=d["name"], version=str(d.get("version", "")), inference_count=int(d.get("inference_count", 0)),
                   execution_count=int(d.get("execution_count", 0)), success_count=n("success"), fail_count=n("fail"),
                   queue_ns=n("queue", "ns"), compute_infer_ns=n("compute_infer", "ns"),
                   cache_hit_count=n("cache_hit"), cache_miss_count=n("cache_miss"))

    def __sub__(self, other: "ModelStats") -> "ModelStats":
        """Counters accrued since ``other`` (an earlier snapshot of the same model version)."""
        numeric = {f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)
                   if f.name not in ("name", "version")}
        return ModelStats(self.name, self.version, **numeric)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rows_per_execution"] = round(self.rows_per_execution, 3)
        return d


def model_statistics(url: str, model: str = "", version: str | int = "", protocol: Protocol = "grpc",
                     timeout_s: float = 30.0) -> dict:
    """Triton's raw statistics JSON (``{"model_stats": [...]}``) for one model or all."""
    client = _client(url, protocol, timeout_s)
    try:
        if protocol == "grpc":
            return client.get_inference_statistics(model, str(version), as_json=True, client_timeout=timeout_s)
        return client.get_inference_statistics(model, str(version))
    except (InferenceServerException, OSError) as e:
        raise _serving_error(e, url, model or "(all models)", str(version)) from e
    finally:
        client.close()


def model_stats(url: str, model: str, version: str | int = "", protocol: Protocol = "grpc") -> list[ModelStats]:
    """Parsed batching/cache counters per version of ``model`` (loaded versions only)."""
    raw = model_statistics(url, model, version, protocol)
    return [ModelStats.from_json(d) for d in raw.get("model_stats", [])]


_CACHE_HITS = re.compile(r'^nv_cache_num_hits_per_model\{([^}]*)\}\s+([0-9.eE+]+)\s*$', re.M)


def cache_hits_from_metrics(metrics_text: str, model: str, version: str | int = "") -> int:
    """Response-cache hits of ``model`` (summed over versions unless one is given) from Prometheus text."""
    total = 0.0
    for labels, value in _CACHE_HITS.findall(metrics_text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if lab.get("model") == model and (not str(version) or lab.get("version") == str(version)):
            total += float(value)
    return int(total)


# -- streaming (decoupled models such as llm_continuous) ------------------------------------------
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def check_model_name(model: str) -> str:
    """``model`` if Triton could serve a model of that name; raises before anything is sent otherwise.

    Names become URL path segments (``/v2/models/<name>/...``) and repository folders, so a
    separator or ``..`` would address something else rather than fail.

    Raises:
        InvalidRequest: empty, or not only letters, digits, ``_``, ``.``, ``-`` (or starting with ``.``/``-``).
    """
    from tasks.errors import InvalidRequest

    if not isinstance(model, str) or not _MODEL_NAME.fullmatch(model):
        raise InvalidRequest(f"model name {model!r} is not servable: use letters, digits, '_', '.', '-' "
                             f"(no path separators), starting with a letter, digit or '_'")
    return model


@dataclass(frozen=True)
class StreamChunk:
    """One streamed response: new text, and the finish reason on the last one.

    Attributes:
        text: text added by this response ("" is possible on the last one).
        finish_reason: "" until the last response, then ``stop`` or ``length``.
        received_s: ``time.perf_counter()`` when the client got it.
    """

    text: str
    finish_reason: str
    received_s: float

    @property
    def final(self) -> bool:
        return bool(self.finish_reason)


def _stream_inputs(prompt: str, max_tokens: int | None, temperature: float | None, top_p: float | None,
                   stop: Sequence[str], seed: int | None, ignore_eos: bool | None):
    import tritonclient.grpc as g

    def one(name: str, value, dtype: str, np_dtype) -> "g.InferInput":
        arr = np.array([[value]], dtype=np_dtype)
        t = g.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    ins = [one("text_input", prompt.encode("utf-8"), "BYTES", np.object_)]
    for name, value, dtype, np_dtype in (("max_tokens", max_tokens, "INT32", np.int32),
                                         ("temperature", temperature, "FP32", np.float32),
                                         ("top_p", top_p, "FP32", np.float32), ("seed", seed, "INT64", np.int64),
                                         ("ignore_eos", ignore_eos, "BOOL", np.bool_)):
        if value is not None:
            ins.append(one(name, value, dtype, np_dtype))
    if stop:
        arr = np.array([[s.encode("utf-8") for s in stop]], dtype=np.object_)
        t = g.InferInput("stop", list(arr.shape), "BYTES")
        t.set_data_from_numpy(arr)
        ins.append(t)
    return ins


def _stream_body(prompt: str, max_tokens: int | None, temperature: float | None, top_p: float | None,
                 stop: Sequence[str], seed: int | None, ignore_eos: bool | None) -> dict:
    body: dict = {"text_input": prompt}
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("seed", seed), ("ignore_eos", ignore_eos)):
        if value is not None:
            body[name] = value
    if stop:
        body["stop"] = list(stop)
    return body


def generate_stream(url: str, model: str, prompt: str, max_tokens: int | None = 16, *,
                    temperature: float | None = None, top_p: float | None = None, stop: Sequence[str] = (),
                    seed: int | None = None, ignore_eos: bool | None = None, version: str | int = "",
                    protocol: Protocol = "grpc", timeout_s: float = 60.0):
    """Stream one generation from a decoupled model; yields ``StreamChunk``s until the final one.

    Over gRPC a bidirectional stream is opened per call, over HTTP the ``generate_stream``
    endpoint (server-sent events) is read. Leaving the loop early (``break``, an exception,
    closing the generator) cancels the request on the server either way (gRPC: the stream is
    cancelled; HTTP: the connection closes), which frees its batch row.

    Args:
        url: ``host:port`` of the gRPC (default) or HTTP endpoint.
        model: Triton model name.
        prompt: the prompt text.
        max_tokens: new tokens (default 16; None: the model's default).
        temperature / top_p / seed: sampling (defaults None: the model's defaults, greedy).
        stop: stop sequences (default none).
        ignore_eos: generate past EOS up to ``max_tokens`` (default None: the model's default, False).
        version: model version (default "": the server's choice).
        protocol: ``grpc`` or ``http`` (default grpc).
        timeout_s: longest wait for the next response (default 60).

    Raises:
        InvalidRequest: the model name is not servable (nothing is sent).
        ServingError: the server refused the request (the message has its reason), or went quiet
            for ``timeout_s``.
    """
    check_model_name(model)
    version = str(version)
    args = (prompt, max_tokens, temperature, top_p, tuple(stop), seed, ignore_eos)
    if protocol == "http":
        yield from _stream_http(url, model, version, _stream_body(*args), timeout_s)
        return
    if protocol != "grpc":
        raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
    import queue
    import time

    import tritonclient.grpc as g

    inbox: "queue.Queue[tuple[object, object, float]]" = queue.Queue()
    client = g.InferenceServerClient(url)
    finished = False
    try:
        client.start_stream(callback=lambda result=None, error=None: inbox.put((result, error, time.perf_counter())))
        client.async_stream_infer(model, _stream_inputs(*args), model_version=version)
        while True:
            try:
                result, error, at = inbox.get(timeout=timeout_s)
            except queue.Empty:
                raise ServingError(f"no response from {model} at {url} for {timeout_s:.0f}s") from None
            if error is not None:
                finished = True  # the server ended this request itself
                raise _serving_error(error, url, model, version)
            text = result.as_numpy("text_output")
            reason = result.as_numpy("finish_reason")
            chunk = StreamChunk(_first_text(text), _first_text(reason), at)
            if chunk.final:
                finished = True
            yield chunk
            if finished:
                return
    finally:
        # Cancelling tells the server the client is gone, so it frees the request's batch row.
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _first_text(arr) -> str:
    if arr is None:
        return ""
    v = arr.reshape(-1)[0]
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _stream_http(url: str, model: str, version: str, body: dict, timeout_s: float):
    import json
    import time
    import urllib.error
    import urllib.request

    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/generate_stream"
    req = urllib.request.Request(f"http://{url}{path}", data=json.dumps(body).encode("utf-8"), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    where = f"{model}" + (f" v{version}" if version else "") + f" at {url}"
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        raise ServingError(f"inference on {where} failed (HTTP {e.code}): {_sse_error(e.read())}") from e
    except OSError as e:
        raise ServingError(f"inference on {where} failed: {e}") from e
    with resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                raise ServingError(f"inference on {where} failed: {event['error']}")
            chunk = StreamChunk(str(event.get("text_output", "")), str(event.get("finish_reason", "")),
                                time.perf_counter())
            yield chunk
            if chunk.final:
                return
    raise ServingError(f"stream from {where} ended without a final response")


def _sse_error(body: bytes) -> str:
    import json

    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("data:"):
        text = text[len("data:"):].strip()
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text
