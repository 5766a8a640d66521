"""Encoder recipes: every shipped one plans, and the bench's local runner applies one and reuses shared steps."""

from __future__ import annotations

import json

import pytest

from tasks.recipe import RECIPES_DIR, Recipe, load
from tests.tiny import CORPUS, make_tiny_encoder

ENCODER_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("encoder-*.yaml"))


@pytest.mark.parametrize("name", ENCODER_RECIPES)
def test_encoder_recipe_plans_and_ends_in_onnx_when_loaded(name):
    recipe = load(name)
    plan = recipe.plan()
    assert recipe.kind == "encoder" and recipe.bench.get("role") in ("teacher_onnx", "technique", "student")
    assert plan[-1][1].produces == "onnx"
    assert all("encoder" in tech.kinds for _, tech, _ in plan)


def test_encoder_recipe_plan_raises_config_error_when_a_causal_lm_technique_is_used():
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="does not apply to a encoder model"):
        Recipe(name="x", kind="encoder", steps=[{"technique": "distill"}]).plan()


def test_encoder_recipe_plan_raises_config_error_when_a_field_is_unknown():
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=r"steps\[0\]\.layers"):
        Recipe(name="x", kind="encoder", steps=[{"technique": "encoder_distill", "layers": 2}]).plan()


def test_apply_recipe_runs_every_step_and_reuses_a_shared_prefix_when_two_recipes_share_it(tmp_path):
    from benchmarks.bench_encoder import apply_recipe

    tiny = make_tiny_encoder(tmp_path / "bert", layers=4)
    docs = [" ".join(CORPUS[(i + j) % 5] for j in range(4)) for i in range(12)]
    distill = {"technique": "encoder_distill", "student_layers": 2, "steps": 2, "batch_size": 4, "min_chars": 60,
               "max_chars": 200, "max_length": 48, "threads": 1}
    texts = lambda split: docs  # noqa: E731
    a = apply_recipe(Recipe(name="a", kind="encoder", steps=[distill]), tiny, texts, tmp_path / "w", "k")
    b = apply_recipe(Recipe(name="b", kind="encoder", steps=[distill, {"technique": "encoder_quantize_int8"}]),
                     tiny, texts, tmp_path / "w", "k")
    assert [s["technique"] for s in a["steps"]] == ["encoder_distill", "export_encoder_onnx"]
    assert [s["reused"] for s in b["steps"]] == [True, True, False]
    assert b["form"] == "onnx"
    meta = json.loads((b["folder"] / "trimflow_encoder.json").read_text())
    assert meta["onnx_file"] == "model.int8.onnx" and meta["num_layers"] == 2
    assert (b["folder"] / "_step_config.json").is_file() and (b["folder"] / "_step_result.json").is_file()
