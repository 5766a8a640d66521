"""Recipes: an ordered list of techniques, validated before any work, run stage by stage.

A recipe is YAML (a file, or a name from ``tasks/recipes/``):

    name: llm-int4
    kind: causal_lm
    steps:
      - {technique: distill, student_layers: 24, steps: 12}
      - {technique: quantize_int4, block_size: 32}

Every step is published as its own artifact (``<run>/steps/<i>-<technique>``) with its config
and result, so the report can show what each step bought. Export is inserted automatically
between the PyTorch (``hf``) and ONNX stages when a recipe does not name it.

    recipe = load("quick")                       # or a path, or Recipe.model_validate(dict)
    plan = recipe.plan()                         # [(index, Technique, cfg)], validated
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import ConfigError
from tasks.technique import STAGES, Technique

RECIPES_DIR = Path(__file__).with_name("recipes")
# Modules that define TECHNIQUES; imported only when a recipe is planned (they import torch lazily).
TECHNIQUE_MODULES = (
    "tasks.distill", "tasks.prune", "tasks.compress", "tasks.early_exit", "tasks.export", "tasks.quantize",
    "tasks.encoder",
)


@lru_cache(maxsize=1)
def registry() -> dict[str, Technique]:
    """Every known technique by name."""
    found: dict[str, Technique] = {}
    for mod_name in TECHNIQUE_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # a technique module that does not exist (yet) contributes nothing
                continue
            raise
        for tech in getattr(mod, "TECHNIQUES", ()):
            if tech.name in found:
                raise RuntimeError(f"technique {tech.name!r} defined twice ({mod_name})")
            found[tech.name] = tech
    return found


class RecipeStep(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    technique: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Recipe(BaseModel):
    """A named, ordered list of technique steps for one model kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: str = "causal_lm"
    description: str = ""
    steps: tuple[RecipeStep, ...] = ()
    bench: dict[str, Any] = {}  # how benchmarks/ uses the recipe (role, note); the pipeline ignores it

    def plan(self) -> list[tuple[int, Technique, Any]]:
        """Resolve and validate every step; raises ``ConfigError`` naming the bad step and field."""
        reg = registry()
        planned: list[tuple[int, Technique, Any]] = []
        last_stage = -1
        form = "hf"
        for i, step in enumerate(self.steps):
            where = f"recipe {self.name} steps[{i}]"
            tech = reg.get(step.technique)
            if tech is None:
                raise ConfigError(f"{where}.technique", step.technique, f"unknown technique; known: {sorted(reg)}")
            if self.kind not in tech.kinds:
                raise ConfigError(f"{where}.technique", step.technique,
                                  f"does not apply to a {self.kind} model (supports {list(tech.kinds)})")
            stage = STAGES.index(tech.stage)
            if stage < last_stage:
                raise ConfigError(f"{where}.technique", step.technique,
                                  f"stage {tech.stage!r} cannot follow stage {STAGES[last_stage]!r}; "
                                  f"stages run in the order {list(STAGES)}")
            if tech.consumes == "hf" and form == "onnx":
                raise ConfigError(f"{where}.technique", step.technique, "needs a PyTorch model but the recipe "
                                                                        "already exported to ONNX")
            if tech.consumes == "onnx" and form == "hf":
                export = self._exporter(reg, where, step.technique)
                planned.append((len(planned), export, export.config()))
            try:
                cfg = tech.config.model_validate(step.params())
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(p) for p in err["loc"])
                raise ConfigError(f"{where}.{field}", err.get("input"), err["msg"]) from None
            planned.append((len(planned), tech, cfg))
            last_stage, form = stage, tech.produces
        if form == "hf":  # serving needs ONNX: export last if the recipe stopped in PyTorch
            export = self._exporter(reg, f"recipe {self.name}", "(end of recipe)")
            planned.append((len(planned), export, export.config()))
        return planned

    def _exporter(self, reg: dict[str, Technique], where: str, what: str) -> Technique:
        """The default export technique for this recipe's model kind."""
        for tech in reg.values():
            if tech.stage == "export" and self.kind in tech.kinds and tech.name.startswith("export"):
                return tech
        raise ConfigError(f"{where}.technique", what, f"needs an ONNX model and no export technique supports "
                                                      f"{self.kind} models")

    def stages_used(self) -> list[str]:
        return sorted({t.stage for _, t, _ in self.plan()}, key=STAGES.index)


def load(name_or_path: str) -> Recipe:
    """A recipe by name (``tasks/recipes/<name>.yaml``) or from a YAML file path."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError("recipe", name_or_path, f"no such recipe file; built-in recipes: {known}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("recipe", str(path), f"not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("recipe", str(path), "must be a mapping with name, kind and steps")
    data.setdefault("name", path.stem)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"recipe {path.name}: " + ".".join(str(p) for p in err["loc"]), err.get("input"),
                          err["msg"]) from None
