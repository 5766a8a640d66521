"""Static QDQ INT8 of a tiny export: QDQ ops, calibration methods, empty or short calibration data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import ExportConfig
from tasks.errors import ConfigError, SourceError
from tasks.export import export_causal_lm
from tasks.quantize import QDQ_FILE, RECORD, StaticInt8Config, quantize_static_int8
from tests.tiny import CORPUS, make_tiny_llm

SMALL = dict(probe_windows=2, probe_len=64, calib_windows=4, calib_len=32)
CALIB = CORPUS * 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("static")
    export_causal_lm(make_tiny_llm(base / "hf", layers=2), base / "onnx", ExportConfig())
    return base / "onnx"


def _activation_scales(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_quantize_static_writes_a_qdq_graph_that_generates_when_calibrated_on_windows(exported, tmp_path):
    from serving.runtime.generator import OnnxCausalLM

    cfg = StaticInt8Config(**SMALL)
    result = quantize_static_int8(cfg, exported, tmp_path / "q", calib_texts=CALIB)

    ops = result["op_counts"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert ops["MatMulInteger"] == 0 and ops["GatherBlockQuantized"] == 1 and result["embeddings_quantized"]
    assert result["quantized_matmuls"] == 15 and result["fp32_matmuls"] == 0  # 7 per layer + the head
    assert result["calib_tokens"] == 4 * 32 and result["probe_tokens"] == 2 * 64
    assert result["size_bytes"] < result["size_bytes_before"]
    assert result["top1_agreement"] >= 0.7
    assert json.loads((tmp_path / "q" / "trimflow_model.json").read_text())["onnx_file"] == QDQ_FILE
    assert StaticInt8Config.model_validate(json.loads((tmp_path / "q" / RECORD).read_text())["config"]) == cfg
    lm = OnnxCausalLM(tmp_path / "q")
    assert 1 <= len(lm.generate_ids([lm.encode("Shares of the company")], 4)[0]) <= 4


def test_quantize_static_narrows_activation_ranges_when_calibration_is_percentile(exported, tmp_path):
    quantize_static_int8(StaticInt8Config(**SMALL, calibrate_method="minmax"), exported, tmp_path / "minmax",
                         calib_texts=CALIB)
    pct_result = quantize_static_int8(StaticInt8Config(**SMALL, calibrate_method="percentile", percentile=99.0,
                                                       quantize_embeddings=False),
                                      exported, tmp_path / "pct", calib_texts=CALIB)

    minmax, pct = _activation_scales(tmp_path / "minmax" / QDQ_FILE), _activation_scales(tmp_path / "pct" / QDQ_FILE)
    assert minmax.keys() == pct.keys() and minmax
    ratios = np.array([pct[k] / minmax[k] for k in minmax])
    assert (ratios <= 1 + 1e-6).all() and (ratios < 0.99).any()
    assert pct_result["op_counts"]["GatherBlockQuantized"] == 0 and not pct_result["embeddings_quantized"]


def test_quantize_static_raises_source_error_before_work_when_calibration_split_is_empty(exported, tmp_path):
    with pytest.raises(SourceError, match="calibration split is empty"):
        quantize_static_int8(StaticInt8Config(**SMALL), exported, tmp_path / "q", calib_texts=[])
    assert not (tmp_path / "q").exists()


def test_quantize_static_raises_config_error_before_work_when_calibration_is_too_short(exported, tmp_path):
    with pytest.raises(ConfigError, match="calib_windows"):
        quantize_static_int8(StaticInt8Config(**SMALL | {"calib_windows": 500}), exported, tmp_path / "q",
                             calib_texts=CORPUS)
    assert not (tmp_path / "q").exists()
