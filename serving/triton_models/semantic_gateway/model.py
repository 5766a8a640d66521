"""Triton python-backend model: a semantic cache in front of a text-generation model, over BLS.

Each greedy prompt is embedded by the encoder model; a cached answer of a near-identical prompt
(same namespace: LLM model and ``max_tokens``) is returned, otherwise the LLM model answers and
the answer is cached. Sampled prompts (temperature > 0) bypass the cache: a cached sample would
turn a random answer into a fixed one. Counters per outcome are exported on Triton's metrics
endpoint as ``trimflow_semantic_cache_requests_total{model,version,result}``.

Why a model inside Triton and not a client-side component: every client (any language, curl)
gets the cache behind the same endpoint and tensors as ``llm_generate``; the encoder and LLM calls
stay in-process (BLS, no network hop, and the encoder's dynamic batcher merges the gateway's
embedding calls); the outcomes sit on the same /metrics endpoint as Triton's own cache counters;
and with Redis the entries are shared by every instance and replica. The model is decoupled by
default because a non-decoupled python model runs one ``execute`` at a time per instance: measured
on this stack, a hit queued behind a 1 s LLM miss waited 0.9 s, while the decoupled async model
answered it in 2 ms. The price: decoupled models are reached over gRPC streaming (or HTTP
generate_stream) and are not response-cached; ``decoupled: false`` in the spec gives plain infer
calls and Triton's exact-match cache in front, with that head-of-line blocking.

Runs inside the Triton python stub (serving environment); the repository writer copies
``semantic_cache.py`` beside this file.

    inputs : text_input TYPE_STRING [1]; optional max_tokens TYPE_INT32 [1], temperature TYPE_FP32 [1]
    outputs: text_output TYPE_STRING [1], cache_status TYPE_STRING [1]
    params : encoder_model, llm_model, cache_* (SemanticCacheConfig fields)
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
try:
    from semantic_cache import CacheUnavailable, SemanticCache, SemanticCacheConfig, describe  # version folder
except ImportError:  # the source tree (unit tests)
    from serving.semantic_cache import CacheUnavailable, SemanticCache, SemanticCacheConfig, describe

RESULTS = ("hit", "miss", "guarded", "bypass", "error")


class RequestError(ValueError):
    """A problem with one request: it gets an error response, the others carry on."""


class BackendError(RuntimeError):
    """A BLS call failed; ``code`` is the called model's error code."""

    def __init__(self, message: str, code=None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Row:
    prompt: str
    max_tokens: int | None
    temperature: float | None

    @property
    def cacheable(self) -> bool:
        return not self.temperature  # None or 0.0: greedy, deterministic

    def namespace(self, llm: str) -> str:
        return f"{llm}|mt={self.max_tokens if self.max_tokens is not None else 'default'}"


def _param(cfg: dict, key: str) -> str:
    return cfg.get("parameters", {}).get(key, {}).get("string_value", "")


class TritonPythonModel:
    """Embed, look up, generate the misses, store them; one coroutine per request."""

    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        encoder, llm = _param(cfg, "encoder_model"), _param(cfg, "llm_model")
        if not encoder or not llm:
            raise ValueError(f"semantic_gateway {args['model_name']}: parameters encoder_model and llm_model are "
                             f"required (got {encoder!r}, {llm!r})")
        # Fails the load when Redis is configured but unreachable: a gateway silently running
        # without its shared cache would hide the outage.
        cache = SemanticCache(SemanticCacheConfig.from_parameters(params))
        family = pb_utils.MetricFamily(name="trimflow_semantic_cache_requests_total",
                                       description="Semantic cache outcomes of prompts (hit, miss, guarded, "
                                                   "bypass, error)",
                                       kind=pb_utils.MetricFamily.COUNTER)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        counters = {r: family.Metric(labels={**labels, "result": r}) for r in RESULTS}
        self._family = family  # a MetricFamily must outlive its metrics
        self.setup(cache, BlsBackend(encoder, llm), counters,
                   decoupled=pb_utils.using_decoupled_model_transaction_policy(cfg))
        pb_utils.Logger.log_info(f"semantic_gateway {args['model_name']} v{args['model_version']}: encoder "
                                 f"{encoder}, llm {llm}, decoupled {self.decoupled}, cache {describe(cache.config)}")

    def setup(self, cache: SemanticCache, backend, counters: dict | None = None, decoupled: bool = False) -> None:
        """Everything ``initialize`` decides, callable with fakes (unit tests)."""
        self.cache, self.backend, self.decoupled = cache, backend, decoupled
        self.counters = counters or {}

    def _count(self, result: str) -> None:
        metric = self.counters.get(result)
        if metric is not None:
            metric.increment(1)

    # -- request parsing -------------------------------------------------------------------
    @staticmethod
    def _optional(request, name: str, rows: int, cast) -> list:
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return [None] * rows
        values = t.as_numpy().reshape(-1)
        if values.size != rows:
            raise RequestError(f"{name} has {values.size} values for {rows} prompts")
        return [cast(v) for v in values]

    def parse(self, request) -> list[Row]:
        """The rows of one request.

        Raises:
            RequestError: a prompt that is not UTF-8 or is empty, or a bad temperature.
        """
        texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        max_tokens = self._optional(request, "max_tokens", len(texts), int)
        temps = self._optional(request, "temperature", len(texts), float)
        rows = []
        for raw, mt, temp in zip(texts, max_tokens, temps):
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError as e:
                raise RequestError(f"text_input is not UTF-8: {e}") from e
            if not text.strip():
                raise RequestError("empty prompt: text_input must contain text")
            if temp is not None and (not math.isfinite(temp) or temp < 0):
                raise RequestError(f"temperature={temp} must be a finite number >= 0")
            rows.append(Row(text, mt, temp))
        return rows

    # -- answering -------------------------------------------------------------------------
    async def answer(self, row: Row) -> tuple[str, str]:
        """``(text, cache_status)`` for one prompt; an LLM failure raises."""
        if not row.cacheable:
            self._count("bypass")
            return await self.backend.generate(row), "bypass"
        ns = row.namespace(self.backend.llm)
        vector = None
        try:
            vector = await self.backend.embed(row.prompt)
            found = self.cache.lookup(ns, row.prompt, vector)
        except (CacheUnavailable, BackendError) as e:
            # The cache is an optimisation: without it the LLM still answers, and the error counter
            # and the log make the outage visible.
            pb_utils.Logger.log_error(f"semantic_gateway: cache unavailable, answering uncached: {e}")
            self._count("error")
            return await self.backend.generate(row), "error"
        if found.status == "hit":
            self._count("hit")
            return found.response, "hit"  # type: ignore[return-value]
        self._count(found.status)
        text = await self.backend.generate(row)
        try:
            self.cache.insert(ns, row.prompt, vector, text)
        except CacheUnavailable as e:
            pb_utils.Logger.log_error(f"semantic_gateway: answer not cached: {e}")
        return text, found.status

    async def respond(self, request) -> "pb_utils.InferenceResponse":
        try:
            rows = self.parse(request)
        except RequestError as e:
            return _error(e, pb_utils.TritonError.INVALID_ARG)
        try:
            results = await asyncio.gather(*(self.answer(r) for r in rows))
        except BackendError as e:  # the LLM refused (e.g. max_tokens too large): pass its verdict on
            return _error(e, e.code if e.code is not None else pb_utils.TritonError.INTERNAL)
        except Exception as e:  # one request's failure fails that request only
            pb_utils.Logger.log_error(f"semantic_gateway: request failed: {e!r}")
            return _error(e, pb_utils.TritonError.INTERNAL)
        text = np.array([[t.encode("utf-8")] for t, _ in results], dtype=np.object_)
        status = np.array([[s.encode("utf-8")] for _, s in results], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", text),
                                                          pb_utils.Tensor("cache_status", status)])

    async def execute(self, requests):
        if not self.decoupled:
            return list(await asyncio.gather(*(self.respond(r) for r in requests)))

        # Decoupled: each request is answered as soon as it is done, and the stub's event loop
        # starts the next execute while this one awaits the LLM.
        async def send(request) -> None:
            response = await self.respond(request)
            request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        await asyncio.gather(*(send(r) for r in requests))
        return None

    def finalize(self) -> None:
        self.cache = None


