"""What every optimization technique looks like to a recipe.

A technique is a typed config plus a function ``run(cfg, src, out, ctx) -> dict`` that reads
one model folder and writes the transformed model into an empty ``out`` folder. Modules that
implement techniques list them in a module-level ``TECHNIQUES``; ``tasks.recipe`` collects them.

    TECHNIQUES = [Technique("prune_mlp", stage="prune", config=PruneConfig, run=_run,
                            kinds=("causal_lm",), consumes="hf", produces="hf")]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

# Canonical order of stages: a recipe may order techniques freely within a stage, but stages
# run in this order (a PyTorch-side change after quantization would act on INT8 tensors).
STAGES = ("distill", "prune", "compress", "early_exit", "export", "quantize")
ModelForm = Literal["hf", "onnx"]


@dataclass
class StepContext:
    """What a technique may need beyond its input folder.

    Attributes:
        kind: ``causal_lm`` or ``encoder``.
        teacher_dir: the ingested fp32 teacher (an HF folder), for distillation losses.
        texts: a loader of the prepared splits: ``texts("train" | "calib" | "eval") -> list[str]``.
        resume_dir: a stable local folder for this step's checkpoints (survives a task retry).
        hf_dir: the last HF-form model of the recipe so far (export and exit heads need it).
        device: ``cpu`` or ``cuda`` (techniques pick CUDA automatically when present).
    """

    kind: str
    teacher_dir: Path
    texts: Callable[[str], list[str]]
    resume_dir: Path
    hf_dir: Path | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Technique:
    """One recipe step type.

    Args:
        name: the name recipes use (``distill``, ``prune_heads``, ``quantize_int4``, ...).
        stage: one of ``STAGES``.
        config: the frozen pydantic config class; recipe step fields are validated against it.
        run: ``run(cfg, src, out, ctx) -> dict`` (JSON-serializable result).
        kinds: model kinds it supports.
        consumes / produces: ``hf`` (PyTorch folder) or ``onnx`` (trimflow ONNX folder).
        description: one line for the recipe docs and errors.
    """

    name: str
    stage: str
    config: type
    run: Callable[..., dict[str, Any]]
    kinds: tuple[str, ...] = ("causal_lm",)
    consumes: ModelForm = "hf"
    produces: ModelForm = "hf"
    description: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"technique {self.name}: unknown stage {self.stage!r}; stages are {STAGES}")
