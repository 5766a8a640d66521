"""Encoder INT8: quantized ops present, smaller file, loud fidelity check, clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.encoder_common import ENCODER_META
from tasks.encoder_export import EncoderExportConfig, export_encoder
from tasks.encoder_quantize import RESULT_FILE, EncoderQuantizeConfig, op_counts, quantize_encoder
from tasks.encoder_runtime import OnnxEncoder
from tasks.errors import ConfigError, ExportMismatch, SourceError
from tasks.technique import StepContext
from tests.tiny import CORPUS, make_tiny_encoder

PROBES = CORPUS * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "bert")


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_encoder(tiny, out, EncoderExportConfig())
    return out


def test_quantize_encoder_replaces_weight_matmuls_and_embeddings_when_dynamic(fp32, tmp_path):
    r = quantize_encoder(EncoderQuantizeConfig(), fp32, tmp_path / "q", PROBES)
    before = op_counts(fp32 / "model.onnx")
    assert r["op_counts"]["MatMulInteger"] > 0 and r["op_counts"]["DynamicQuantizeLinear"] > 0
    # Every MatMul with a weight became MatMulInteger; only activation x activation MatMuls (attention) stay.
    assert r["op_counts"]["MatMul"] + r["op_counts"]["MatMulInteger"] == before["MatMul"]
    assert r["op_counts"]["DequantizeLinear"] >= 1  # int8 embedding tables
    assert r["size_bytes"] < r["size_bytes_before"] and r["size_ratio"] < 1
    assert r["mean_cosine"] >= 0.97 and r["probe_source"] == "caller"


def test_quantize_encoder_output_follows_the_contract_when_loaded(fp32, tmp_path):
    quantize_encoder(EncoderQuantizeConfig(), fp32, tmp_path / "q", PROBES)
    meta = json.loads((tmp_path / "q" / ENCODER_META).read_text())
    assert meta["onnx_file"] == "model.int8.onnx" and meta["format"] == "trimflow-encoder/1"
    assert meta["quantization"]["per_channel"] is True
    emb = OnnxEncoder(tmp_path / "q").embed(CORPUS)
    ref = OnnxEncoder(fp32).embed(CORPUS)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (emb * ref).sum(1).min() > 0.95
    saved = json.loads((tmp_path / "q" / RESULT_FILE).read_text())
    assert EncoderQuantizeConfig.model_validate(saved["config"]) == EncoderQuantizeConfig()


def test_quantize_encoder_keeps_fp32_embedding_tables_when_embeddings_are_excluded(fp32, tmp_path):
    r = quantize_encoder(EncoderQuantizeConfig(quantize_embeddings=False), fp32, tmp_path / "q", PROBES)
    assert r["op_counts"]["DequantizeLinear"] == 0
    assert r["op_counts"]["Gather"] == op_counts(fp32 / "model.onnx")["Gather"]


def test_quantize_encoder_inserts_qdq_nodes_when_static(fp32, tmp_path):
    r = quantize_encoder(EncoderQuantizeConfig(static=True, calib_items=8), fp32, tmp_path / "q", PROBES)
    assert r["static"] and r["op_counts"]["QuantizeLinear"] > 0 and r["op_counts"]["DequantizeLinear"] > 0
    assert r["mean_cosine"] >= 0.97


def test_quantize_encoder_raises_export_mismatch_when_fidelity_is_below_threshold(fp32, tmp_path):
    with pytest.raises(ExportMismatch, match="mean cosine"):
        quantize_encoder(EncoderQuantizeConfig(min_mean_cosine=1.0), fp32, tmp_path / "q", PROBES)


def test_quantize_encoder_raises_config_error_when_calibration_set_is_empty(fp32, tmp_path):
    with pytest.raises(ConfigError, match="calibration set is empty"):
        quantize_encoder(EncoderQuantizeConfig(), fp32, tmp_path / "q", ["", "  "])
    assert not (tmp_path / "q").exists()


def test_encoder_quantize_technique_raises_config_error_when_calib_split_is_empty(fp32, tiny, tmp_path):
    from tasks.encoder_quantize import TECHNIQUES

    ctx = StepContext(kind="encoder", teacher_dir=tiny, texts=lambda split: [], resume_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="calibration set is empty"):
        TECHNIQUES[0].run(EncoderQuantizeConfig(), fp32, tmp_path / "q", ctx)


def test_quantize_encoder_raises_source_error_when_input_is_not_an_encoder_export(tiny, tmp_path):
    with pytest.raises(SourceError, match="not a trimflow encoder export"):
        quantize_encoder(EncoderQuantizeConfig(), tiny, tmp_path / "q", PROBES)
