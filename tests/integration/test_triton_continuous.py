"""The llm_continuous decoupled model in the real tritonserver: streaming over gRPC and HTTP,
requests joining a running batch, cancellation freeing a row, stop/max_tokens, per-request errors."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from serving.client import StreamChunk, generate_stream
from tasks.errors import InvalidRequest, ServingError

pytestmark = pytest.mark.integration

LONG = 460  # tokens a long request asks for; the tiny export has 512 positions


@pytest.fixture(scope="module")
def streaming(triton_server, tiny_llm_export, tmp_path_factory):
    """``tinystream`` (4 rows) and ``tinystream1`` (1 row) loaded from the tiny export."""
    from serving.model_config import ModelConfigSpec, VersionPolicy
    from serving.repository import ModelRepository
    from serving.runtime.continuous import stage_model_code

    code = stage_model_code(tmp_path_factory.mktemp("continuous-code"))
    repo = ModelRepository(triton_server.config.model_repository)
    for name, rows in (("tinystream", 4), ("tinystream1", 1)):
        repo.write_version(name, 1, tiny_llm_export, model_code=code)
        spec = ModelConfigSpec.llm_continuous(name, max_batch=rows, max_tokens_limit=LONG,
                                              prefix_cache_bytes=1 << 20, version_policy=VersionPolicy.specific(1))
        repo.write_config(name, spec.to_pbtxt())
        triton_server.load(name)
    return triton_server


class Background:
    """Consume one stream in a thread, recording every chunk (for requests that overlap)."""

    def __init__(self, server, model: str, prompt: str, protocol: str = "grpc", **kw) -> None:
        self.chunks: list[StreamChunk] = []
        self.error: Exception | None = None
        self.first = threading.Event()
        self.done = threading.Event()
        self.stop = threading.Event()  # set to leave the loop early, which cancels the request
        url = server.grpc_url if protocol == "grpc" else server.http_url
        self._thread = threading.Thread(target=self._run, args=(url, model, prompt, dict(kw, protocol=protocol)),
                                        daemon=True)
        self._thread.start()

    def _run(self, url, model, prompt, kw) -> None:
        try:
            for chunk in generate_stream(url, model, prompt, timeout_s=60, **kw):
                self.chunks.append(chunk)
                self.first.set()
                if self.stop.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - reported by the test through .error
            self.error = e
        finally:
            self.first.set()
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def finished(self) -> bool:
        return bool(self.chunks) and self.chunks[-1].final

    def join(self, timeout: float = 60) -> "Background":
        assert self.done.wait(timeout), "stream did not end"
        assert self.error is None, self.error
        return self


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_continuous_streams_chunks_then_final_when_called_over(streaming, protocol: str) -> None:
    url = streaming.grpc_url if protocol == "grpc" else streaming.http_url
    chunks = list(generate_stream(url, "tinystream", f"The council voted over {protocol}", max_tokens=6,
                                  ignore_eos=True, protocol=protocol))
    assert len(chunks) >= 2 and chunks[-1].finish_reason == "length"
    assert not any(c.final for c in chunks[:-1]) and "".join(c.text for c in chunks).strip()
    assert all(a.received_s <= b.received_s for a, b in zip(chunks, chunks[1:]))


def test_triton_continuous_gives_same_text_when_streamed_over_grpc_and_http(streaming) -> None:
    texts = ["".join(c.text for c in generate_stream(url, "tinystream", "Shares of the company rose", max_tokens=8,
                                                     protocol=p))
             for p, url in (("grpc", streaming.grpc_url), ("http", streaming.http_url))]
    assert texts[0] == texts[1] and texts[0]


def test_triton_continuous_admits_new_request_into_running_batch_when_it_arrives_mid_stream(streaming) -> None:
    long = Background(streaming, "tinystream", "The city council", max_tokens=LONG, ignore_eos=True)
    assert long.first.wait(30)
    short = Background(streaming, "tinystream", "Shares rose", max_tokens=4, ignore_eos=True).join()
    # Request-level batching would have made the short request wait for the long one to end.
    assert short.finished and not long.finished, "the short request did not overtake the running one"
    long.join()
    assert long.finished and short.chunks[-1].received_s < long.chunks[-1].received_s
    # The long stream went on while the short one ran: it received chunks in that window.
    window = [c for c in long.chunks if short.chunks[0].received_s <= c.received_s <= short.chunks[-1].received_s]
    assert window


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_continuous_frees_row_for_waiting_request_when_client_leaves_stream_over(streaming, protocol) -> None:
    log_before = streaming.log_file.read_text(errors="replace").count("cancelled by the client")
    first = Background(streaming, "tinystream1", "The city council", protocol, max_tokens=LONG, ignore_eos=True)
    assert first.first.wait(30)
    waiting = Background(streaming, "tinystream1", "Heavy rain", max_tokens=3, ignore_eos=True)
    time.sleep(0.05)
    assert not waiting.chunks and not first.finished, "the single row should be busy"
    first.stop.set()  # the client leaves: gRPC cancels the stream, HTTP closes the connection
    waiting.join()
    first.join()
    assert waiting.finished and not first.finished and len(first.chunks) < LONG
    deadline = time.monotonic() + 10
    while streaming.log_file.read_text(errors="replace").count("cancelled by the client") == log_before:
        assert time.monotonic() < deadline, "the server never saw the cancellation"
        time.sleep(0.1)


def test_triton_continuous_honours_max_tokens_and_stop_sequences_when_given(streaming) -> None:
    url = streaming.grpc_url
    full = "".join(c.text for c in generate_stream(url, "tinystream", "The president said", max_tokens=12,
                                                   ignore_eos=True))
    chunks = list(generate_stream(url, "tinystream", "The president said", max_tokens=3, ignore_eos=True))
    assert chunks[-1].finish_reason == "length" and len(chunks) <= 3
    assert full.startswith("".join(c.text for c in chunks))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = list(generate_stream(url, "tinystream", "The president said", max_tokens=12, ignore_eos=True,
                               stop=[stop]))
    assert cut[-1].finish_reason == "stop"
    assert "".join(c.text for c in cut) == full[:full.index(stop)]


def _raw_grpc(server, model: str, inputs: list[tuple[str, np.ndarray, str]]) -> Exception | None:
    import queue

    import tritonclient.grpc as g

    client = g.InferenceServerClient(server.grpc_url)
    box: queue.Queue = queue.Queue()
    try:
        client.start_stream(callback=lambda result=None, error=None: box.put(error))
        ins = []
        for name, arr, dtype in inputs:
            t = g.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            ins.append(t)
        client.async_stream_infer(model, ins)
        return box.get(timeout=30)
    finally:
        client.stop_stream()
        client.close()


def _text_in(s: str) -> tuple[str, np.ndarray, str]:
    return ("text_input", np.array([[s.encode()]], dtype=object), "BYTES")


@pytest.mark.parametrize("inputs, problem", [
    ([_text_in("")], "empty prompt"),
    ([_text_in("word " * 600)], "exceeds the model's 512 positions"),
    ([_text_in("hi"), ("max_tokens", np.array([[10000]], np.int32), "INT32")], "exceeds the limit"),
    ([_text_in("hi"), ("temperature", np.array([[-2.0]], np.float32), "FP32")], "temperature=-2.0"),
    ([_text_in("hi"), ("max_tokens", np.array([[4.0]], np.float64), "FP64")], "max_tokens"),  # wrong dtype
    ([("text_input", np.array([[b"a"], [b"b"]], dtype=object), "BYTES")], "batch"),  # wrong shape: 2 rows
], ids=["empty", "beyond-context", "max-tokens", "temperature", "dtype", "shape"])
def test_triton_continuous_fails_only_bad_request_when_running_beside_good_one(streaming, inputs, problem) -> None:
    good = Background(streaming, "tinystream", "The city council", max_tokens=40, ignore_eos=True)
    assert good.first.wait(30)
    error = _raw_grpc(streaming, "tinystream", inputs)
    assert error is not None and problem in str(error), str(error)
    good.join()
    assert good.finished and streaming.is_ready("tinystream", 1)


def test_triton_continuous_fails_with_error_event_when_http_prompt_is_empty(streaming) -> None:
    with pytest.raises(ServingError, match="empty prompt"):
        list(generate_stream(streaming.http_url, "tinystream", "", protocol="http"))


def test_triton_continuous_refuses_unknown_and_path_like_model_names_and_keeps_serving(streaming) -> None:
    with pytest.raises(ServingError, match="no_such_model"):
        list(generate_stream(streaming.grpc_url, "no_such_model", "hi"))
    with pytest.raises(InvalidRequest):
        list(generate_stream(streaming.http_url, "../tinystream", "hi", protocol="http"))
    # Sent raw, the server itself refuses a path-like name as well; it never reaches a model.
    req = urllib.request.Request(f"http://{streaming.http_url}/v2/models/x%2F..%2Ftinystream/generate_stream",
                                 data=json.dumps({"text_input": "hi"}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code in (400, 404)
    assert "".join(c.text for c in generate_stream(streaming.grpc_url, "tinystream", "Still serving", max_tokens=3,
                                                   ignore_eos=True))
