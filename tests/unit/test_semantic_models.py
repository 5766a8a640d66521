"""The encoder_embed and semantic_gateway python-backend models with a stand-in for Triton's pb_utils.

The real stub only exists inside tritonserver; tests/integration/test_triton_encoder.py and
test_triton_cache_semantic.py run the models there.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from serving.semantic_cache import CacheUnavailable, EmbeddedStore, SemanticCache, SemanticCacheConfig

MODELS = Path(__file__).resolve().parents[2] / "serving" / "triton_models"


class _Tensor:
    def __init__(self, name: str, arr: np.ndarray) -> None:
        self.name, self._arr = name, arr

    def as_numpy(self) -> np.ndarray:
        return self._arr


class _TritonError:
    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class _Response:
    def __init__(self, output_tensors, error=None) -> None:
        self.output_tensors, self.error = output_tensors, error

    def out(self, name: str) -> np.ndarray:
        assert self.error is None, self.error.message()
        return next(t for t in self.output_tensors if t.name == name).as_numpy()

    def strings(self, name: str) -> list[str]:
        return [v.decode() for v in self.out(name).reshape(-1)]


class _Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[_Response, int]] = []

    def send(self, response, flags=0) -> None:
        self.sent.append((response, flags))


class _Request(dict):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.sender = _Sender()

    def get_response_sender(self) -> _Sender:
        return self.sender


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def increment(self, n: int) -> None:
        self.value += n


def _fake_pb_utils() -> types.ModuleType:
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor = _Tensor
    m.TritonError = _TritonError
    m.InferenceResponse = _Response
    m.get_input_tensor_by_name = lambda request, name: request.get(name)
    m.Logger = types.SimpleNamespace(log_info=lambda msg: None, log_error=lambda msg: None)
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    return m


def _load(folder: str, monkeypatch) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location(f"{folder}_model_under_test", MODELS / folder / "model.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _texts(*texts: str | bytes) -> _Tensor:
    return _Tensor("text", np.array([[t if isinstance(t, bytes) else t.encode()] for t in texts], dtype=np.object_))


# -- encoder_embed ----------------------------------------------------------------------------------
class FakeEncoder:
    """Embeds text i as a one-hot-ish vector; records each batch."""

    def __init__(self, dim: int = 4, fail: bool = False) -> None:
        self.dim, self.fail, self.calls = dim, fail, []

    def embed(self, texts):
        self.calls.append(list(texts))
        if self.fail:
            raise RuntimeError("onnxruntime exploded")
        return np.array([[len(t), 1, 0, 0] for t in texts], np.float32)


@pytest.fixture()
def encoder_module(monkeypatch):
    return _load("encoder_embed", monkeypatch)


def test_encoder_model_runs_one_batch_when_requests_carry_several_texts(encoder_module) -> None:
    model, enc = encoder_module.TritonPythonModel(), FakeEncoder()
    model.setup(enc, batched=True)
    responses = model.execute([{"text": _texts("a")}, {"text": _texts("bb", "ccc")}, {"text": _texts("dddd")}])
    assert enc.calls == [["a", "bb", "ccc", "dddd"]]
    shapes = [r.out("embedding").shape for r in responses]
    assert shapes == [(1, 4), (2, 4), (1, 4)]
    assert responses[1].out("embedding")[:, 0].tolist() == [2, 3]


def test_encoder_model_returns_one_vector_when_unbatched(encoder_module) -> None:
    model = encoder_module.TritonPythonModel()
    model.setup(FakeEncoder(), batched=False)
    (r,) = model.execute([{"text": _Tensor("text", np.array([b"hello"], dtype=np.object_))}])
    assert r.out("embedding").shape == (4,)


def test_encoder_model_fails_only_bad_request_when_text_is_not_utf8(encoder_module) -> None:
    model, enc = encoder_module.TritonPythonModel(), FakeEncoder()
    model.setup(enc)
    good, bad, good2 = model.execute([{"text": _texts("ok")}, {"text": _texts(b"\xff\xfe")},
                                      {"text": _texts("fine")}])
    assert bad.error.code() == "INVALID_ARG" and "UTF-8" in bad.error.message()
    assert good.out("embedding").shape == (1, 4) and good2.out("embedding")[0, 0] == 4
    assert enc.calls == [["ok", "fine"]]


def test_encoder_model_fails_whole_batch_with_internal_error_when_session_fails(encoder_module) -> None:
    model = encoder_module.TritonPythonModel()
    model.setup(FakeEncoder(fail=True))
    responses = model.execute([{"text": _texts("a")}, {"text": _texts("b")}])
    assert all(r.error.code() == "INTERNAL" and "exploded" in r.error.message() for r in responses)


def _tiny_onnx_encoder(folder: Path, dim: int = 8) -> Path:
    """A contract-shaped encoder without torch: embedding lookup, masked mean, L2 normalisation."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(["the council voted on the budget", "shares rose after profits"] * 4,
                            trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                     "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(folder / "tokenizer.json"))
    table = np.random.default_rng(0).normal(size=(tok.get_vocab_size(), dim)).astype(np.float32)
    big = ["B", "S"]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["mean"]),
        helper.make_node("LpNormalization", ["mean"], ["sentence_embedding"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, big) for n in ("input_ids", "attention_mask",
                                                                            "token_type_ids")],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["B", dim])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array(np.array([2], np.int64), "axis2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "trimflow_encoder.json").write_text(json.dumps({"format": "trimflow-encoder/1", "onnx_file": "model.onnx",
                                                              "max_seq_length": 16}))
    return folder


