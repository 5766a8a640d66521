"""The llm_continuous python-backend model with a stand-in for Triton's pb_utils: streaming with a
FINAL flag, per-request errors, cancellation; and its config spec read back with Triton's schema.

The real stub only exists inside tritonserver; tests/integration/test_triton_continuous.py runs it there.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from serving.model_config import ModelConfigSpec, parse_pbtxt
from serving.runtime.continuous import BatcherConfig, ContinuousBatcher
from tasks.errors import ConfigError
from tests.unit.test_continuous import TEXT, ScriptLM

MODEL_PY = Path(__file__).resolve().parents[2] / "serving" / "triton_models" / "llm_continuous" / "model.py"
FINAL = 1


class _Tensor:
    def __init__(self, name: str, arr: np.ndarray) -> None:
        self.name, self._arr = name, arr

    def as_numpy(self) -> np.ndarray:
        return self._arr


class _TritonError:
    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors, error=None) -> None:
        self.output_tensors, self.error = output_tensors, error

    def out(self, name: str) -> str:
        (t,) = [t for t in self.output_tensors if t.name == name]
        assert t.as_numpy().shape == (1, 1)
        return t.as_numpy()[0, 0].decode()


class _Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[_Response | None, int]] = []
        self.done = threading.Event()

    def send(self, response=None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags & FINAL:
            self.done.set()

    def text(self) -> str:
        return "".join(r.out("text_output") for r, _ in self.sent if r is not None and r.error is None)


class _Request:
    def __init__(self, prompt: str | list[str], **optional) -> None:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        self.inputs = {"text_input": _Tensor("text_input", np.array([[p.encode() for p in prompts]], dtype=object))}
        for name, (value, dtype) in optional.items():
            self.inputs[name] = _Tensor(name, np.array([[value]], dtype=dtype))
        self.sender = _Sender()
        self.cancelled = False

    def get_response_sender(self) -> _Sender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled


def _fake_pb_utils() -> types.ModuleType:
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor = _Tensor
    m.TritonError = _TritonError
    m.InferenceResponse = _Response
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    m.TritonModelException = RuntimeError
    m.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    m.using_decoupled_model_transaction_policy = lambda cfg: True
    m.Logger = types.SimpleNamespace(log_info=lambda msg: None, log_warn=lambda msg: None,
                                     log_error=lambda msg: None)
    return m


@pytest.fixture()
def model(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("llm_continuous_model_under_test", MODEL_PY)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    m = mod.TritonPythonModel()
    m.setup(ContinuousBatcher(ScriptLM(max_positions=256), BatcherConfig(max_batch=1, max_tokens_limit=100)),
            default_max_tokens=4)
    m.start()
    yield m
    m.finalize()


def _wait(*requests: _Request) -> None:
    for r in requests:
        assert r.sender.done.wait(10), f"no FINAL response; sent {r.sender.sent}"


def test_continuous_model_streams_text_with_final_flag_on_last_response_when_request_is_good(model) -> None:
    r = _Request("x" * len(TEXT), max_tokens=(5, np.int32))
    assert model.execute([r]) is None
    _wait(r)
    assert r.sender.text() == TEXT[:5]
    flags = [f for _, f in r.sender.sent]
    assert flags[-1] == FINAL and set(flags[:-1]) == {0} and len(flags) >= 2
    assert r.sender.sent[-1][0].out("finish_reason") == "length"


def test_continuous_model_honours_stop_sequences_when_given_as_string_list(model) -> None:
    r = _Request("x" * len(TEXT), max_tokens=(30, np.int32))
    r.inputs["stop"] = _Tensor("stop", np.array([[b"zzz", b"world"]], dtype=object))
    model.execute([r])
    _wait(r)
    assert r.sender.text() == "hello " and r.sender.sent[-1][0].out("finish_reason") == "stop"


@pytest.mark.parametrize("bad, problem", [
    (_Request(""), "empty prompt"),
    (_Request(["one", "two"]), "one prompt per streamed request"),
    (_Request("x", max_tokens=(101, np.int32)), "exceeds the limit 100"),
    (_Request("x", temperature=(-1.0, np.float32)), "temperature=-1.0"),
    (_Request("x", top_p=(1.5, np.float32)), "top_p=1.5"),
    (_Request("x" * 250, max_tokens=(10, np.int32)), "exceeds the model's 256 positions"),
])
def test_continuous_model_fails_only_bad_request_when_sent_with_good_ones(model, bad: _Request, problem: str) -> None:
    good = [_Request("xy", max_tokens=(3, np.int32)), _Request("xyz", max_tokens=(2, np.int32))]
    model.execute([good[0], bad, good[1]])
    _wait(bad, *good)
    ((resp, flags),) = bad.sender.sent
    assert flags == FINAL and resp.error.code == "INVALID_ARG" and problem in resp.error.message
    assert [g.sender.text() for g in good] == [TEXT[2:5], TEXT[3:5]]


def test_continuous_model_frees_row_for_next_request_when_client_cancels(model) -> None:
    # Each decode step takes 20 ms, so the 100-token request is still running (about 2 s) when the
    # second one arrives; otherwise a fast script LM can finish it inside one poll on an idle machine.
    forward = model.batcher.lm.forward
    model.batcher.lm.forward = lambda *a: (time.sleep(0.02), forward(*a))[1]
    long, nxt = _Request("x", max_tokens=(100, np.int32), ignore_eos=(True, np.bool_)), _Request("xx")
    model.execute([long])
    model.execute([nxt])
    for _ in range(200):
        if len(long.sender.sent) >= 3:
            break
        threading.Event().wait(0.01)
    assert not nxt.sender.sent  # the only row is busy
    long.cancelled = True
    _wait(long, nxt)
    assert long.sender.sent[-1] == (None, FINAL)  # released without a response: the client is gone
    assert len(long.sender.sent) < 100 and nxt.sender.text() == TEXT[2:6]
    assert model.batcher.stats()["cancelled"] == 1


def test_continuous_model_answers_every_live_request_with_error_when_unloaded(model) -> None:
    model._stop.set()  # park the batching thread so the request is still in flight at unload
    model.batcher.wake()
    model._thread.join(5)
    r = _Request("x", max_tokens=(5, np.int32))
    model.execute([r])
    model.finalize()
    _wait(r)
    ((resp, flags),) = r.sender.sent
    assert flags == FINAL and resp.error.code == "INTERNAL" and "model unloaded" in resp.error.message


# -- the config spec -------------------------------------------------------------------------------
def test_llm_continuous_spec_renders_decoupled_unbatched_config_when_parsed_by_triton_schema() -> None:
    cfg = parse_pbtxt(ModelConfigSpec.llm_continuous("tinystream", max_batch=4, prefix_cache_bytes=0).to_pbtxt())
    assert cfg.model_transaction_policy.decoupled and cfg.max_batch_size == 1
    assert not cfg.HasField("dynamic_batching") and not cfg.response_cache.enable
    assert [i.name for i in cfg.input if not i.optional] == ["text_input"]
    assert {o.name for o in cfg.output} == {"text_output", "finish_reason"}
    assert list(next(i for i in cfg.input if i.name == "stop").dims) == [-1]
    assert cfg.parameters["max_batch"].string_value == "4" and cfg.parameters["prefix_cache_bytes"].string_value == "0"


@pytest.mark.parametrize("kwargs, field", [({"max_batch": 0}, "max_batch"), ({"prefix_cache_bytes": -1}, "prefix_cache"),
                                           ({"default_max_tokens": 64, "max_tokens_limit": 32}, "max_tokens_limit")])
def test_llm_continuous_spec_raises_config_error_when_limit_is_impossible(kwargs, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfigSpec.llm_continuous("m", **kwargs)
