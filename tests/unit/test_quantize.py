"""Dynamic INT8 quantization of a tiny export: integer ops, smaller file, outlier handling, loud failure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import ExportConfig, QuantizeConfig
from tasks.errors import ExportMismatch, SourceError
from tasks.export import export_causal_lm
from tasks.quantize import INT8_FILE, quantize_dynamic_int8
from tests.tiny import CORPUS, make_tiny_llm

PROBE = dict(probe_windows=4, probe_len=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("quant")
    export_causal_lm(make_tiny_llm(base / "hf", layers=2), base / "onnx", ExportConfig())
    return base / "onnx"


def _outlier_export(base, logit_scale: float = 1.0):
    """A tiny export whose first MLP has one neuron that fires ~400× above the rest, on EOS only.

    This is the "massive activation" of real LLM MLPs (SmolLM2 layers 11 and 28): a per-tensor
    activation scale sized for it rounds every other token's values in that MatMul to zero.
    ``logit_scale`` sharpens the output distribution (the final norm's weight), so that flipped
    argmaxes show in perplexity too: a random tiny model is otherwise near-uniform (default 1).
    """
    import torch
    from transformers import AutoModelForCausalLM

    hf = make_tiny_llm(base / "hf", layers=2)
    model = AutoModelForCausalLM.from_pretrained(hf)
    eos = model.config.eos_token_id
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        direction = torch.zeros(emb.shape[1])
        direction[0] = 1.0
        emb[:, 0] = 0.0  # no other token points along the trigger direction
        emb[eos] = direction * emb.norm(dim=1).mean()
        mlp = model.model.layers[0].mlp
        mlp.down_proj.weight *= 30  # make the MLP matter to the logits
        mlp.gate_proj.weight[5] = 10 * direction
        mlp.up_proj.weight[5] = 10 * direction
        mlp.down_proj.weight[:, 5] = 0.02 / 100
        model.model.norm.weight *= logit_scale
    model.save_pretrained(hf)
    export_causal_lm(hf, base / "onnx", ExportConfig())
    return base / "onnx"


def test_quantize_writes_a_smaller_graph_with_integer_ops_that_generates(exported, tmp_path):
    from serving.runtime.generator import OnnxCausalLM

    out = tmp_path / "int8"
    result = quantize_dynamic_int8(QuantizeConfig(**PROBE), exported, out, probe_texts=CORPUS)

    ops = result["op_counts"]
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    assert result["quantized_matmuls"] == ops["MatMulInteger"]
    assert result["embeddings_quantized"] and ops["DequantizeLinear"] >= 1
    assert result["size_bytes"] < result["size_bytes_before"]
    assert result["size_bytes"] == (out / INT8_FILE).stat().st_size
    assert 0.8 <= result["top1_agreement"] <= 1.0 and result["mean_abs_logit_diff"] > 0
    assert result["probe_tokens"] == 4 * 64
    meta = json.loads((out / "trimflow_model.json").read_text())
    assert meta["onnx_file"] == INT8_FILE
    assert not (out / "model.onnx").exists()
    lm = OnnxCausalLM(out)
    assert len(lm.generate_ids([lm.encode("The city council")], 5)[0]) <= 5


def test_quantize_keeps_outlier_matmuls_fp32_and_fails_loudly_without_that(tmp_path):
    onnx_dir = _outlier_export(tmp_path)

    kept = quantize_dynamic_int8(QuantizeConfig(**PROBE, min_top1_agreement=0.95), onnx_dir, tmp_path / "kept",
                                 probe_texts=CORPUS)
    assert list(kept["outlier_nodes"]) == ["/m/model/layers.0/mlp/down_proj/MatMul"]
    assert kept["fp32_matmuls"] == 1

    with pytest.raises(ExportMismatch, match=r"on only \d+\.\d% of next-token argmaxes"):
        quantize_dynamic_int8(QuantizeConfig(**PROBE, min_top1_agreement=0.95, max_activation_outlier=0), onnx_dir,
                              tmp_path / "all", probe_texts=CORPUS)


def test_quantize_raises_source_error_when_folder_is_not_an_export(tmp_path):
    with pytest.raises(SourceError, match="trimflow_model.json"):
        quantize_dynamic_int8(QuantizeConfig(), tmp_path, tmp_path / "out")


def test_quantize_without_embeddings_leaves_the_gather_fp32(exported, tmp_path):
    result = quantize_dynamic_int8(QuantizeConfig(**PROBE, quantize_embeddings=False), exported, tmp_path / "o",
                                   probe_texts=CORPUS)
    assert result["op_counts"]["DequantizeLinear"] == 0 and not result["embeddings_quantized"]
    assert np.isfinite(result["mean_abs_logit_diff"])


def test_sweep_dynamic_int8_returns_one_measured_row_per_combination_and_marks_the_pick(exported, tmp_path):
    from tasks.quantize import pick_dynamic_int8, sweep_dynamic_int8

    grid = {"weight_type": ("qint8", "quint8"), "per_channel": (True,), "reduce_range": (True, False)}
    rows = sweep_dynamic_int8(exported, tmp_path, CORPUS, base=QuantizeConfig(**PROBE), grid=grid, speed_tokens=4)

    assert [(r["weight_type"], r["reduce_range"]) for r in rows] == [("qint8", True), ("qint8", False),
                                                                     ("quint8", True), ("quint8", False)]
    assert all(r["decode_tokens_per_s"] > 0 and 0 <= r["top1_agreement"] <= 1 for r in rows)
    assert sum(r["best"] for r in rows) == 1
    assert next(r for r in rows if r["best"]) is pick_dynamic_int8(rows, 0.7)


def test_pick_dynamic_int8_prefers_lower_perplexity_then_speed_when_rows_pass_agreement():
    from tasks.quantize import pick_dynamic_int8

    rows = [{"top1_agreement": 0.2, "probe_ppl_increase": 0.0, "decode_tokens_per_s": 99},  # fails agreement
            {"top1_agreement": 0.8, "probe_ppl_increase": 0.10, "decode_tokens_per_s": 50},
            {"top1_agreement": 0.8, "probe_ppl_increase": 0.095, "decode_tokens_per_s": 40},
            {"top1_agreement": 0.8, "probe_ppl_increase": 0.20, "decode_tokens_per_s": 90}]

    assert pick_dynamic_int8(rows, 0.7) is rows[1]  # within 1% of the best perplexity, and faster


def test_quantize_techniques_are_registered_for_onnx_in_the_quantize_stage():
    from tasks.recipe import Recipe, registry

    reg = registry()
    for name in ("quantize_dynamic_int8", "quantize_static_int8", "quantize_int4", "convert_fp16"):
        assert reg[name].stage == "quantize" and reg[name].consumes == reg[name].produces == "onnx"
    plan = Recipe(name="q", steps=[{"technique": "quantize_int4", "max_ppl_increase": 0.05}]).plan()
    assert [t.name for _, t, _ in plan] == ["export_onnx", "quantize_int4"]
    assert plan[1][2].max_ppl_increase == 0.05


def test_quantize_writes_its_config_beside_the_artifact_when_it_succeeds(exported, tmp_path):
    from tasks.quantize import RECORD, DynamicInt8Config

    cfg = DynamicInt8Config(**PROBE)
    result = quantize_dynamic_int8(cfg, exported, tmp_path / "o", probe_texts=CORPUS)

    record = json.loads((tmp_path / "o" / RECORD).read_text())
    assert DynamicInt8Config.model_validate(record["config"]) == cfg
    assert record["result"]["top1_agreement"] == result["top1_agreement"]