def test_onnx_encoder_gives_same_vector_when_text_is_batched_with_longer_ones(encoder_module, tmp_path) -> None:
    enc = encoder_module.OnnxEncoder(_tiny_onnx_encoder(tmp_path / "enc"))
    alone = enc.embed(["the council voted"])
    batch = enc.embed(["shares rose after the council voted on the budget", "the council voted"])
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-6)
    assert not np.allclose(batch[0], batch[1])
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)


def test_onnx_encoder_runs_length_buckets_when_batch_mixes_short_and_long_texts(encoder_module, tmp_path) -> None:
    enc = encoder_module.OnnxEncoder(_tiny_onnx_encoder(tmp_path / "enc"))
    runs: list[tuple[int, int]] = []
    real_run = enc.session.run

    class Counting:  # onnxruntime sessions do not allow attribute patching
        def run(self, names, feed):
            runs.append(feed["input_ids"].shape)
            return real_run(names, feed)

    enc.session = Counting()
    texts = ["the budget", "the council voted on the budget after profits rose", "shares rose"]
    got = enc.embed(texts)
    assert len(runs) == 2 and sorted(b for b, _ in runs) == [1, 2]  # the two short texts share a run
    np.testing.assert_allclose(got, np.concatenate([enc.embed([t]) for t in texts]), atol=1e-6)


def test_onnx_encoder_truncates_when_text_exceeds_max_length(encoder_module, tmp_path) -> None:
    enc = encoder_module.OnnxEncoder(_tiny_onnx_encoder(tmp_path / "enc"))
    assert enc.max_length == 16
    long = " ".join(["budget"] * 100)
    np.testing.assert_allclose(enc.embed([long]), enc.embed([" ".join(["budget"] * 30)]), atol=1e-6)


# -- semantic_gateway -------------------------------------------------------------------------------
def _bag_of_words(text: str, dim: int = 64) -> np.ndarray:
    """Stable stand-in embedding: hashed word counts, so rewordings that share words are close."""
    v = np.zeros(dim, np.float32)
    for w in text.lower().replace("?", " ").replace(".", " ").split():
        v[hashlib.sha256(w.encode()).digest()[0] % dim] += 1
    return v


class FakeBackend:
    def __init__(self, fail_prompt: str | None = None, embed_fails: bool = False) -> None:
        self.llm = "tinyllm"
        self.generated: list[tuple[str, int | None, float | None]] = []
        self.fail_prompt, self.embed_fails = fail_prompt, embed_fails

    async def embed(self, prompt: str) -> np.ndarray:
        if self.embed_fails:
            raise CacheUnavailable("encoder down")
        return _bag_of_words(prompt)

    async def generate(self, row) -> str:
        await asyncio.sleep(0)
        self.generated.append((row.prompt, row.max_tokens, row.temperature))
        if row.prompt == self.fail_prompt:
            raise self.error_type(f"llm tinyllm: max_tokens too large", "INVALID_ARG")
        return f"answer({row.prompt})"


@pytest.fixture()
def gateway(monkeypatch):
    mod = _load("semantic_gateway", monkeypatch)

    def make(backend: FakeBackend | None = None, decoupled: bool = False, cache: SemanticCache | None = None):
        model = mod.TritonPythonModel()
        backend = backend or FakeBackend()
        backend.error_type = mod.BackendError
        counters = {r: _Counter() for r in mod.RESULTS}
        model.setup(cache or SemanticCache(SemanticCacheConfig(threshold=0.75, ttl_s=0)), backend, counters,
                    decoupled=decoupled)
        return model, backend, counters
    return make


