"""Encoder evaluation: Lee-format parsing, Spearman, and one measurement for PyTorch and onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.encoder_eval import (EncoderEvalConfig, LeeCorpus, OrtEncoderRunner, TorchEncoderRunner, embed_texts,
                                lee_corpus, lee_spearman, measure_encoder, measure_encoders, read_lee, spearman)
from tasks.encoder_export import EncoderExportConfig, export_encoder
from tasks.errors import ConfigError, SourceError, UnsupportedModelError
from tests.tiny import CORPUS, make_tiny_encoder, make_tiny_llm

DOCS = CORPUS + ["Flood waters rose in the towns as rain kept falling.", "Profits rose at the company."]


def _write_lee(folder, docs, ratings, encoding="latin-1"):
    """Files in the Lee format: documents one per line (no final newline), upper-triangular TSV matrix."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lee.cor").write_bytes("\n".join(docs).encode(encoding))
    n = len(docs)
    rows = []
    for i in range(n):
        rows.append("\t".join("1" if j == i else ("0" if j < i else f"{ratings[i, j]:.8g}") for j in range(n)))
    (folder / "similarities0-1.txt").write_text("\n".join(rows) + "\n")
    return folder / "lee.cor", folder / "similarities0-1.txt"


def _ratings(n, seed=0):
    r = np.random.default_rng(seed).uniform(0.2, 1.0, (n, n))
    return np.triu(r, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "bert")


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_encoder(tiny, out, EncoderExportConfig())
    return out


def test_read_lee_returns_symmetric_ratings_and_documents_when_files_are_in_lee_format(tmp_path):
    docs = DOCS[:5] + ["Prices in £ rose."]
    r = _ratings(len(docs))
    corpus = read_lee(*_write_lee(tmp_path, docs, r))
    assert corpus.documents == tuple(docs)  # Latin-1 '£' decoded, no empty trailing document
    np.testing.assert_allclose(corpus.ratings, corpus.ratings.T)
    np.testing.assert_allclose(np.diag(corpus.ratings), 1.0)
    np.testing.assert_allclose(corpus.pairs(), r[np.triu_indices(len(docs), 1)], rtol=1e-6)
    assert corpus.pairs().shape == (len(docs) * (len(docs) - 1) // 2,)


def test_read_lee_raises_source_error_when_matrix_size_differs_from_document_count(tmp_path):
    docs_path, ratings_path = _write_lee(tmp_path, DOCS[:4], _ratings(4))
    docs_path.write_text("\n".join(DOCS[:5]))
    with pytest.raises(SourceError, match="does not match 5 documents"):
        read_lee(docs_path, ratings_path)


def test_read_lee_raises_source_error_when_lower_triangle_is_filled(tmp_path):
    docs_path, ratings_path = _write_lee(tmp_path, DOCS[:3], _ratings(3))
    ratings_path.write_text("1\t0.5\t0.4\n0.5\t1\t0.3\n0\t0\t1\n")
    with pytest.raises(SourceError, match="lower triangle"):
        read_lee(docs_path, ratings_path)


def test_lee_corpus_has_50_documents_and_1225_rated_pairs_when_read_from_gensim_wheel():
    corpus = lee_corpus()
    assert len(corpus.documents) == 50
    pairs = corpus.pairs()
    assert pairs.shape == (1225,)
    assert 0.2 <= pairs.min() and pairs.max() <= 1.0  # mean 1-5 rating divided by 5
    assert "£" in " ".join(corpus.documents)


def test_spearman_matches_scipy_when_values_have_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_lee_spearman_is_one_when_similarities_rank_like_the_ratings():
    # Embeddings whose pairwise cosines are a monotone function of the ratings: unit vectors at angles.
    angles = np.array([0.0, 0.3, 1.0, 1.9])
    emb = np.stack([np.cos(angles), np.sin(angles)], 1)
    sims = emb @ emb.T
    corpus = LeeCorpus(documents=tuple("abcd"), ratings=(sims + 1) / 2)
    assert lee_spearman(emb, corpus) == pytest.approx(1.0)
    assert lee_spearman(emb[:, ::-1] * [1, -1], corpus) == pytest.approx(1.0)  # rotation-invariant


def test_torch_and_ort_runners_give_the_same_embeddings_when_given_the_same_texts(tiny, tiny_onnx):
    a = embed_texts(TorchEncoderRunner(tiny, threads=1), DOCS, batch_size=3)
    b = embed_texts(OrtEncoderRunner(tiny_onnx, threads=1), DOCS, batch_size=3)
    assert np.abs(a - b).max() < 1e-4


def test_measure_encoder_reports_quality_size_and_speed_when_run_on_tiny_models(tiny, tiny_onnx, tmp_path):
    corpus = read_lee(*_write_lee(tmp_path, DOCS, _ratings(len(DOCS))))
    cfg = EncoderEvalConfig(threads=1, batch_size=2, latency_items=3, repeats=1)
    t = measure_encoder(TorchEncoderRunner(tiny), cfg, corpus)
    o = measure_encoder(OrtEncoderRunner(tiny_onnx), cfg, corpus)
    for m in (t, o):
        assert m["threads"] == 1 and m["batch_size"] == 2
        assert m["latency_ms_p50_b1"] > 0 and m["throughput_b16"] > 0 and m["size_bytes"] > 0
        assert m["timed_items"] == len(DOCS) // 2 * 2
        assert m["avg_layers"] is None
    assert t["quality"] == pytest.approx(o["quality"], abs=1e-3)  # same model, two runtimes
    assert -1.0 <= t["quality"] <= 1.0


def test_measure_encoders_interleaves_timed_calls_when_measuring_several_runners(tiny_onnx, tmp_path):
    corpus = read_lee(*_write_lee(tmp_path, DOCS, _ratings(len(DOCS))))
    calls: list[str] = []
    runners = {}
    for name in ("a", "b"):
        r = OrtEncoderRunner(tiny_onnx, threads=1)
        real = r.embed_arrays
        r.embed_arrays = lambda feed, real=real, name=name: calls.append(name) or real(feed)
        runners[name] = r
    cfg = EncoderEvalConfig(threads=1, batch_size=2, latency_items=4, repeats=2)
    out = measure_encoders(runners, cfg, corpus)
    assert set(out) == {"a", "b"} and out["a"]["quality"] == out["b"]["quality"]
    # The timed part (after both runners' quality and warm-up calls) alternates between runners.
    n_batches = len(DOCS) // 2
    timed = calls[-(2 * cfg.latency_items + 2 * cfg.repeats * n_batches):]
    latency = timed[: 2 * cfg.latency_items]
    assert all(latency[i] != latency[i + 1] for i in range(0, len(latency), 2))
    assert timed.count("a") == timed.count("b")


def test_measure_encoder_raises_config_error_when_timing_texts_are_fewer_than_a_batch(tiny_onnx, tmp_path):
    corpus = read_lee(*_write_lee(tmp_path, DOCS[:3], _ratings(3)))
    with pytest.raises(ConfigError, match="fewer than one batch"):
        measure_encoder(OrtEncoderRunner(tiny_onnx), EncoderEvalConfig(batch_size=16), corpus)


def test_torch_encoder_runner_raises_unsupported_model_error_when_model_is_a_causal_lm(tmp_path):
    with pytest.raises(UnsupportedModelError, match="encoders"):
        TorchEncoderRunner(make_tiny_llm(tmp_path / "llm"))