def _error(e: Exception, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[],
                                      error=pb_utils.TritonError(f"{type(e).__name__}: {e}", code))


class BlsBackend:
    """The encoder and LLM models, called in-process through BLS."""

    def __init__(self, encoder: str, llm: str) -> None:
        self.encoder, self.llm = encoder, llm

    async def embed(self, prompt: str) -> np.ndarray:
        text = pb_utils.Tensor("text", np.array([[prompt.encode("utf-8")]], dtype=np.object_))
        req = pb_utils.InferenceRequest(model_name=self.encoder, inputs=[text], requested_output_names=["embedding"])
        resp = await req.async_exec()
        if resp.has_error():
            raise BackendError(f"encoder {self.encoder}: {resp.error().message()}", resp.error().code())
        return pb_utils.get_output_tensor_by_name(resp, "embedding").as_numpy().reshape(-1)

    async def generate(self, row: Row) -> str:
        inputs = [pb_utils.Tensor("text_input", np.array([[row.prompt.encode("utf-8")]], dtype=np.object_))]
        if row.max_tokens is not None:
            inputs.append(pb_utils.Tensor("max_tokens", np.array([[row.max_tokens]], np.int32)))
        if row.temperature is not None:
            inputs.append(pb_utils.Tensor("temperature", np.array([[row.temperature]], np.float32)))
        req = pb_utils.InferenceRequest(model_name=self.llm, inputs=inputs, requested_output_names=["text_output"])
        resp = await req.async_exec()
        if resp.has_error():
            raise BackendError(f"llm {self.llm}: {resp.error().message()}", resp.error().code())
        out = pb_utils.get_output_tensor_by_name(resp, "text_output").as_numpy().reshape(-1)[0]
        return out.decode("utf-8") if isinstance(out, bytes) else str(out)
