"""Structured MLP pruning on the tiny random Llama: real shape changes, ranking, errors."""

from __future__ import annotations

import json

import pytest

from tasks.config import PruneConfig
from tasks.errors import ConfigError, UnsupportedModelError
from tasks.prune import kept_neurons, prune_mlp
from tests.tiny import CORPUS, make_tiny_encoder, make_tiny_llm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("prune") / "tiny", layers=2, intermediate=64)


def test_prune_mlp_shrinks_every_layer_and_the_saved_model_runs(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pruned"
    result = prune_mlp(PruneConfig(mlp_ratio=0.25), tiny, out)  # no texts: the built-in calibration set

    assert result["intermediate_before"] == 64 and result["intermediate_after"] == 48
    assert result["params_after"] < result["params_before"]
    assert result["size_bytes_after"] < result["size_bytes_before"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
    assert result["calibration_source"] == "builtin" and result["calibration_tokens"] == 1024
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        assert tuple(layer.mlp.gate_proj.weight.shape) == (48, 32)
        assert tuple(layer.mlp.up_proj.weight.shape) == (48, 32)
        assert tuple(layer.mlp.down_proj.weight.shape) == (32, 48)
    # Parameters removed: 2 layers × 16 neurons × (gate row + up row + down column) × hidden 32.
    assert result["params_before"] - result["params_after"] == 2 * 16 * 3 * 32
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The city council voted")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def _model_with_decoys(path):
    """A one-layer tiny Llama whose MLP neurons 3, 17, 40, 63 have huge weights but never fire.

    The MLP's input norm zeroes channel 0, and the decoys read only channel 0: large weight norms,
    zero activation. Weight-norm ranking keeps them; activation ranking must drop them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    src = make_tiny_llm(path, layers=1, intermediate=64)
    model = AutoModelForCausalLM.from_pretrained(src)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.post_attention_layernorm.weight[0] = 0.0
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[DECOYS] = 0.0
            proj.weight[DECOYS, 0] = 100.0
    model.save_pretrained(src)
    return src


DECOYS = [3, 17, 40, 63]


def test_prune_mlp_by_weight_norms_keeps_the_largest_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = _model_with_decoys(tmp_path / "src")
    down_before = AutoModelForCausalLM.from_pretrained(src).model.layers[0].mlp.down_proj.weight.detach()

    result = prune_mlp(PruneConfig(mlp_ratio=60 / 64, importance="weight"), src, tmp_path / "out")

    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].mlp.down_proj.weight
    assert torch.equal(kept, down_before[:, DECOYS])
    assert result["calibration_source"] is None and result["calibration_tokens"] == 0


def test_prune_mlp_by_activation_drops_neurons_that_never_fire(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = _model_with_decoys(tmp_path / "src")
    down_before = AutoModelForCausalLM.from_pretrained(src).model.layers[0].mlp.down_proj.weight.detach()

    result = prune_mlp(PruneConfig(mlp_ratio=0.5, calib_tokens=200), src, tmp_path / "out", calib_texts=CORPUS)

    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].mlp.down_proj.weight
    assert kept.shape[1] == 32
    for j in DECOYS:
        assert not any(torch.equal(kept[:, k], down_before[:, j]) for k in range(kept.shape[1]))
    assert result["calibration_source"] == "caller" and result["calibration_tokens"] == 200


def test_prune_mlp_raises_config_error_before_work_when_ratio_leaves_no_neuron(tiny, tmp_path):
    with pytest.raises(ConfigError, match="prune.mlp_ratio"):
        prune_mlp(PruneConfig(mlp_ratio=0.995), tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kept_neurons_rounds_to_nearest_and_never_returns_zero():
    assert kept_neurons(1536, 0.25) == 1152
    assert kept_neurons(10, 0.94) == 1
    with pytest.raises(ConfigError):
        kept_neurons(10, 0.96)


def test_prune_mlp_raises_unsupported_model_error_for_an_encoder(tmp_path):
    enc = make_tiny_encoder(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="bert"):
        prune_mlp(PruneConfig(), enc, tmp_path / "out")


# -- issue 3: Taylor importance, heads, layers, 2:4 sparsity, recovery ------------------------
def test_prune_mlp_by_taylor_drops_neurons_that_never_fire_while_magnitude_keeps_them(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.prune import PruneMlpConfig

    src = _model_with_decoys(tmp_path / "src")
    down_before = AutoModelForCausalLM.from_pretrained(src).model.layers[0].mlp.down_proj.weight.detach()
    cfg = dict(mlp_ratio=60 / 64, calib_tokens=200)
    prune_mlp(PruneMlpConfig(**cfg, importance="magnitude"), src, tmp_path / "mag", calib_texts=CORPUS)
    result = prune_mlp(PruneMlpConfig(**cfg, importance="taylor"), src, tmp_path / "taylor", calib_texts=CORPUS)

    mag = AutoModelForCausalLM.from_pretrained(tmp_path / "mag").model.layers[0].mlp.down_proj.weight
    tay = AutoModelForCausalLM.from_pretrained(tmp_path / "taylor").model.layers[0].mlp.down_proj.weight
    assert torch.equal(mag, down_before[:, DECOYS])
    # A neuron that never fires has a zero first-order effect on the loss.
    for j in DECOYS:
        assert not any(torch.equal(tay[:, k], down_before[:, j]) for k in range(tay.shape[1]))
    assert result["importance"].startswith("sum over calibration chunks")
    assert result["calib_ppl_after"] > 0 and result["calibration_tokens"] == 200


def _silence(src, out, heads=(), layers=()):
    """Copy of ``src`` whose listed query heads (every layer) and whole layers write nothing to the residual."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    hd = model.config.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            if i in layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    from tasks.modelio import copy_tokenizer

    copy_tokenizer(src, out)
    return out


def _logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits


@pytest.mark.parametrize("granularity,silent,kept_q,kept_kv", [
    ("query_per_group", (0, 3), [1, 2], 2),   # groups {0,1} and {2,3} each lose their silent head
    ("kv_group", (2, 3), [0, 1], 1),          # the silent group goes with its KV head
])
@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_prune_heads_removes_silent_heads_and_keeps_the_logits_when_they_contribute_nothing(
        tiny, tmp_path, granularity, silent, kept_q, kept_kv, importance):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.prune import PruneHeadsConfig, prune_heads

    src = _silence(tiny, tmp_path / "src", heads=silent)
    cfg = PruneHeadsConfig(head_ratio=0.5, granularity=granularity, importance=importance, calib_tokens=200)
    result = prune_heads(cfg, src, tmp_path / "out", calib_texts=CORPUS)

    assert result["kept_heads"] == [kept_q, kept_q]
    assert (result["heads_after"], result["kv_heads_after"]) == (2, kept_kv)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (conf["num_attention_heads"], conf["num_key_value_heads"], conf["head_dim"]) == (2, kept_kv, 8)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (16, 32) and tuple(attn.k_proj.weight.shape) == (8 * kept_kv, 32)
    assert tuple(attn.o_proj.weight.shape) == (32, 16)
    assert result["params_after"] < result["params_before"]
    ids = torch.tensor([[3, 8, 20, 7, 11, 4]])
    torch.testing.assert_close(_logits(tmp_path / "out", ids), _logits(src, ids), atol=1e-5, rtol=1e-4)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_prune_heads_by_magnitude_needs_no_calibration_text(tiny, tmp_path):
    from tasks.prune import PruneHeadsConfig, prune_heads

    result = prune_heads(PruneHeadsConfig(head_ratio=0.5, importance="magnitude"), tiny, tmp_path / "out")

    assert result["calibration_source"] is None and result["heads_after"] == 2


@pytest.mark.parametrize("importance", ["block_influence", "angular", "taylor"])
def test_prune_layers_removes_an_identity_layer_and_keeps_the_logits(tmp_path, importance):
    import torch

    from tasks.prune import PruneLayersConfig, prune_layers

    src = _silence(make_tiny_llm(tmp_path / "tiny", layers=4), tmp_path / "src", layers=(2,))
    result = prune_layers(PruneLayersConfig(layer_ratio=0.25, importance=importance, calib_tokens=200), src,
                          tmp_path / "out", calib_texts=CORPUS)

    assert result["removed_layers"] == [2] and result["kept_layers"] == [0, 1, 3]
    assert result["teacher_layer_map"] == [0, 1, 3]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    ids = torch.tensor([[3, 8, 20, 7, 11, 4]])
    torch.testing.assert_close(_logits(tmp_path / "out", ids), _logits(src, ids), atol=1e-5, rtol=1e-4)


def test_sparsity_2_4_zeroes_two_of_every_four_weights_and_recovery_keeps_the_pattern(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.distill import KDConfig
    from tasks.prune import LINEAR_TARGETS, Sparsity24Config, is_2_4, sparsity_2_4

    cfg = Sparsity24Config(importance="wanda", calib_tokens=200, recovery_steps=3,
                           recovery=KDConfig(batch_size=2, seq_len=16, lr=1e-3, progress=False))
    result = sparsity_2_4(cfg, tiny, tmp_path / "out", calib_texts=CORPUS, train_texts=CORPUS * 4,
                          resume_dir=tmp_path / "resume")

    assert result["target_sparsity"] == pytest.approx(0.5) and result["sparsified_linears"] == 2 * 7
    assert 0.3 < result["model_sparsity"] < 0.5  # embeddings and norms stay dense
    assert result["recovery"]["steps"] == 3 and result["pattern_kept_after_recovery"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for layer in model.model.layers:
        for name in LINEAR_TARGETS:
            block = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
            w = getattr(block, name).weight
            assert is_2_4(w) and float((w == 0).float().mean()) == pytest.approx(0.5)


def test_prune_layers_with_recovery_distills_the_pruned_model_against_the_teacher(tiny, tmp_path):
    from tasks.distill import KDConfig
    from tasks.prune import PruneLayersConfig, prune_layers

    cfg = PruneLayersConfig(layer_ratio=0.5, calib_tokens=200, recovery_steps=4,
                            recovery=KDConfig(batch_size=2, seq_len=16, checkpoint_every=2, progress=False))
    result = prune_layers(cfg, tiny, tmp_path / "out", calib_texts=CORPUS, teacher_dir=tiny,
                          train_texts=CORPUS * 4, resume_dir=tmp_path / "resume")

    rec = result["recovery"]
    assert rec["steps"] == 4 and rec["src_layers"] == 1 and rec["teacher_layers"] == 2
    assert rec["teacher_layer_map"] == result["teacher_layer_map"] == result["kept_layers"]
    assert (tmp_path / "resume" / "checkpoint.pt").is_file()
    assert result["calib_ppl_recovered"] > 0
    assert json.loads((tmp_path / "out" / "trimflow_prune.json").read_text())["recovery"]["steps"] == 4


@pytest.mark.parametrize("name,params,field", [
    ("prune_heads", {"head_ratio": 0.8}, "head_ratio"),                               # 2 per group -> 0
    ("prune_heads", {"head_ratio": 0.8, "granularity": "kv_group"}, "head_ratio"),    # 2 groups -> 0
    ("prune_layers", {"layer_ratio": 0.9}, "layer_ratio"),                            # 2 layers -> 0
    ("prune_mlp", {"recovery_steps": 2}, "recovery_steps"),                           # no training texts
])
def test_pruning_raises_config_error_before_work_when_nothing_would_be_left(tiny, tmp_path, name, params, field):
    import tasks.prune as prune_mod

    cfg = {t.name: t.config for t in prune_mod.TECHNIQUES}[name](**params)
    with pytest.raises(ConfigError, match=field):
        getattr(prune_mod, name)(cfg, tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["prune_heads", "prune_layers", "sparsity_2_4"])
def test_new_pruning_techniques_raise_unsupported_model_error_for_an_encoder(tmp_path, name):
    import tasks.prune as prune_mod

    enc = make_tiny_encoder(tmp_path / "bert")
    cfg = {t.name: t.config for t in prune_mod.TECHNIQUES}[name]()
    with pytest.raises(UnsupportedModelError, match="bert"):
        getattr(prune_mod, name)(cfg, enc, tmp_path / "out")


def test_recipe_plans_the_new_techniques_and_rejects_a_structural_recovery():
    from tasks.recipe import Recipe

    steps = [{"technique": "distill", "layer_ratio": 0.5, "hidden_ratio": 0.75, "steps": 10},
             {"technique": "prune_heads", "head_ratio": 0.33, "recovery_steps": 20},
             {"technique": "prune_layers", "layer_ratio": 0.1, "importance": "angular"},
             {"technique": "prune_mlp", "mlp_ratio": 0.2, "importance": "taylor"},
             {"technique": "sparsity_2_4", "importance": "wanda", "recovery": {"lr": 5e-5}}]
    plan = Recipe(name="issue3", steps=steps).plan()
    assert [t.name for _, t, _ in plan][:5] == ["distill", "prune_heads", "prune_layers", "prune_mlp", "sparsity_2_4"]
    assert plan[1][2].recovery_config().steps == 20 and plan[4][2].recovery_config().lr == 5e-5
    with pytest.raises(ConfigError, match="recovery"):
        Recipe(name="bad", steps=[{"technique": "prune_mlp", "recovery": {"layer_ratio": 0.5}}]).plan()


def test_prune_technique_recovers_against_the_context_teacher(tiny, tmp_path):
    from tasks.prune import TECHNIQUES, PruneMlpConfig
    from tasks.technique import StepContext

    tech = {t.name: t for t in TECHNIQUES}["prune_mlp"]
    ctx = StepContext(kind="causal_lm", teacher_dir=tiny, texts=lambda split: CORPUS * 4, resume_dir=tmp_path / "r")
    cfg = PruneMlpConfig.model_validate({"mlp_ratio": 0.5, "recovery_steps": 1,
                                         "recovery": {"batch_size": 2, "seq_len": 16, "progress": False}})
    result = tech.run(cfg, tiny, tmp_path / "out", ctx)

    assert result["recovery"]["steps"] == 1 and result["intermediate_after"] == 32
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
