"""Encoder ONNX export: the serving contract, parity with PyTorch, clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.encoder_common import ENCODER_META, INPUT_NAMES, OUTPUT_NAME
from tasks.encoder_export import RESULT_FILE, EncoderExportConfig, check_encoder_parity, export_encoder
from tasks.encoder_runtime import OnnxEncoder, load_encoder
from tasks.errors import ExportMismatch, UnsupportedModelError
from tests.tiny import CORPUS, make_tiny_encoder, make_tiny_llm

TEXTS = [CORPUS[0], "Rain.", CORPUS[1] + " " + CORPUS[2], CORPUS[3][:30]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "bert")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    result = export_encoder(tiny, out, EncoderExportConfig())
    return out, result


def _reference(hf_dir, texts):
    """Sentence-transformers' rule computed independently: HF BertModel (default attention), masked mean, L2."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModel.from_pretrained(hf_dir).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1)
    return (pooled / pooled.norm(dim=-1, keepdim=True)).numpy()


def test_export_encoder_matches_pytorch_when_batch_is_padded(tiny, exported):
    out, result = exported
    got = OnnxEncoder(out, threads=1).embed(TEXTS)
    ref = _reference(tiny, TEXTS)
    assert got.shape == ref.shape == (len(TEXTS), 32)
    assert np.abs(got - ref).max() < 1e-4
    assert result["parity"]["padded_batch_max_abs_diff"] <= result["parity"]["atol"]


def test_export_encoder_item_embedding_is_independent_of_batch_padding_when_batched(exported):
    enc = OnnxEncoder(exported[0], threads=1)
    batched = enc.embed(TEXTS, batch_size=len(TEXTS))
    alone = np.concatenate([enc.embed([t]) for t in TEXTS])
    assert np.abs(batched - alone).max() < 1e-5


def test_export_encoder_output_is_l2_normalized_when_items_differ_in_length(exported):
    emb = OnnxEncoder(exported[0], threads=1).embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_export_encoder_graph_has_contract_inputs_and_dynamic_axes_when_exported(exported):
    import onnx

    out, result = exported
    graph = onnx.load(str(out / result["onnx_file"])).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert sorted(inputs) == sorted(INPUT_NAMES)
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param for d in t.shape.dim)  # [batch, seq] both symbolic
    (output,) = graph.output
    assert output.name == OUTPUT_NAME
    dims = output.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 32


def test_export_encoder_writes_metadata_tokenizer_and_config_when_exported(tiny, exported):
    out, _ = exported
    meta = json.loads((out / ENCODER_META).read_text())
    assert meta["format"] == "trimflow-encoder/1"
    assert meta["inputs"] == list(INPUT_NAMES) and meta["output"] == OUTPUT_NAME
    assert meta["embedding_dim"] == 32 and meta["num_layers"] == 4
    assert meta["pooling"] == "mean" and meta["normalized"] is True
    saved = json.loads((out / RESULT_FILE).read_text())
    assert EncoderExportConfig.model_validate(saved["config"]) == EncoderExportConfig()
    # The tokenizer beside the graph pads to the batch's longest item, not to a fixed length.
    enc = load_encoder(out)
    ids = enc.tokenizer.encode_batch(["rain", CORPUS[0]])
    assert len(ids[0].ids) == len(ids[1].ids) < 64


def test_export_encoder_truncates_at_max_seq_length_when_configured(tiny, tmp_path):
    export_encoder(tiny, tmp_path / "o", EncoderExportConfig(max_seq_length=12))
    enc = OnnxEncoder(tmp_path / "o")
    assert enc.meta["max_seq_length"] == 12
    assert len(enc.tokenizer.encode(" ".join(CORPUS)).ids) == 12


def test_check_encoder_parity_raises_export_mismatch_when_weights_differ(tiny, exported, tmp_path):
    from tasks.encoder_common import load_bert, pooled_encoder

    other = make_tiny_encoder(tmp_path / "other", seed=1)
    with pytest.raises(ExportMismatch, match="differs from PyTorch"):
        check_encoder_parity(pooled_encoder(load_bert(other)), exported[0], atol=1e-4)


def test_export_encoder_raises_unsupported_model_error_when_model_is_a_causal_lm(tmp_path):
    llm = make_tiny_llm(tmp_path / "llm")
    with pytest.raises(UnsupportedModelError, match="model_type 'llama'"):
        export_encoder(llm, tmp_path / "out", EncoderExportConfig())
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_export_encoder_raises_unsupported_model_error_when_pooling_is_not_mean(tiny, tmp_path):
    import shutil

    folder = tmp_path / "cls"
    shutil.copytree(tiny, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                  "pooling_mode_mean_tokens": False}))
    with pytest.raises(UnsupportedModelError, match="mean pooling"):
        export_encoder(folder, tmp_path / "out", EncoderExportConfig())


def test_recipe_plan_appends_export_encoder_onnx_when_encoder_recipe_ends_in_pytorch():
    from tasks.recipe import Recipe

    plan = Recipe(name="e", kind="encoder", steps=()).plan()
    assert [t.name for _, t, _ in plan] == ["export_encoder_onnx"]
