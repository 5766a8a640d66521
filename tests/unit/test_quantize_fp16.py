"""FP16 conversion of a tiny export: fp16 KV cache recorded in the metadata, the generator still drives it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import ExportConfig
from tasks.errors import SourceError
from tasks.export import export_causal_lm
from tasks.quantize import FP16_FILE, RECORD, Fp16Config, convert_fp16
from tests.tiny import CORPUS, make_tiny_llm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("fp16")
    export_causal_lm(make_tiny_llm(base / "hf", layers=2), base / "onnx", ExportConfig())
    return base / "onnx"


def _io_types(path):
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}


def test_convert_fp16_makes_the_kv_cache_fp16_and_keeps_logits_fp32_when_defaults(exported, tmp_path):
    from onnx import TensorProto

    from serving.runtime.generator import OnnxCausalLM

    cfg = Fp16Config()
    result = convert_fp16(cfg, exported, tmp_path / "h", probe_texts=CORPUS)

    types = _io_types(tmp_path / "h" / FP16_FILE)
    kv = {t for name, t in types.items() if name.startswith(("past_key_values.", "present."))}
    assert kv == {TensorProto.FLOAT16} and types["logits"] == TensorProto.FLOAT
    meta = json.loads((tmp_path / "h" / "trimflow_model.json").read_text())
    assert meta["past_dtype"] == "float16" and meta["onnx_file"] == FP16_FILE
    assert result["past_dtype"] == "float16" and result["logits_dtype"] == "float32"
    assert result["cpu_runnable"] and result["validation"] == "cpu-run"
    assert result["top1_agreement"] >= 0.9 and result["size_bytes"] < result["size_bytes_before"]
    assert Fp16Config.model_validate(json.loads((tmp_path / "h" / RECORD).read_text())["config"]) == cfg

    lm = OnnxCausalLM(tmp_path / "h")
    assert lm.empty_past(1)[0].dtype == np.float16
    assert 1 <= len(lm.generate_ids([lm.encode("The president said")], 4)[0]) <= 4


def test_convert_fp16_returns_fp16_logits_the_generator_still_reads_when_not_kept_fp32(exported, tmp_path):
    from onnx import TensorProto

    from serving.runtime.generator import OnnxCausalLM

    result = convert_fp16(Fp16Config(keep_logits_fp32=False), exported, tmp_path / "h", probe_texts=CORPUS)

    assert _io_types(tmp_path / "h" / FP16_FILE)["logits"] == TensorProto.FLOAT16
    assert result["logits_dtype"] == "float16" and result["top1_agreement"] >= 0.9
    lm = OnnxCausalLM(tmp_path / "h")
    assert len(lm.generate_text(["Heavy rain caused"], max_new_tokens=3, temperature=0.8, seed=0)) == 1


def test_convert_fp16_raises_source_error_when_folder_is_not_an_export(tmp_path):
    with pytest.raises(SourceError, match="trimflow_model.json"):
        convert_fp16(Fp16Config(), tmp_path, tmp_path / "out")
