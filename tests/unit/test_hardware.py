"""Memory bandwidth and bytes per decode token: the inputs of the bandwidth bound the bench reports."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import ExportConfig
from tasks.errors import ConfigError, SourceError
from tasks.export import export_causal_lm
from tasks.hardware import decode_bound, measure_memory_bandwidth, weight_bytes_per_token
from tests.tiny import CORPUS, make_tiny_llm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("hw")
    export_causal_lm(make_tiny_llm(base / "hf", layers=2), base / "onnx", ExportConfig())
    return base / "onnx"


def test_measure_memory_bandwidth_reports_the_best_of_its_passes_when_run_small():
    bw = measure_memory_bandwidth(size_mb=16, repeats=3, threads=2)

    assert len(bw["read_samples_gb_s"]) == 3
    assert bw["read_gb_s"] == max(bw["read_samples_gb_s"]) > 0
    assert bw["copy_gb_s"] > 0 and bw["threads"] == 2 and bw["size_mb"] == 16


@pytest.mark.parametrize("field", ["size_mb", "repeats", "threads"])
def test_measure_memory_bandwidth_raises_config_error_when_an_argument_is_below_one(field):
    with pytest.raises(ConfigError, match=field):
        measure_memory_bandwidth(**{field: 0})


def test_weight_bytes_per_token_counts_one_row_of_the_token_table_when_only_a_gather_reads_it(exported):
    import onnx
    from onnx import numpy_helper

    got = weight_bytes_per_token(exported)

    model = onnx.load(str(exported / "model.onnx"))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    table = next(n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    stored = sum(a.nbytes for a in arrays.values())
    assert got["initializer_bytes"] == stored
    assert got["row_tables"] == {table: arrays[table].nbytes}
    assert got["bytes"] == stored - arrays[table].nbytes + arrays[table][0].nbytes
    assert got["kv_bytes_per_position"] == 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 kv heads, head_dim 8, fp32


def test_weight_bytes_per_token_counts_a_shared_int4_table_in_full_when_the_head_reads_it(exported, tmp_path):
    from tasks.quantize import Int4Config, quantize_int4

    quantize_int4(Int4Config(probe_windows=2, probe_len=32), exported, tmp_path / "q", probe_texts=CORPUS)

    fp32, int4 = weight_bytes_per_token(exported), weight_bytes_per_token(tmp_path / "q")
    assert int4["row_tables"] == {}  # the output projection reads the whole table every token
    assert int4["bytes"] == int4["initializer_bytes"] < fp32["bytes"]
    assert int4["by_op"]["MatMulNBits"] > 0


def test_decode_bound_divides_bandwidth_by_bytes_when_both_are_positive():
    assert decode_bound(500e6, 10.0) == pytest.approx(20.0)
    with pytest.raises(ConfigError):
        decode_bound(0, 10.0)


def test_weight_bytes_per_token_raises_source_error_when_there_is_no_onnx_file(tmp_path):
    with pytest.raises(SourceError, match="no ONNX file"):
        weight_bytes_per_token(tmp_path)


def test_weight_bytes_per_token_counts_half_a_byte_per_element_when_a_tensor_is_int4(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    packed = helper.make_tensor("w4", TensorProto.UINT4, [64, 8], np.zeros(64 * 8, np.uint8).tolist())
    g = helper.make_graph([helper.make_node("Identity", ["w4"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.UINT4, [64, 8])], [packed])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "m.onnx"))

    assert weight_bytes_per_token(tmp_path / "m.onnx")["bytes"] == 64 * 8 // 2
