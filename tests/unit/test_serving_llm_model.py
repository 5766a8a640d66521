"""The python-backend model's batching and per-request errors, with a stand-in for Triton's pb_utils.

The real stub only exists inside tritonserver; the integration tests run the model there.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

MODEL_PY = Path(__file__).resolve().parents[2] / "serving" / "triton_models" / "llm_generate" / "model.py"


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

    def text(self) -> list[str]:
        assert self.error is None, self.error.message
        (t,) = self.output_tensors
        assert t.name == "text_output" and t.as_numpy().shape[1] == 1
        return [v.decode() for v in t.as_numpy().reshape(-1)]


def _fake_pb_utils() -> types.ModuleType:
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor = _Tensor
    m.TritonError = _TritonError
    m.InferenceResponse = _Response
    m.get_input_tensor_by_name = lambda request, name: request.get(name)
    m.Logger = types.SimpleNamespace(log_info=lambda msg: None, log_error=lambda msg: None)
    return m


@dataclass
class _Meta:
    max_positions: int = 20
    pad_token_id: int = 0


class FakeLM:
    """Characters are tokens; generation yields 'a', 'b', 'c', ... and records every batch."""

    def __init__(self, fail_when_sampling: bool = False) -> None:
        self.meta = _Meta()
        self.calls: list[tuple[list[list[int]], int, float]] = []
        self.fail_when_sampling = fail_when_sampling

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def generate_ids(self, prompts, max_new_tokens, temperature=0.0, **kw):
        self.calls.append(([list(p) for p in prompts], max_new_tokens, temperature))
        if self.fail_when_sampling and temperature > 0:
            raise RuntimeError("onnxruntime exploded")
        return [[ord("a") + k for k in range(max_new_tokens)] for _ in prompts]


@pytest.fixture()
def model(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("llm_generate_model_under_test", MODEL_PY)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    m = mod.TritonPythonModel()
    m.setup(FakeLM(), default_max_tokens=4, max_tokens_limit=10)
    return m


def req(*prompts: str, max_tokens: int | None = None, temperature: float | None = None) -> dict:
    n = len(prompts)
    r = {"text_input": _Tensor("text_input", np.array([[p.encode()] for p in prompts], dtype=object))}
    if max_tokens is not None:
        r["max_tokens"] = _Tensor("max_tokens", np.full((n, 1), max_tokens, np.int32))
    if temperature is not None:
        r["temperature"] = _Tensor("temperature", np.full((n, 1), temperature, np.float32))
    return r


def test_llm_model_runs_one_generate_for_all_requests_when_temperatures_match(model) -> None:
    out = model.execute([req("hi", max_tokens=2), req("hello", max_tokens=5), req("x")])
    assert [r.text() for r in out] == [["ab"], ["abcde"], ["abcd"]]
    assert len(model.lm.calls) == 1
    prompts, max_new, temp = model.lm.calls[0]
    assert (len(prompts), max_new, temp) == (3, 5, 0.0)


def test_llm_model_splits_into_one_generate_per_temperature_when_they_differ(model) -> None:
    out = model.execute([req("a"), req("b", temperature=0.7), req("c")])
    assert all(r.error is None for r in out)
    assert sorted((len(p), t) for p, _, t in model.lm.calls) == [(1, pytest.approx(0.7)), (2, 0.0)]


def test_llm_model_answers_every_row_when_one_request_carries_several_prompts(model) -> None:
    out = model.execute([req("one", "two", max_tokens=3), req("three", max_tokens=1)])
    assert [r.text() for r in out] == [["abc", "abc"], ["a"]]
    assert len(model.lm.calls[0][0]) == 3


@pytest.mark.parametrize("bad, problem", [
    (req(""), "empty prompt"),
    (req("x", max_tokens=0), "max_tokens=0"),
    (req("x", max_tokens=11), "max_tokens=11"),
    (req("x", temperature=-1.0), "temperature=-1.0"),
    (req("x", temperature=float("nan")), "temperature=nan"),
    (req("x" * 18, max_tokens=3), "exceeds the model's 20 positions"),
])
def test_llm_model_fails_only_the_bad_request_when_batched_with_good_ones(model, bad, problem: str) -> None:
    out = model.execute([req("good"), bad, req("fine", max_tokens=2)])
    assert out[0].text() == ["abcd"] and out[2].text() == ["ab"]
    assert out[1].output_tensors == [] and out[1].error.code == "INVALID_ARG"
    assert problem in out[1].error.message
    assert [len(p) for p, _, _ in model.lm.calls] == [2]


def test_llm_model_fails_only_that_group_when_generation_raises(model) -> None:
    model.lm.fail_when_sampling = True
    out = model.execute([req("a"), req("b", temperature=1.0)])
    assert out[0].text() == ["abcd"]
    assert out[1].error.code == "INTERNAL" and "onnxruntime exploded" in out[1].error.message
