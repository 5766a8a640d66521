"""Client-side checks of streaming requests: model names are refused before anything is sent."""

from __future__ import annotations

import pytest

from serving.client import _stream_body, check_model_name, generate_batch, generate_stream
from tasks.errors import InvalidRequest, ServingError

CLOSED = "127.0.0.1:9"  # nothing listens there: a request that got sent would fail differently


@pytest.mark.parametrize("name", ["tinyllm", "trimflow_llm", "model-2.int8", "_x"])
def test_check_model_name_accepts_name_when_triton_could_serve_it(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "../secrets", "a\\b", "x y", ".hidden", "-flag", "m%2Fx", "ok\n"])
def test_check_model_name_raises_invalid_request_when_name_has_separator_or_odd_char(name: str) -> None:
    with pytest.raises(InvalidRequest, match="not servable") as e:
        check_model_name(name)
    assert isinstance(e.value, ServingError) and not e.value.retryable


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_stream_refuses_before_sending_when_model_name_has_path_separator(protocol: str) -> None:
    with pytest.raises(InvalidRequest):
        next(generate_stream(CLOSED, "../tinyllm", "hello", protocol=protocol))


def test_generate_batch_refuses_before_sending_when_model_name_has_path_separator() -> None:
    with pytest.raises(InvalidRequest):
        generate_batch(CLOSED, "models/tinyllm", ["hello"])


def test_stream_body_carries_only_given_parameters_when_built_for_generate_stream() -> None:
    body = _stream_body("hi", 8, None, 0.9, ("\n", "END"), None, True)
    assert body == {"text_input": "hi", "max_tokens": 8, "top_p": 0.9, "ignore_eos": True, "stop": ["\n", "END"]}