def _prompt(text: str, max_tokens: int | None = None, temperature: float | None = None) -> _Request:
    r = _Request(text_input=_Tensor("text_input", np.array([[text.encode()]], dtype=np.object_)))
    if max_tokens is not None:
        r["max_tokens"] = _Tensor("max_tokens", np.array([[max_tokens]], np.int32))
    if temperature is not None:
        r["temperature"] = _Tensor("temperature", np.array([[temperature]], np.float32))
    return r


def _run(model, requests):
    return asyncio.run(model.execute(requests))


def test_gateway_answers_from_cache_when_paraphrase_follows(gateway) -> None:
    model, backend, counters = gateway()
    (first,) = _run(model, [_prompt("Why did the city council vote on the new budget?")])
    (second,) = _run(model, [_prompt("why did the city council vote on the budget")])
    assert first.strings("cache_status") == ["miss"] and second.strings("cache_status") == ["hit"]
    assert second.strings("text_output") == first.strings("text_output")
    assert len(backend.generated) == 1
    assert (counters["hit"].value, counters["miss"].value) == (1, 1)


def test_gateway_asks_llm_when_number_changes_despite_same_words(gateway) -> None:
    model, backend, counters = gateway()
    _run(model, [_prompt("Summarize why 5 towns flooded")])
    (r,) = _run(model, [_prompt("Summarize why 6 towns flooded")])
    assert r.strings("cache_status") == ["guarded"] and r.strings("text_output") == ["answer(Summarize why 6 towns flooded)"]
    assert len(backend.generated) == 2 and counters["guarded"].value == 1


def test_gateway_bypasses_cache_when_temperature_is_positive(gateway) -> None:
    model, backend, counters = gateway()
    for _ in range(2):
        (r,) = _run(model, [_prompt("Tell me a story", temperature=0.8)])
        assert r.strings("cache_status") == ["bypass"]
    assert len(backend.generated) == 2 and counters["bypass"].value == 2


def test_gateway_keeps_max_tokens_apart_when_same_prompt(gateway) -> None:
    model, backend, _ = gateway()
    _run(model, [_prompt("Summarize the budget vote", max_tokens=8)])
    (r,) = _run(model, [_prompt("Summarize the budget vote", max_tokens=32)])
    assert r.strings("cache_status") == ["miss"] and backend.generated[-1][1] == 32


def test_gateway_answers_uncached_when_cache_is_unavailable(gateway) -> None:
    model, backend, counters = gateway(FakeBackend(embed_fails=True))
    (r,) = _run(model, [_prompt("Summarize the budget vote")])
    assert r.strings("cache_status") == ["error"] and r.strings("text_output") == ["answer(Summarize the budget vote)"]
    assert counters["error"].value == 1


def test_gateway_fails_only_bad_requests_when_batched_with_good_ones(gateway) -> None:
    model, _, _ = gateway(FakeBackend(fail_prompt="too long please"))
    good, empty, refused = _run(model, [_prompt("Summarize the budget vote"), _prompt("   "),
                                        _prompt("too long please")])
    assert good.strings("text_output") == ["answer(Summarize the budget vote)"]
    assert empty.error.code() == "INVALID_ARG" and "empty prompt" in empty.error.message()
    assert refused.error.code() == "INVALID_ARG" and "max_tokens" in refused.error.message()


def test_gateway_sends_each_response_with_final_flag_when_decoupled(gateway) -> None:
    model, _, _ = gateway(decoupled=True)
    requests = [_prompt("Summarize the budget vote"), _prompt("Explain the flood")]
    assert _run(model, requests) is None
    for req in requests:
        ((response, flags),) = req.sender.sent
        assert flags == 1 and response.strings("cache_status") == ["miss"]


def test_gateway_answers_second_identical_prompt_from_cache_when_shared_store() -> None:
    # Two gateway instances share entries only through a shared store (Redis in production).
    store = EmbeddedStore(ttl_s=0)
    caches = [SemanticCache(SemanticCacheConfig(ttl_s=0), store) for _ in range(2)]
    vec = _bag_of_words("Summarize the budget vote")
    caches[0].insert("tinyllm|mt=default", "Summarize the budget vote", vec, "answer")
    assert caches[1].lookup("tinyllm|mt=default", "Summarize the budget vote", vec).status == "hit"
