"""Triton python-backend model (decoupled): continuous batching with streamed tokens.

``execute`` only parses and queues; a background thread runs ``ContinuousBatcher.step`` and
sends each request's new text through its response sender, the last one flagged FINAL. A new
request joins the running batch at the next decode step; a cancelled request (client closed the
stream) leaves it at the next step and frees its row. Runs inside the Triton python stub with the
serving environment: it must not import ``serving`` or ``tasks``; ``stage_model_code`` puts
``continuous.py`` and ``prefix_cache.py`` beside it and the repository writer adds ``generator.py``.

    inputs : text_input TYPE_STRING [1]; optional max_tokens INT32 [1], temperature FP32 [1],
             top_p FP32 [1], seed INT64 [1], ignore_eos BOOL [1], stop TYPE_STRING [-1]
    outputs: text_output TYPE_STRING [1] (new text of this response), finish_reason TYPE_STRING [1]
             ("" until the FINAL response: stop, length)
    params : intra_op_threads, max_batch, max_prefill_tokens, max_waiting, default_max_tokens,
             max_tokens_limit, prefix_cache_bytes, prefix_block_tokens, execution_providers
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
try:  # the copies in this version folder
    from continuous import BatcherConfig, ContinuousBatcher, Event, RequestError, SamplingParams
    from generator import OnnxCausalLM
    from prefix_cache import PrefixCache
except ImportError:  # the source tree (unit tests), where they live in serving/runtime
    from serving.runtime.continuous import BatcherConfig, ContinuousBatcher, Event, RequestError, SamplingParams
    from serving.runtime.generator import OnnxCausalLM
    from serving.runtime.prefix_cache import PrefixCache

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# is_cancelled() is a round trip to the server process per request; a decode step of a real model
# takes tens of milliseconds, so checking every 20 ms frees a row within about one step.
_CANCEL_CHECK_S = 0.02


def _param(cfg: dict, key: str, default: str) -> str:
    return cfg.get("parameters", {}).get(key, {}).get("string_value", default) or default


class _Live:
    """A request in flight: what the sending thread needs to answer it."""

    __slots__ = ("request", "sender")

    def __init__(self, request, sender) -> None:
        self.request, self.sender = request, sender


class TritonPythonModel:
    """Decoupled streaming generation over a ``ContinuousBatcher``."""

    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(cfg):
            raise pb_utils.TritonModelException("llm_continuous streams: set model_transaction_policy decoupled")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        providers = [p.strip() for p in _param(cfg, "execution_providers", "CPUExecutionProvider").split(",")
                     if p.strip()]
        lm = OnnxCausalLM(version_dir, threads=int(_param(cfg, "intra_op_threads", "1")), providers=providers)
        cache_bytes = int(_param(cfg, "prefix_cache_bytes", "0"))
        cache = PrefixCache(int(_param(cfg, "prefix_block_tokens", "16")), cache_bytes) if cache_bytes else None
        batcher = ContinuousBatcher(lm, BatcherConfig(max_batch=int(_param(cfg, "max_batch", "8")),
                                                      max_prefill_tokens=int(_param(cfg, "max_prefill_tokens", "256")),
                                                      max_waiting=int(_param(cfg, "max_waiting", "256")),
                                                      max_tokens_limit=int(_param(cfg, "max_tokens_limit", "512"))),
                                    prefix_cache=cache)
        # One real step at load time: a graph that parses but cannot run fails the load, not a user request.
        lm.generate_ids([[lm.meta.pad_token_id]], max_new_tokens=1)
        self.setup(batcher, default_max_tokens=int(_param(cfg, "default_max_tokens", "16")),
                   batched=int(cfg.get("max_batch_size", 0)) > 0)
        self.start()
        pb_utils.Logger.log_info(f"llm_continuous {args['model_name']} v{args['model_version']}: "
                                 f"{lm.meta.num_layers} layers, max_batch {batcher.config.max_batch}, "
                                 f"prefix cache {cache_bytes} bytes, providers {providers}")

    def setup(self, batcher: ContinuousBatcher, default_max_tokens: int = 16, batched: bool = True) -> None:
        """Everything ``initialize`` decides, callable with any model (unit tests use a tiny one).

        Args:
            batcher: the scheduler.
            default_max_tokens: new tokens when a request does not say (default 16).
            batched: the config has ``max_batch_size > 0``, so outputs carry a batch dimension
                (default True).
        """
        self.batcher = batcher
        self.default_max_tokens = default_max_tokens
        self.batched = batched
        self._live: dict[str, _Live] = {}
        self._live_lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm_continuous-batcher", daemon=True)
        self._thread.start()

    # -- request parsing -------------------------------------------------------------------
    @staticmethod
    def _scalar(request, name: str, default, cast):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return default
        values = t.as_numpy().reshape(-1)
        if values.size != 1:
            raise RequestError(f"{name} must hold one value, got {values.size}")
        return cast(values[0])

    def parse(self, request) -> tuple[list[int], SamplingParams]:
        """Prompt ids and sampling parameters of one request.

        Raises:
            RequestError: several prompts in one request, text that is not UTF-8, or bad parameters.
        """
        texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        if texts.size != 1:
            raise RequestError(f"text_input must hold one prompt per streamed request, got {texts.size}")
        raw = texts[0]
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as e:
            raise RequestError(f"text_input is not UTF-8: {e}") from e
        stop_t = pb_utils.get_input_tensor_by_name(request, "stop")
        stop: tuple[str, ...] = ()
        if stop_t is not None:
            try:
                stop = tuple(s.decode("utf-8") if isinstance(s, bytes) else str(s)
                             for s in stop_t.as_numpy().reshape(-1))
            except UnicodeDecodeError as e:
                raise RequestError(f"stop is not UTF-8: {e}") from e
        seed = self._scalar(request, "seed", None, int)
        params = SamplingParams(max_tokens=self._scalar(request, "max_tokens", self.default_max_tokens, int),
                                temperature=self._scalar(request, "temperature", 0.0, float),
                                top_p=self._scalar(request, "top_p", 1.0, float),
                                stop=tuple(s for s in stop if s), seed=seed,
                                ignore_eos=self._scalar(request, "ignore_eos", False, bool))
        ids = self.batcher.lm.encode(text)
        if not ids:
            raise RequestError("empty prompt: text_input must contain at least one token")
        return ids, params

    # -- intake ----------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids, params = self.parse(request)
                rid = f"{next(self._ids)}"
                with self._live_lock:
                    self._live[rid] = _Live(request, sender)
                try:
                    self.batcher.submit(rid, ids, params)
                except RequestError:
                    with self._live_lock:
                        self._live.pop(rid, None)
                    raise
            except RequestError as e:
                self._send_error(sender, f"RequestError: {e}", pb_utils.TritonError.INVALID_ARG)
        return None  # decoupled: every answer goes through the response senders

    # -- the batching thread ---------------------------------------------------------------
    def _loop(self) -> None:
        checked = 0.0
        while not self._stop.is_set():
            if not self.batcher.wait_for_work(timeout_s=0.5):
                continue
            if time.monotonic() - checked >= _CANCEL_CHECK_S:
                self._check_cancelled()
                checked = time.monotonic()
            try:
                events = self.batcher.step()
            except Exception as e:  # a scheduler bug fails the requests in flight, never the stub
                pb_utils.Logger.log_error(f"llm_continuous: step failed: {traceback.format_exc()}")
                self._fail_all(f"{type(e).__name__}: {e}")
                continue
            for ev in events:
                self._deliver(ev)

    def _check_cancelled(self) -> None:
        with self._live_lock:
            live = list(self._live.items())
        for rid, h in live:
            try:
                cancelled = h.request.is_cancelled()
            except Exception:  # noqa: BLE001 - a request the server already released counts as cancelled
                cancelled = True
            if cancelled and self.batcher.cancel(rid):
                pb_utils.Logger.log_info(f"llm_continuous: request {rid} cancelled by the client; row freed")

    def _deliver(self, ev: Event) -> None:
        with self._live_lock:
            h = self._live.get(ev.request_id)
            if h is not None and ev.finished:
                del self._live[ev.request_id]
        if h is None:
            return
        if ev.finish_reason == "cancelled":
            # The client is gone; FINAL (no response) lets Triton release the request.
            self._send(h.sender, None, _FINAL)
            return
        if ev.finish_reason == "error":
            self._send_error(h.sender, ev.error or "generation failed", pb_utils.TritonError.INTERNAL)
            return
        if not ev.text and not ev.finished:
            return  # nothing new to show yet (held back); the next token carries it
        response = pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", self._array(ev.text)),
            pb_utils.Tensor("finish_reason", self._array(ev.finish_reason or ""))])
        self._send(h.sender, response, _FINAL if ev.finished else 0)

    def _array(self, text: str) -> np.ndarray:
        a = np.array([text.encode("utf-8")], dtype=np.object_)
        return a.reshape(1, 1) if self.batched else a

    def _send(self, sender, response, flags: int) -> None:
        try:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)
        except Exception as e:  # noqa: BLE001 - the client went away between the step and the send
            pb_utils.Logger.log_warn(f"llm_continuous: could not send a response: {e}")

    def _send_error(self, sender, message: str, code) -> None:
        response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
        self._send(sender, response, _FINAL)

    def _fail_all(self, message: str) -> None:
        with self._live_lock:
            live, self._live = self._live, {}
        for rid, h in live.items():
            self.batcher.cancel(rid)
            self._send_error(h.sender, f"generation failed: {message}", pb_utils.TritonError.INTERNAL)

    def finalize(self) -> None:
        self._stop.set()
        self.batcher.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._fail_all("model unloaded")
