"""Typed config from Params, presets and recipes: bad input fails before any work, naming the field."""

from __future__ import annotations

import pytest

from tasks.config import OptimizeConfig
from tasks.errors import ConfigError
from tasks.recipe import Recipe, load, registry


def test_from_params_converts_strings_when_params_come_from_a_form():
    cfg = OptimizeConfig.from_params({"profile": "ci", "prune_ratio": "0.3", "techniques": "quantize,distill"})
    assert cfg.prune.mlp_ratio == 0.3 and cfg.techniques == ("distill", "quantize")
    assert cfg.profile == "ci" and cfg.distill.steps == 6


@pytest.mark.parametrize("params, where", [
    ({"prune_ratio": 1.5}, "prune.mlp_ratio"),
    ({"techniques": "distill,foo"}, "techniques"),
    ({"bogus": 1}, "bogus"),
    ({"model_name": "a/b"}, "deploy.model_name"),
    ({"profile": "nope"}, "profile"),
    ({"source": "  "}, "source"),
])
def test_from_params_raises_config_error_naming_the_field_when_value_is_bad(params, where):
    with pytest.raises(ConfigError) as e:
        OptimizeConfig.from_params(params)
    assert e.value.where == where


def test_digest_changes_when_any_nested_field_changes():
    a = OptimizeConfig.preset("quick")
    assert a.digest() == OptimizeConfig.preset("quick").digest()
    assert a.digest() != OptimizeConfig.from_params({"prune_ratio": 0.2}).digest()


def test_build_recipe_mirrors_techniques_when_no_recipe_is_named():
    names = [t.name for _, t, _ in OptimizeConfig.from_params({"techniques": "quantize"}).build_recipe().plan()]
    assert names == ["export_onnx", "quantize_dynamic_int8"]
    full = [t.name for _, t, _ in OptimizeConfig.preset("quick").build_recipe().plan()]
    assert full == ["distill", "prune_mlp", "export_onnx", "quantize_dynamic_int8"]


def test_default_names_follow_the_model_kind():
    llm = OptimizeConfig.preset("quick")
    enc = OptimizeConfig.from_params({"recipe": "encoder-quick"})
    assert (llm.registered_name(), llm.deploy.name_for(llm.kind())) == ("trimflow-smollm2", "trimflow_llm")
    assert (enc.registered_name(), enc.deploy.name_for(enc.kind())) == ("trimflow-minilm", "trimflow_encoder")
    assert llm.deploy.stream_name("causal_lm") == "trimflow_llm_stream" and enc.deploy.stream_name("encoder") is None


def test_every_shipped_recipe_plans_without_error():
    from tasks.recipe import RECIPES_DIR

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        plan = load(path.stem).plan()
        assert plan, path
        assert plan[-1][1].produces == "onnx", f"{path.name} must end in a servable ONNX model"


@pytest.mark.parametrize("steps, where, fragment", [
    ([{"technique": "nope"}], "steps[0].technique", "unknown technique"),
    ([{"technique": "quantize_dynamic_int8"}, {"technique": "distill"}], "steps[1].technique", "cannot follow"),
    ([{"technique": "prune_mlp", "mlp_ratio": 1.5}], "steps[0].mlp_ratio", "less than 1"),
    ([{"technique": "prune_mlp", "typo_field": 1}], "steps[0].typo_field", "Extra inputs"),
])
def test_recipe_plan_raises_naming_the_step_when_recipe_is_bad(steps, where, fragment):
    with pytest.raises(ConfigError) as e:
        Recipe(name="bad", steps=steps).plan()
    assert where in e.value.where and fragment in e.value.problem


def test_recipe_plan_refuses_a_technique_for_another_model_kind():
    with pytest.raises(ConfigError, match="does not apply to a encoder model"):
        Recipe(name="bad", kind="encoder", steps=[{"technique": "distill"}]).plan()


def test_recipe_plan_inserts_export_before_the_first_onnx_step():
    names = [t.name for _, t, _ in Recipe(name="q", steps=[{"technique": "quantize_dynamic_int8"}]).plan()]
    assert names == ["export_onnx", "quantize_dynamic_int8"]


def test_load_raises_listing_builtin_recipes_when_name_is_unknown():
    with pytest.raises(ConfigError, match="built-in recipes") as e:
        load("no-such-recipe")
    assert "quick" in e.value.problem


def test_registry_holds_every_issue_technique():
    expected = {"distill", "prune_mlp", "prune_heads", "prune_layers", "sparsity_2_4", "lowrank", "weight_sharing",
                "early_exit", "export_onnx", "quantize_dynamic_int8", "quantize_static_int8", "quantize_int4",
                "convert_fp16", "encoder_distill", "export_encoder_onnx", "encoder_quantize_int8", "encoder_early_exit"}
    assert expected <= set(registry())
