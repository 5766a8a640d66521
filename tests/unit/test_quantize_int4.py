"""Weight-only INT4 of a tiny export: MatMulNBits, a shared block-quantized table, the GGUF grid, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import ExportConfig
from tasks.errors import ConfigError, SourceError
from tasks.export import export_causal_lm
from tasks.quantize import (INT4_FILE, RECORD, Int4Config, block_quantize, dequantize_nbits, quantize_int4,
                            weight_matmuls)
from tests.tiny import CORPUS, make_tiny_llm

PROBE = dict(probe_windows=4, probe_len=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("int4")
    export_causal_lm(make_tiny_llm(base / "hf", layers=2), base / "onnx", ExportConfig())
    return base / "onnx"


def _on_gguf_grid(w, block: int = 32):
    """``w`` [out, in] snapped to GGUF Q4_1: blocks of ``block`` along ``in``, asymmetric scale + min."""
    out, k = w.shape
    b = w.reshape(out, k // block, block)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (hi - lo) / 15
    return (np.round((b - lo) / d) * d + lo).reshape(out, k)


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory):
    """A tiny export whose linear weights are Q4_1-dequantized and whose tied table is Q8_0-dequantized."""
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("gguf")
    hf = make_tiny_llm(base / "hf", layers=2)
    model = AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(torch.from_numpy(_on_gguf_grid(p.numpy())))
        e = model.model.embed_tokens.weight.numpy().reshape(-1, 1, 32)
        d = np.abs(e).max(-1, keepdims=True) / 127
        d[d == 0] = 1  # the padding row is all zeros
        model.model.embed_tokens.weight.copy_(torch.from_numpy((np.round(e / d) * d).reshape(-1, 32)))
    model.save_pretrained(hf)
    export_causal_lm(hf, base / "onnx", ExportConfig())
    return base / "onnx"


def test_quantize_int4_writes_matmulnbits_and_a_shared_table_that_generates_when_embeddings_are_tied(exported,
                                                                                                       tmp_path):
    import onnx

    from serving.runtime.generator import OnnxCausalLM

    cfg = Int4Config(**PROBE)
    result = quantize_int4(cfg, exported, tmp_path / "q", probe_texts=CORPUS)

    weights = len(weight_matmuls(onnx.load(str(exported / "model.onnx"))))
    ops = result["op_counts"]
    assert weights == result["quantized_matmuls"] == 15 and result["fp32_matmuls"] == 0
    # Per layer q/k/v and gate/up share an input: 2 merged groups + o + down, plus the head.
    assert result["fused_groups"] == 4 and ops["Split"] >= 4 and ops["MatMulNBits"] == 2 * 4 + 1
    assert ops["GatherBlockQuantized"] == 1
    assert result["embedding"] == {"bits": 8, "tied": True, "shared": True}
    graph = onnx.load(str(tmp_path / "q" / INT4_FILE)).graph
    table = next(n for n in graph.node if n.op_type == "GatherBlockQuantized").input[0]
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    reshape = next(n for n in graph.node if n.output[0] == head.input[1])
    assert reshape.op_type == "Reshape" and reshape.input[0] == table  # one stored copy of the table
    assert result["size_bytes"] < 0.6 * result["size_bytes_before"]
    assert result["top1_agreement"] >= 0.7 and result["mean_abs_logit_diff"] > 0
    meta = json.loads((tmp_path / "q" / "trimflow_model.json").read_text())
    assert meta["onnx_file"] == INT4_FILE and not (tmp_path / "q" / "model.onnx").exists()
    record = json.loads((tmp_path / "q" / RECORD).read_text())
    assert Int4Config.model_validate(record["config"]) == cfg and record["technique"] == "quantize_int4"
    lm = OnnxCausalLM(tmp_path / "q")
    assert 1 <= len(lm.generate_ids([lm.encode("The city council")], 5)[0]) <= 5


@pytest.mark.parametrize("scheme", ["minmax_float_zp", "minmax_corrected"])
def test_quantize_int4_reproduces_the_gguf_grid_exactly_when_the_scheme_keeps_block_min_max(gguf_export, tmp_path,
                                                                                            scheme):
    exact = quantize_int4(Int4Config(**PROBE, scheme=scheme, accuracy_level=0), gguf_export, tmp_path / "minmax",
                          probe_texts=CORPUS)

    assert exact["weight_error"]["exact_share"] == 1.0 and exact["weight_error"]["rel_rmse"] < 1e-5
    assert exact["max_abs_logit_diff"] < 1e-3 and exact["top1_agreement"] == 1.0
    assert exact["quantized_matmuls"] == 15 and exact["fused_groups"] == 4


def test_quantize_int4_moves_every_block_when_the_zero_point_is_an_integer(gguf_export, tmp_path):
    integer = quantize_int4(Int4Config(**PROBE, scheme="asym", accuracy_level=0), gguf_export, tmp_path / "int",
                            probe_texts=CORPUS)

    # An integer zero point cannot sit on Q4_1's arbitrary block minimum: every block shifts.
    assert integer["weight_error"]["exact_share"] < 0.9 and integer["weight_error"]["rel_rmse"] > 1e-3


@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_block_quantize_matches_onnxruntime_quantizer_when_scheme_is_an_ort_rule(scheme):
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    w[:32, :4] = np.abs(w[:32, :4])  # blocks that never reach zero: the asym rule widens them to include it
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24])],
                          [numpy_helper.from_array(w, "w")])
    q = MatMulNBitsQuantizer(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                             algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=scheme == "sym"))
    q.process()
    model = q.model.model
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    tensors = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    theirs = dequantize_nbits(node, tensors)

    ours = block_quantize(w, 4, 32, scheme)["dequantized"]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)

    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ theirs, rtol=1e-4, atol=1e-4)  # the kernel computes with what we decode


@pytest.mark.parametrize("scheme", ["minmax_corrected", "sym"])
def test_quantize_int4_merges_shared_input_projections_without_changing_logits_when_fusing(exported, tmp_path,
                                                                                          scheme):
    from serving.runtime.generator import OnnxCausalLM

    fused = quantize_int4(Int4Config(**PROBE, scheme=scheme), exported, tmp_path / "f", probe_texts=CORPUS)
    plain = quantize_int4(Int4Config(**PROBE, scheme=scheme, fuse_projections=False), exported, tmp_path / "p",
                          probe_texts=CORPUS)

    assert fused["op_counts"]["MatMulNBits"] < plain["op_counts"]["MatMulNBits"] == 15
    assert plain["fused_groups"] == 0 and fused["weight_error"] == plain["weight_error"]
    ids = np.array([OnnxCausalLM(exported).encode(" ".join(CORPUS))[:48]])
    a, b = OnnxCausalLM(tmp_path / "f").logits(ids), OnnxCausalLM(tmp_path / "p").logits(ids)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_quantize_int4_leaves_the_table_fp32_when_embedding_bits_is_zero(exported, tmp_path):
    result = quantize_int4(Int4Config(**PROBE, embedding_bits=0), exported, tmp_path / "q", probe_texts=CORPUS)

    assert result["op_counts"]["GatherBlockQuantized"] == 0
    assert result["embedding"]["shared"] is False
    assert result["fp32_matmuls"] == 1  # the output projection stays with the table


def test_quantize_int4_pads_the_last_block_when_k_is_not_a_multiple_of_block_size(tmp_path):
    import onnx

    hf = make_tiny_llm(tmp_path / "hf", layers=1, intermediate=72)  # a pruned MLP: K=72 for down_proj
    export_causal_lm(hf, tmp_path / "onnx", ExportConfig())
    results = {s: quantize_int4(Int4Config(**PROBE, scheme=s, accuracy_level=0), tmp_path / "onnx", tmp_path / s,
                                probe_texts=CORPUS) for s in ("minmax_corrected", "asym")}

    for scheme, result in results.items():
        down = next(n for n in onnx.load(str(tmp_path / scheme / INT4_FILE)).graph.node
                    if n.op_type == "MatMulNBits" and "down_proj" in n.name)
        assert {a.name: a.i for a in down.attribute}["K"] == 72
        assert result["fp32_matmuls"] == 0 and result["top1_agreement"] >= 0.9
    assert results["minmax_corrected"]["quantized_matmuls"] == 8
    assert results["minmax_corrected"]["max_abs_logit_diff"] < 0.5


def test_quantize_int4_keeps_table_and_head_fp32_when_hidden_size_is_not_a_multiple_of_block_size(tmp_path):
    hf = make_tiny_llm(tmp_path / "hf", layers=1, hidden=48, heads=4, kv_heads=2)
    export_causal_lm(hf, tmp_path / "onnx", ExportConfig())

    result = quantize_int4(Int4Config(**PROBE), tmp_path / "onnx", tmp_path / "q", probe_texts=CORPUS)

    assert result["embedding"]["bits"] == 0 and "not a multiple of block_size 32" in result["embedding"]["kept_fp32"]
    assert result["op_counts"]["GatherBlockQuantized"] == 0 and result["fp32_matmuls"] == 1
    assert result["quantized_matmuls"] == 7


def test_int4_config_rejects_block_size_when_not_a_power_of_two():
    from tasks.recipe import Recipe

    recipe = Recipe(name="bad", steps=[{"technique": "quantize_int4", "block_size": 48}])
    with pytest.raises(ConfigError, match=r"steps\[\d\]\.block_size"):
        recipe.plan()


def test_quantize_int4_raises_source_error_when_folder_is_not_an_export(tmp_path):
    with pytest.raises(SourceError, match="trimflow_model.json"):
        quantize_int4(Int4Config(), tmp_path, tmp_path / "out")
