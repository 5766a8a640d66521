"""Real all-MiniLM-L6-v2 (slow): the ONNX export reproduces sentence-transformers' own embeddings."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from tasks.ingest import materialize
    from tasks.settings import Settings

    return materialize("minilm", Settings.from_env().cache_dir)[0]


def test_export_encoder_matches_sentence_transformers_when_model_is_minilm(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    from tasks.encoder_eval import lee_corpus
    from tasks.encoder_export import EncoderExportConfig, export_encoder
    from tasks.encoder_runtime import OnnxEncoder
    from tasks.ingest import ALIASES, resolve

    export_encoder(minilm, tmp_path / "onnx", EncoderExportConfig())
    docs = list(lee_corpus().documents[:16]) + ["word " * 400]  # one item past the 256-token truncation
    ours = OnnxEncoder(tmp_path / "onnx", threads=2).embed(docs, batch_size=8)
    st = SentenceTransformer(str(resolve(ALIASES["minilm"], tmp_path)), device="cpu")
    ref = st.encode(docs, batch_size=8, convert_to_numpy=True)
    assert np.abs(ours - ref).max() < 1e-5
