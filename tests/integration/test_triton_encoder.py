"""The encoder_embed python-backend model in the real tritonserver: embeddings, batching, response cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.client import cache_hits_from_metrics, model_stats
from serving.semantic_cache import embed_texts
from tasks.errors import ServingError

pytestmark = pytest.mark.integration

TEXTS = ["The city council voted on Tuesday.", "Shares of the company rose after it reported higher profits.",
         "Heavy rain"]


def _stats(served):
    (s,) = model_stats(served.server.grpc_url, served.name, served.version)
    return s


def _torch_reference(hf_dir, texts: list[str], max_length: int) -> np.ndarray:
    """Mean-pooled, normalised BERT states computed with PyTorch, one text at a time (no padding)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    bert, tok = AutoModel.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir)
    out = []
    for t in texts:
        batch = tok(t, return_tensors="pt", truncation=True, max_length=max_length)
        with torch.no_grad():
            h = bert(**batch).last_hidden_state
        out.append(torch.nn.functional.normalize(h.mean(1), dim=1)[0].numpy())
    return np.stack(out)


def test_triton_encoder_matches_pytorch_when_texts_of_different_length_share_a_request(
        triton_encoder, tiny_encoder_export) -> None:
    got = embed_texts(triton_encoder.server.grpc_url, triton_encoder.name, TEXTS)
    ref = _torch_reference(tiny_encoder_export["hf"], TEXTS, max_length=128)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_triton_encoder_batches_requests_when_sent_concurrently(triton_encoder) -> None:
    import tritonclient.grpc as g

    before = _stats(triton_encoder)
    texts = [f"Flooding closed road number {i} near the river" for i in range(24)]  # distinct: no cache hits
    client = g.InferenceServerClient(triton_encoder.server.grpc_url)
    done, errors = threading.Semaphore(0), []

    def cb(result=None, error=None):
        if error is not None:
            errors.append(error)
        done.release()

    try:
        for t in texts:
            inp = g.InferInput("text", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[t.encode()]], dtype=np.object_))
            client.async_infer(triton_encoder.name, [inp], cb)
        assert all(done.acquire(timeout=60) for _ in texts)
    finally:
        client.close()
    assert not errors, errors
    d = _stats(triton_encoder) - before
    assert d.inference_count == 24
    assert d.execution_count < d.inference_count, d.as_dict()


def test_triton_encoder_answers_from_response_cache_when_text_repeats(triton_encoder) -> None:
    s = triton_encoder.server
    before = _stats(triton_encoder)
    metric_hits = cache_hits_from_metrics(s.metrics(), triton_encoder.name)
    first = embed_texts(s.grpc_url, triton_encoder.name, ["The mayor opened the new bridge today"])
    second = embed_texts(s.grpc_url, triton_encoder.name, ["The mayor opened the new bridge today"])
    d = _stats(triton_encoder) - before
    np.testing.assert_array_equal(first, second)
    assert d.cache_hit_count == 1 and d.cache_miss_count == 1 and d.execution_count == 1, d.as_dict()
    assert cache_hits_from_metrics(s.metrics(), triton_encoder.name) == metric_hits + 1


def test_triton_encoder_serves_one_text_per_request_when_unbatched(triton_server, triton_encoder,
                                                                   tiny_encoder_export) -> None:
    import tritonclient.grpc as g

    from serving.model_config import ModelConfigSpec
    from serving.repository import ModelRepository
    from serving.semantic_cache import write_encoder_version

    name = "tinyenc_unbatched"
    repo = ModelRepository(triton_server.config.model_repository)
    write_encoder_version(repo, name, 1, tiny_encoder_export["export"])
    repo.write_config(name, ModelConfigSpec.encoder_embed(name, max_batch_size=0, response_cache=False).to_pbtxt())
    triton_server.load(name)
    try:
        assert triton_server.model_config(name)["max_batch_size"] == 0
        client = g.InferenceServerClient(triton_server.grpc_url)
        inp = g.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array([TEXTS[0].encode()], dtype=np.object_))
        vec = client.infer(name, [inp]).as_numpy("embedding")
        client.close()
        batched = embed_texts(triton_server.grpc_url, triton_encoder.name, [TEXTS[0]])[0]
        assert vec.shape == batched.shape
        np.testing.assert_allclose(vec, batched, atol=1e-6)
    finally:
        triton_server.unload(name)


def test_triton_encoder_rejects_request_when_text_is_not_utf8(triton_encoder) -> None:
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    client = g.InferenceServerClient(triton_encoder.server.grpc_url)
    inp = g.InferInput("text", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"\xff\xfe broken"]], dtype=np.object_))
    try:
        with pytest.raises(InferenceServerException, match="not UTF-8"):
            client.infer(triton_encoder.name, [inp])
    finally:
        client.close()
    assert embed_texts(triton_encoder.server.grpc_url, triton_encoder.name, ["still answering"]).shape[0] == 1


def test_embed_texts_raises_serving_error_when_model_unknown(triton_encoder) -> None:
    with pytest.raises(ServingError, match="no_such_encoder"):
        embed_texts(triton_encoder.server.grpc_url, "no_such_encoder", ["x"])
