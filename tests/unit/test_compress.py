"""Low-rank factorization and k-means weight sharing on the tiny random Llama: structure, numbers, reload, export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.compress import (LowRankConfig, WeightSharingConfig, _modules, _pack, choose_ranks, kmeans_1d, lowrank,
                            weight_sharing)
from tasks.config import ExportConfig
from tasks.errors import ConfigError, SourceError
from tasks.modelio import PATCHES_FILE, count_parameters, load_causal_lm
from tests.tiny import CORPUS, make_tiny_llm

# Small, fast, and no timing: tests must not depend on this machine's speed.
FAST = dict(eval_windows=1, eval_len=32, latency_tokens=2, calib_tokens=64, rank_multiple=1, min_layer_speedup=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("compress") / "tiny", layers=2)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()


IDS = [5, 17, 42, 99, 7, 3, 120, 64, 8]


def test_lowrank_factorized_layers_reload_and_export_with_matching_logits_when_saved(tiny, tmp_path):
    import onnx

    from serving.runtime.generator import OnnxCausalLM
    from tasks.export import export_causal_lm

    out = tmp_path / "lr"
    result = lowrank(LowRankConfig(energy=0.6, **FAST), tiny, out, CORPUS * 4, CORPUS * 4)

    patches = json.loads((out / PATCHES_FILE).read_text())["patches"]
    assert result["factorized"] == len(patches) > 0
    assert result["params_after"] < result["params_before"]
    assert result["size_bytes_after"] < result["size_bytes_before"]
    model = load_causal_lm(out)
    for p in patches:
        mod = model.get_submodule(p["module"])
        assert type(mod).__name__ == "LowRankLinear" and mod.down.weight.shape[0] == p["rank"]
        assert p["rank"] * (mod.in_features + mod.out_features) < mod.in_features * mod.out_features
    info = export_causal_lm(out, tmp_path / "onnx", ExportConfig(atol=1e-4))  # raises ExportMismatch beyond atol
    assert max(info["parity"]["prefill_max_abs_diff"], info["parity"]["decode_max_abs_diff"]) < 1e-4
    ort_logits = OnnxCausalLM(tmp_path / "onnx").logits(np.array([IDS]))[0]
    np.testing.assert_allclose(ort_logits, _logits(model, IDS), atol=1e-4)
    ranks = {tuple(i.dims) for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    first = model.get_submodule(patches[0]["module"])
    assert (first.in_features, patches[0]["rank"]) in ranks  # the rank-r factor is a real initializer


@pytest.mark.parametrize("activation_aware", [True, False])
def test_lowrank_reproduces_the_model_when_weights_are_already_low_rank(tmp_path, activation_aware):
    import torch

    from tasks.modelio import save_causal_lm

    src = make_tiny_llm(tmp_path / "src", layers=1, hidden=32, intermediate=64)
    model = load_causal_lm(src)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(model.model.layers[0].mlp, name)
            out_f, in_f = lin.weight.shape
            lin.weight.copy_(torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g) * 0.1)
    save_causal_lm(model, tmp_path / "rank3", [], source_dir=src)
    cfg = LowRankConfig(energy=0.999999, targets=("gate_proj", "up_proj", "down_proj"),
                        activation_aware=activation_aware, **FAST)
    result = lowrank(cfg, tmp_path / "rank3", tmp_path / "out", CORPUS * 4, CORPUS * 4)

    assert result["factorized"] == 3 and {r["rank"] for r in result["layers"]} == {3}
    np.testing.assert_allclose(_logits(load_causal_lm(tmp_path / "out"), IDS), _logits(model, IDS), atol=1e-4)


def test_lowrank_keeps_layers_dense_when_factorized_is_not_faster(tiny, tmp_path, monkeypatch):
    import tasks.compress as compress

    calls = []

    def slower(self, in_f, out_f, rank, tokens):
        calls.append((in_f, out_f, rank, tokens))
        return 1.0, 2.0  # dense 1 ms, factorized 2 ms

    monkeypatch.setattr(compress.LatencyBench, "compare", slower)
    cfg = LowRankConfig(energy=0.6, **(FAST | {"min_layer_speedup": 1.05}))
    result = lowrank(cfg, tiny, tmp_path / "out", CORPUS * 4, CORPUS * 4)

    assert calls and {c[3] for c in calls} == {1, cfg.prefill_tokens}  # decode and prefill shapes measured
    assert result["factorized"] == 0 and result["rejected_slower"] == result["candidates"] > 0
    assert not result["pays"] and "not" in result["verdict"]
    assert not (tmp_path / "out" / PATCHES_FILE).exists()  # nothing patched: a plain HF folder


def test_lowrank_keeps_layers_dense_when_rank_would_not_shrink_them(tiny, tmp_path):
    result = lowrank(LowRankConfig(energy=1.0, **FAST), tiny, tmp_path / "out", CORPUS * 4, None)

    assert result["factorized"] == 0 and result["candidates"] == 0
    assert {r["why"] for r in result["rejected"]} == {"not smaller"}


def test_latency_bench_times_dense_and_factorized_layers_when_compared():
    from tasks.compress import LatencyBench

    bench = LatencyBench(threads=1, repeats=2, cache_bytes=1 << 16)
    for tokens in (1, 4):
        dense, fact = bench.compare(32, 48, 8, tokens)
        assert dense > 0 and fact > 0
    assert set(bench._dense) == {(32, 48, 1), (32, 48, 4)}  # the dense graph of a shape is built once


def test_choose_ranks_keeps_the_energy_asked_for_when_rule_is_energy():
    import torch

    spectra = {"a": torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)}  # energies 16, 4, 1, 1 of 22
    shapes = {"a": (4, 4)}
    assert choose_ranks(spectra, shapes, LowRankConfig(energy=0.7)) == {"a": 1}
    assert choose_ranks(spectra, shapes, LowRankConfig(energy=0.9)) == {"a": 2}
    assert choose_ranks(spectra, shapes, LowRankConfig(energy=1.0)) == {"a": 4}


def test_choose_ranks_spends_the_budget_where_energy_per_parameter_is_highest_when_rule_is_budget():
    import torch

    # "steep" holds almost all its energy in one direction, "flat" spreads it evenly.
    spectra = {"steep": torch.tensor([10.0, 0.1, 0.1, 0.1], dtype=torch.float64),
               "flat": torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)}
    shapes = {"steep": (4, 4), "flat": (4, 4)}  # 8 parameters per rank, 32 in all
    ranks = choose_ranks(spectra, shapes, LowRankConfig(rank_rule="budget", param_ratio=0.5))
    assert sum(r * 8 for r in ranks.values()) <= 16
    assert ranks == {"steep": 1, "flat": 1}


@pytest.mark.parametrize("ratio, pays", [(None, True), (1.1, True), (3.0, False)])
def test_quality_note_says_it_does_not_pay_when_perplexity_rises_beyond_the_limit(ratio, pays):
    from tasks.compress import _quality_note

    ok, note = _quality_note({"perplexity_ratio": ratio}, LowRankConfig(max_ppl_ratio=1.25))
    assert ok is pays and ("does not pay" in note) is (not pays)


def test_lowrank_config_rejects_unknown_projection_when_validated():
    with pytest.raises(ValueError, match="unknown or no projections"):
        LowRankConfig(targets=("qkv_proj",))


def test_lowrank_raises_config_error_when_activation_aware_without_calibration_text(tiny, tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        lowrank(LowRankConfig(**FAST), tiny, tmp_path / "out", [], None)
    assert not (tmp_path / "out").exists()


def test_weight_sharing_stores_codebooks_and_the_tied_head_once_when_saved(tiny, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "ws"
    result = weight_sharing(WeightSharingConfig(clusters=16, eval_windows=1, eval_len=32, latency_tokens=2),
                            tiny, out, CORPUS * 4)

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: str(f.get_tensor(k).dtype) for k in keys}
    assert "model.embed_tokens.indices" in keys and not any(k.startswith("lm_head") for k in keys)
    assert not any(k.endswith(("proj.weight", "embed_tokens.weight")) for k in keys)  # no dense copy left
    assert {dtypes[k] for k in keys if k.endswith(".indices")} == {"torch.uint8"}
    assert result["index_bits"] == 4 and result["clustered"] == 2 * 7 + 1 and result["lm_head_tied"]
    assert result["size_ratio"] < 0.3 and result["pays"]
    model = load_causal_lm(out)
    assert model.lm_head.indices is model.model.embed_tokens.indices  # tied again after reload


def test_weight_sharing_model_reloads_and_exports_compact_with_matching_logits(tiny, tmp_path):
    import onnx

    from tasks.export import export_causal_lm

    weight_sharing(WeightSharingConfig(clusters=256, eval_windows=0, latency_tokens=0), tiny, tmp_path / "ws")
    model = load_causal_lm(tmp_path / "ws")
    q = model.model.layers[0].self_attn.q_proj
    assert len(np.unique(q.dense().numpy())) <= 256
    export_causal_lm(tmp_path / "ws", tmp_path / "onnx", ExportConfig(atol=1e-4))  # raises beyond atol

    inits = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer
    big_float = [i.name for i in inits if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 512]
    assert big_float == []  # every matrix is codebook + uint8 indices, the head included
    assert sum(1 for i in inits if i.data_type == onnx.TensorProto.UINT8) == 2 * 7 + 1  # the tied table once
    dense_bytes = 4 * count_parameters(load_causal_lm(tiny))
    assert sum(len(i.raw_data) for i in inits) < 0.5 * dense_bytes  # uint8 ~0.25 plus norms and graph constants


def test_kmeans_1d_recovers_the_centres_when_values_form_clusters():
    import torch

    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([-2.0, -0.5, 0.25, 3.0])
    labels_true = torch.randint(0, 4, (2000,), generator=g)
    values = truth[labels_true] + 0.01 * torch.randn(2000, generator=g)
    centers, labels = kmeans_1d(values, 4, iterations=10)
    np.testing.assert_allclose(centers.numpy(), truth.numpy(), atol=0.01)
    assert torch.equal(labels, labels_true)


@pytest.mark.parametrize("cols", [6, 7])
def test_codebook_unpacks_what_pack_stored_when_indices_are_4_bit(cols):
    import torch

    labels = torch.randint(0, 16, (3, cols), generator=torch.Generator().manual_seed(cols))
    mod = _modules().ClusteredLinear(cols, 3, 16, bias=False)
    mod.indices.copy_(_pack(labels, packed=True))
    mod.codebook.copy_(torch.arange(16, dtype=torch.float32))
    assert mod.indices.shape == (3, (cols + 1) // 2)
    assert torch.equal(mod.dense(), labels.float())


def test_load_causal_lm_loads_a_plain_folder_as_from_pretrained_when_no_sidecar(tiny):
    from transformers import AutoModelForCausalLM

    np.testing.assert_array_equal(_logits(load_causal_lm(tiny), IDS),
                                  _logits(AutoModelForCausalLM.from_pretrained(tiny).eval(), IDS))


def test_load_causal_lm_raises_source_error_when_sidecar_names_unknown_patch(tiny, tmp_path):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(tiny, folder)
    (folder / PATCHES_FILE).write_text(json.dumps({"format": "trimflow-patches/1",
                                                   "patches": [{"kind": "exec", "module": "lm_head"}]}))
    with pytest.raises(SourceError, match="unknown patch kind"):
        load_causal_lm(folder)


def test_recipe_plans_compress_techniques_when_named_in_a_recipe():
    from tasks.recipe import Recipe

    recipe = Recipe.model_validate({"name": "c", "steps": [{"technique": "lowrank", "energy": 0.9},
                                                           {"technique": "weight_sharing", "clusters": 16}]})
    plan = recipe.plan()
    assert [t.name for _, t, _ in plan] == ["lowrank", "weight_sharing", "export_onnx"]
    assert plan[0][2].energy == 0.9 and plan[1][2].clusters == 16
    with pytest.raises(ConfigError, match="clusters"):
        Recipe.model_validate({"name": "c", "steps": [{"technique": "weight_sharing", "clusters": 1000}]}).plan()
