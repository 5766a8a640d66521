"""Per-layer sensitivity: the mixed graph matches the real ones, and the pass keeps what it says it keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.errors import ExportMismatch
from tasks.quantize import (INT4_FILE, INT8_FILE, RECORD, DynamicInt8Config, Int4Config, _Hybrid,
                            quantize_dynamic_int8, quantize_int4, token_windows)
from tests.tiny import CORPUS
from tests.unit.test_quantize import _outlier_export

PROBE = dict(probe_windows=4, probe_len=64)
OUTLIER_NODE = "/m/model/layers.0/mlp/down_proj/MatMul"


@pytest.fixture(scope="module")
def outlier_export(tmp_path_factory):
    return _outlier_export(tmp_path_factory.mktemp("sens"), logit_scale=10.0)


def _graph_ops(path):
    import onnx

    return {n.name: n.op_type for n in onnx.load(str(path)).graph.node}


def test_hybrid_reproduces_the_fp32_and_the_quantized_graph_when_mask_is_all_off_or_all_on(outlier_export, tmp_path):
    from serving.runtime.generator import OnnxCausalLM

    cfg = DynamicInt8Config(**PROBE, max_activation_outlier=0, min_top1_agreement=0, quantize_embeddings=False)
    result = quantize_dynamic_int8(cfg, outlier_export, tmp_path / "q", probe_texts=CORPUS)
    ref, quant = OnnxCausalLM(outlier_export), OnnxCausalLM(tmp_path / "q")
    names = [n for n, op in _graph_ops(outlier_export / "model.onnx").items() if n.endswith("proj/MatMul")]
    names.append("/m/lm_head/MatMul")
    assert result["quantized_matmuls"] == len(names)
    hybrid = _Hybrid(outlier_export / "model.onnx", tmp_path / "q" / INT8_FILE, names, threads=1)
    rows = token_windows(ref, CORPUS, 1, 32)

    def logprobs(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    off = hybrid.logprobs(rows, np.zeros(len(names), bool), ref.empty_past(1))[0]
    on = hybrid.logprobs(rows, np.ones(len(names), bool), ref.empty_past(1))[0]
    np.testing.assert_allclose(off, logprobs(ref.logits(rows)[0]), atol=1e-4)
    np.testing.assert_allclose(on, logprobs(quant.logits(rows)[0]), atol=1e-3)
    assert np.abs(on - off).max() > 1e-2  # the mask really switches paths


def test_sensitivity_keeps_the_outlier_matmul_fp32_when_quantizing_it_breaks_the_target(outlier_export, tmp_path):
    cfg = DynamicInt8Config(**PROBE, max_activation_outlier=0, max_ppl_increase=0.02, sensitivity_windows=2)
    result = quantize_dynamic_int8(cfg, outlier_export, tmp_path / "q", probe_texts=CORPUS)

    sens = result["sensitivity"]
    assert sens["ranking_top"][0]["group"] == OUTLIER_NODE
    assert sens["ppl_increase_all_quantized"] > 0.02  # the pass had something to do
    assert OUTLIER_NODE in sens["keep_fp32"] and sens["target_met"]
    assert sens["measured_ppl_increase"] <= 0.02 and result["probe_ppl_increase"] <= 0.02
    assert "rank 1 of" in sens["kept_groups"][0]["why"]
    ops = _graph_ops(tmp_path / "q" / INT8_FILE)
    kept = [n for n in sens["keep_fp32"]]
    assert all(ops.get(n) == "MatMul" for n in kept)  # the graph keeps exactly those in fp32
    assert result["fp32_matmuls"] == len(kept)
    record = json.loads((tmp_path / "q" / RECORD).read_text())
    assert record["result"]["sensitivity"]["keep_fp32"] == kept


def test_sensitivity_keeps_whole_layers_when_granularity_is_layer(outlier_export, tmp_path):
    cfg = Int4Config(**PROBE, max_ppl_increase=1e-4, sensitivity_granularity="layer", min_top1_agreement=0,
                     embedding_bits=0)
    result = quantize_int4(cfg, outlier_export, tmp_path / "q", probe_texts=CORPUS)

    sens = result["sensitivity"]
    groups = {r["group"] for r in sens["ranking_top"]}
    assert {"layer 0", "layer 1"} <= groups
    layer_nodes = [n for n in sens["keep_fp32"] if "layers." in n]
    for g in sens["kept_groups"]:
        if g["group"].startswith("layer "):
            i = g["group"].split()[1]
            assert sum(f"layers.{i}/" in n for n in layer_nodes) == 7  # q, k, v, o, gate, up, down
    ops = _graph_ops(tmp_path / "q" / INT4_FILE)
    assert all(ops.get(n) == "MatMul" for n in sens["keep_fp32"])


def test_sensitivity_fails_loudly_when_the_target_cannot_be_met(outlier_export, tmp_path, monkeypatch):
    import tasks.quantize as q

    real = q.compare_logits

    def pessimistic(ref, cand, windows):  # a real graph that never meets the target
        out = real(ref, cand, windows)
        return out | {"probe_ppl_cand": out["probe_ppl_ref"] * 2}

    monkeypatch.setattr(q, "compare_logits", pessimistic)
    with pytest.raises(ExportMismatch, match="max_ppl_increase"):
        quantize_dynamic_int8(DynamicInt8Config(**PROBE, max_activation_outlier=0, max_ppl_increase=0.02,
                                                min_top1_agreement=0), outlier_export, tmp_path / "q",
                              probe_texts=CORPUS)
