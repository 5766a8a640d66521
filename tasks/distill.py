"""Knowledge distillation of a smaller student from a Llama-style teacher.

The student starts from ``src`` (the teacher itself for a first distill step, a pruned model for
a recovery run) and can be made smaller first: fewer decoder layers (picked evenly, first and last
kept) and/or narrower (hidden channels, MLP neurons and query heads sliced by importance on the
training text, consistently in every tensor). It is then trained against the teacher with a KD
loss on temperature-softened logits, optionally plus hidden-state and attention transfer through a
student→teacher layer map. Gradient accumulation, a warmup + decay LR schedule, atomic resumable
checkpoints and a progress bar are built in; CUDA with bf16 autocast is used when present, and the
same code runs data-parallel under ``torchrun`` (one shard of every batch per rank, DDP gradients).

    cfg = KDConfig(layer_ratio=0.5, hidden_ratio=0.75, steps=200, hidden_weight=1.0)
    result = distill(cfg, teacher_dir, train_texts, out_dir, resume_dir)          # src = the teacher
    result["teacher_layer_map"], result["final_loss"]      # student layer i mimics teacher layer map[i]

Multi-GPU (or multi-process CPU) without code changes:

    torchrun --nproc_per_node 8 -m tasks.distill --teacher T --texts train.jsonl --out O --resume-dir R \
        --config '{"layer_ratio": 0.5, "steps": 2000, "batch_size": 64}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, model_validator

from tasks.config import DistillConfig
from tasks.errors import ConfigError, UnsupportedModelError
from tasks.modelio import available_cores, copy_tokenizer, count_parameters, require_causal_lm, torch_threads
from tasks.technique import Technique

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT_FILE = "trimflow_distill.json"
# Which teacher layer each decoder layer of a saved model descends from; the techniques of this
# module and tasks.prune write it, so a later distillation maps hidden states to the right layers.
LAYER_MAP_FILE = "trimflow_layer_map.json"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class KDConfig(DistillConfig):
    """Distillation of a student that starts from ``src``, against the teacher.

    Inherits the training fields of ``tasks.config.DistillConfig`` (``steps`` default 12,
    ``batch_size`` 4, ``seq_len`` 128, ``lr`` 3e-4, ``temperature`` 2.0, ``alpha_ce`` 0.1,
    ``checkpoint_every`` 10, ``seed`` 0, ``warmup_ratio`` 0.1, ``weight_decay`` 0.01,
    ``max_grad_norm`` 1.0). ``batch_size`` is the global batch of one micro-step; under torchrun it
    is split across ranks, so results do not depend on the number of processes.

    Args:
        student_layers: decoder layers kept, picked evenly from ``src`` (first and last kept); applied
            only when ``src`` has more layers (default None: keep ``src``'s depth).
        layer_ratio: the same as a fraction of ``src``'s layers, rounded, at least 2 (default None).
            At most one of ``student_layers`` and ``layer_ratio``.
        hidden_ratio: fraction of hidden channels kept, ranked by RMSNorm output energy on the
            training text; embeddings, norms, q/k/v/o, MLP and lm_head are sliced alike (default 1.0).
        intermediate_ratio: fraction of MLP neurons kept per layer, ranked by activation energy
            (default 1.0).
        head_ratio: fraction of KV groups kept, each with its query heads (the KV cache shrinks
            alike; whole groups lost less quality than heads from every group, see
            ``tasks.prune.PruneHeadsConfig``) (default 1.0).
        width_calib_tokens: training-text tokens used to rank channels, neurons and heads
            (default 2048).
        hidden_weight: weight of the hidden-state transfer loss between every student layer's
            output and its mapped teacher layer's output (default 0.0: off). A student narrower than
            the teacher is compared through the kept channels (sliced here) or a learned linear
            projection (narrowed earlier).
        hidden_loss: ``cosine`` (1 − cosine per token) or ``mse`` (MSE divided by the teacher
            states' mean square, so it is scale-free) (default cosine).
        attention_weight: weight of the attention-transfer loss, KL between teacher and student
            attention maps of mapped layers, per head when head counts match, else head-averaged;
            needs eager attention, which is slower (default 0.0: off).
        grad_accum: micro-batches accumulated per optimizer step (default 1).
        lr_schedule: after the linear warmup, ``cosine`` to 10% of the peak, ``linear`` to 10%,
            or ``constant`` (default cosine).
        progress: show a tqdm progress bar on stderr (rank 0 only) (default True).
    """

    student_layers: int | None = Field(None, ge=1)
    layer_ratio: float | None = Field(None, gt=0, le=1)
    hidden_ratio: float = Field(1.0, gt=0, le=1)
    intermediate_ratio: float = Field(1.0, gt=0, le=1)
    head_ratio: float = Field(1.0, gt=0, le=1)
    width_calib_tokens: int = Field(2048, ge=16)
    hidden_weight: float = Field(0.0, ge=0)
    hidden_loss: Literal["cosine", "mse"] = "cosine"
    attention_weight: float = Field(0.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    progress: bool = True

    @model_validator(mode="after")
    def _one_depth_form(self) -> "KDConfig":
        if self.student_layers is not None and self.layer_ratio is not None:
            raise ValueError("give student_layers or layer_ratio, not both")
        return self

    @property
    def narrows(self) -> bool:
        return min(self.hidden_ratio, self.intermediate_ratio, self.head_ratio) < 1.0

    @property
    def changes_structure(self) -> bool:
        return self.student_layers is not None or self.layer_ratio is not None or self.narrows


def as_kd_config(cfg: DistillConfig) -> KDConfig:
    """``cfg`` as a ``KDConfig`` (the pipeline's ``DistillConfig`` converts field for field)."""
    return cfg if isinstance(cfg, KDConfig) else KDConfig.model_validate(cfg.model_dump())


def select_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Layer indices kept in the student: evenly spaced, first and last always included.

    Args:
        teacher_layers: decoder layers in the model the student is cut from.
        student_layers: decoder layers wanted in the student (2 ≤ n ≤ teacher_layers, or 1 for a
            one-layer teacher).

    Raises:
        ConfigError: the student would be deeper than the teacher, or too shallow to keep both ends.
    """
    n, k = teacher_layers, student_layers
    if k > n:
        raise ConfigError("distill.student_layers", k, f"the teacher has only {n} layers")
    if k < 2 and n > 1:
        raise ConfigError("distill.student_layers", k, "at least 2 layers are needed to keep the first and the last")
    if k == 1:
        return [0]
    # Spacing (n-1)/(k-1) ≥ 1, so rounding never picks the same layer twice.
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def student_depth(cfg: KDConfig, src_layers: int) -> int:
    """Decoder layers of the student cut from a ``src_layers``-layer source (no cut: ``src_layers``).

    Raises:
        ConfigError: ``layer_ratio`` or ``student_layers`` leaves fewer than 2 layers of a deeper model.
    """
    if cfg.layer_ratio is not None:
        k = int(round(src_layers * cfg.layer_ratio))
        if k < 2 and src_layers > 1:
            raise ConfigError("distill.layer_ratio", cfg.layer_ratio,
                              f"keeps {k} of {src_layers} layers; at least 2 are needed (first and last)")
        return min(max(k, 1), src_layers)
    if cfg.student_layers is None or cfg.student_layers >= src_layers:
        return src_layers
    select_layers(src_layers, cfg.student_layers)  # validates
    return cfg.student_layers


def build_student(teacher, layer_map: Sequence[int]):
    """A copy of ``teacher`` that keeps only the decoder layers in ``layer_map`` (in that order).

    Built from a fresh config rather than by deleting modules, so every layer's index (used by
    the KV cache) is renumbered consistently.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layer_map)
    if getattr(cfg, "layer_types", None):  # per-layer attention kinds (sliding/full) in Qwen-style configs
        cfg.layer_types = [cfg.layer_types[i] for i in layer_map]
    new_index = {t: s for s, t in enumerate(layer_map)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.detach().clone()
        elif int(m.group(1)) in new_index:
            state[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = value.detach().clone()
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    student.load_state_dict(state, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return student


def read_layer_map(model_dir: Path, teacher_layers: int) -> list[int]:
    """Teacher layer index of each decoder layer of ``model_dir``.

    From ``trimflow_layer_map.json`` when an earlier trimflow step wrote it; otherwise the identity
    when the depths match, else the even spacing ``select_layers`` would have picked.
    """
    n = int(require_causal_lm(model_dir)["num_hidden_layers"])
    path = Path(model_dir) / LAYER_MAP_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("teacher_layers") == teacher_layers and len(saved.get("map", [])) == n:
            return [int(i) for i in saved["map"]]
        log.warning("%s does not describe this model/teacher pair; mapping layers evenly", path)
    if n == teacher_layers:
        return list(range(n))
    if n > teacher_layers:
        # Deeper than the teacher (e.g. grown by hand): clamp; hidden transfer then repeats layers.
        return [min(round(i * (teacher_layers - 1) / max(1, n - 1)), teacher_layers - 1) for i in range(n)]
    return select_layers(teacher_layers, n)


def write_layer_map(out_dir: Path, teacher_layers: int, layer_map: Sequence[int]) -> None:
    (Path(out_dir) / LAYER_MAP_FILE).write_text(json.dumps({"teacher_layers": int(teacher_layers),
                                                           "map": [int(i) for i in layer_map]}))


def pack_windows(tokenizer, texts: Sequence[str], seq_len: int):
    """Tokenize ``texts``, join them with EOS and cut the stream into [N, seq_len] int64 windows.

    The tail shorter than ``seq_len`` is dropped.
    """
    import torch

    sep = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batch_indices(step: int, batch_size: int, n_windows: int, seed: int) -> list[int]:
    """Window indices of batch ``step``: epochs are seeded permutations (``seed + epoch``) read in order.

    A pure function of the step, so a resumed run sees exactly the batches it would have seen.
    """
    import torch

    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[i]))
    return out


def kd_loss(student_logits, teacher_logits, input_ids, temperature: float, alpha_ce: float):
    """KD objective: ``(1 - alpha_ce) · T² · KL(p_teacher,T ‖ p_student,T) + alpha_ce · CE(next token)``.

    The KL term is Hinton's forward KL from the temperature-softened teacher distribution to the
    student's, averaged over all token positions; T² keeps its gradient scale independent of T.
    Returns ``(loss, kl, ce)`` tensors.
    """
    import torch.nn.functional as F

    s = student_logits.float()
    t = teacher_logits.float()
    v = s.shape[-1]
    kl = F.kl_div(F.log_softmax(s / temperature, -1).reshape(-1, v), F.log_softmax(t / temperature, -1).reshape(-1, v),
                  reduction="batchmean", log_target=True) * temperature ** 2
    ce = F.cross_entropy(s[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1))
    return (1 - alpha_ce) * kl + alpha_ce * ce, kl, ce


def hidden_state_loss(student_states, teacher_states, kind: str = "cosine"):
    """Mean over layer pairs of the distance between student and (projected) teacher hidden states.

    Args:
        student_states / teacher_states: equal-length sequences of [B, S, D] tensors, already in the
            same width.
        kind: ``cosine`` (mean of 1 − cos per token) or ``mse`` (MSE / mean square of the teacher
            states, so layers with large residual streams do not dominate) (default cosine).
    """
    import torch
    import torch.nn.functional as F

    losses = []
    for s, t in zip(student_states, teacher_states):
        s, t = s.float(), t.float()
        if kind == "cosine":
            losses.append((1 - F.cosine_similarity(s, t, dim=-1)).mean())
        else:
            losses.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-6))
    return torch.stack(losses).mean()


def attention_loss(student_maps, teacher_maps):
    """Mean KL(teacher ‖ student) over the key axis of attention maps [B, H, S, S], per mapped layer.

    Head counts that differ are compared after averaging each map over its heads.
    """
    import torch

    losses = []
    for s, t in zip(student_maps, teacher_maps):
        s, t = s.float(), t.float()
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        kl = (t * (t.clamp_min(1e-9).log() - s.clamp_min(1e-9).log())).sum(-1)
        losses.append(kl.mean())
    return torch.stack(losses).mean()


def lr_lambda(steps: int, warmup_ratio: float, schedule: str = "cosine"):
    """Multiplier of the peak LR at each step: linear warmup, then ``schedule`` decay to 10% of the peak."""
    warmup = max(1, round(warmup_ratio * steps)) if steps > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return 1.0 - 0.9 * progress
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class DistEnv:
    """This process's place in a torchrun job (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), or a lone process."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.created_group = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        if self.distributed:
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return "cuda"

    def init(self) -> None:
        import torch
        import torch.distributed as dist

        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            self.created_group = True

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()
            self.created_group = False

    def threads(self) -> int:
        # Processes on one machine share its cores; oversubscribing them slows every rank.
        return max(1, available_cores() // max(1, self.local_world))


def resume_checkpoint(path: Path, device: str, fingerprint: str, where: str, inputs: str, model, optimizer,
                      scheduler) -> dict[str, Any] | None:
    """Load a training checkpoint into ``model``/``optimizer``/``scheduler`` and return it (None: none yet).

    Shared by the LLM and encoder distillations; the caller restores its own counters from the result.

    Raises:
        ConfigError: the checkpoint belongs to another run (its fingerprint over ``inputs`` differs).
    """
    import torch

    if not Path(path).is_file():
        return None
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if ckpt.get("fingerprint") != fingerprint:
        raise ConfigError(
            where, str(path),
            f"holds a checkpoint of a different run (fingerprint {ckpt.get('fingerprint')}, this run "
            f"{fingerprint}: {inputs} changed); delete it to start over")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt


def distill(cfg: DistillConfig, teacher_dir: Path, train_texts: list[str], out_dir: Path, resume_dir: Path, *,
            src_dir: Path | None = None, keep_zeros: bool = False) -> dict[str, Any]:
    """Distill a student from ``teacher_dir`` starting from ``src_dir``; save it as a HF folder in ``out_dir``.

    Args:
        cfg: a ``KDConfig`` (a plain ``DistillConfig`` is converted): structure of the student,
            steps, batch, schedule, loss weights, checkpoint interval, seed.
        teacher_dir: fp32 Hugging Face folder of a Llama-style causal LM with its tokenizer.
        train_texts: training documents; tokenized and packed into ``cfg.seq_len`` windows (the
            first ``width_calib_tokens`` of them also rank channels when the student is narrowed).
        out_dir: receives ``model.safetensors``, ``config.json``, the tokenizer files,
            ``trimflow_layer_map.json`` and ``trimflow_distill.json`` (config and this result). Under
            torchrun only rank 0 writes.
        resume_dir: stable folder for ``checkpoint.pt``; a rerun with the same config, models and
            texts resumes from it (all ranks read it, rank 0 writes it). ``steps=0`` writes the
            cut-down student without training.
        src_dir: where the student starts (default None: the teacher). Must share the teacher's
            vocabulary.
        keep_zeros: weights of decoder linear layers that are exactly zero in ``src_dir`` stay zero
            through training (recovery of a 2:4-sparse model) (default False).

    Returns:
        ``layer_map`` (student layer → ``src`` layer), ``teacher_layer_map`` (student layer → teacher
        layer), ``src_layers``, ``teacher_layers``, ``student_layers``, ``hidden_size``,
        ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``num_parameters``,
        ``teacher_parameters``, ``src_parameters``, ``steps``, ``resumed_from_step``, ``first_loss``,
        ``final_loss``, ``avg_loss``, ``final_kl``, ``final_ce``, ``first_hidden``, ``final_hidden``,
        ``final_attention``, ``hidden_channels`` (teacher channels kept when narrowed here, else None),
        ``loss_curve`` (≤ 50 ``[step, loss]`` points), ``tokens_seen``, ``train_windows``,
        ``world_size``, ``seconds``, ``build_seconds``, ``seconds_per_step``, ``device``, ``dtype``.

    Raises:
        UnsupportedModelError: the teacher or source is not a Llama-style causal LM, or their
            vocabularies differ.
        ConfigError: the depth or width asked for does not fit, the texts are too short for one
            window, the global batch does not split evenly across ranks, or ``resume_dir`` holds a
            checkpoint of a different run.
    """
    cfg = as_kd_config(cfg)
    teacher_dir, out_dir, resume_dir = Path(teacher_dir), Path(out_dir), Path(resume_dir)
    src_dir = teacher_dir if src_dir is None else Path(src_dir)
    tconf = require_causal_lm(teacher_dir, "distill")
    sconf = require_causal_lm(src_dir, "distill")
    if tconf.get("vocab_size") != sconf.get("vocab_size"):
        raise UnsupportedModelError(f"distill: {src_dir} has vocab_size {sconf.get('vocab_size')} but the teacher "
                                    f"{teacher_dir} has {tconf.get('vocab_size')}; KD needs one vocabulary")
    teacher_layers, src_layers = int(tconf["num_hidden_layers"]), int(sconf["num_hidden_layers"])
    depth = student_depth(cfg, src_layers)
    layer_map = select_layers(src_layers, depth) if depth < src_layers else list(range(src_layers))
    if cfg.narrows:
        from tasks.prune import check_width  # tasks.prune builds on this module: import late

        check_width(sconf, cfg)
    if cfg.steps > 0 and not train_texts:
        raise ConfigError("train_texts", 0, "distillation with steps > 0 needs training texts")
    if cfg.narrows and not train_texts:
        raise ConfigError("train_texts", 0, "narrowing the student ranks channels on the training texts")
    env = DistEnv()
    if env.distributed and cfg.batch_size % env.world:
        raise ConfigError("distill.batch_size", cfg.batch_size,
                          f"must be a multiple of the {env.world} torchrun processes (each gets an equal shard)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    env.init()
    try:
        with torch_threads(env.threads()):
            tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
            teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
            teacher_params = count_parameters(teacher)
            src = teacher if src_dir == teacher_dir else \
                AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
            src_params = count_parameters(src)
            # A copy whenever src is the teacher: the teacher itself must stay frozen.
            student = build_student(src, layer_map) if (len(layer_map) < src_layers or src is teacher) else src
            src_teacher_map = read_layer_map(src_dir, teacher_layers)
            teacher_map = [src_teacher_map[i] for i in layer_map]
            hidden_channels = None
            if cfg.narrows:
                from tasks.prune import narrow

                student, hidden_channels = narrow(student, tokenizer, train_texts, cfg)
                if int(sconf["hidden_size"]) != int(tconf["hidden_size"]):
                    hidden_channels = None  # indices of src's channels, not the teacher's: learn a projection
            build_seconds = time.time() - started
            train = None
            if cfg.steps:
                train = _Training(cfg, env, teacher, student, tokenizer, train_texts, resume_dir,
                                  [teacher_dir, src_dir], teacher_map, hidden_channels, keep_zeros)
                train.run()
                student = train.student
            student = student.cpu().float().eval()
            if env.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
                student.save_pretrained(out_dir, safe_serialization=True)
                copy_tokenizer(src_dir if (src_dir / "tokenizer.json").is_file() else teacher_dir, out_dir)
                write_layer_map(out_dir, teacher_layers, teacher_map)
        sc = student.config
        result: dict[str, Any] = {
            "layer_map": layer_map,
            "teacher_layer_map": teacher_map,
            "src_layers": src_layers,
            "teacher_layers": teacher_layers,
            "student_layers": len(layer_map),
            "hidden_size": int(sc.hidden_size),
            "intermediate_size": int(sc.intermediate_size),
            "num_attention_heads": int(sc.num_attention_heads),
            "num_key_value_heads": int(getattr(sc, "num_key_value_heads", None) or sc.num_attention_heads),
            "num_parameters": count_parameters(student),
            "teacher_parameters": teacher_params,
            "src_parameters": src_params,
            "hidden_channels": hidden_channels,
            "world_size": env.world,
            "build_seconds": round(build_seconds, 2),
            "seconds": round(time.time() - started, 2),
        }
        result.update(train.summary() if train is not None else {
            "steps": 0, "resumed_from_step": 0, "first_loss": None, "final_loss": None, "avg_loss": None,
            "final_kl": None, "final_ce": None, "first_hidden": None, "final_hidden": None, "final_attention": None, "loss_curve": [],
            "tokens_seen": 0, "train_windows": 0, "seconds_per_step": None, "device": "cpu", "dtype": "float32"})
        if env.is_main:
            (out_dir / RESULT_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
        env.barrier()  # other ranks return only once rank 0 has published the student
        return result
    finally:
        env.close()


def _trainable(student, teacher_width: int, learned_projection: bool):
    """The module the optimizer (and DDP) sees: the student plus, when needed, a hidden-state projection.

    The projection maps a narrower student's hidden states to the teacher's width for the transfer
    loss only; it is checkpointed but never saved with the student.
    """
    import torch

    class Trainable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student
            width = student.config.hidden_size
            self.proj = torch.nn.Linear(width, teacher_width, bias=False) if learned_projection else None
            if self.proj is not None:
                with torch.no_grad():  # start as "copy the first channels": a sane, non-random map
                    n = min(width, teacher_width)
                    self.proj.weight.zero_()
                    self.proj.weight[:n, :n] += torch.eye(n)

        def forward(self, input_ids):
            return self.student(input_ids=input_ids, use_cache=False).logits

    return Trainable()


class _Capture:
    """Forward hooks that keep each decoder layer's output (and attention map) of the last call.

    Hooks on the decoder layers work the same for the plain module and its DDP wrapper.
    """

    def __init__(self, model, hidden: bool, attention: bool) -> None:
        self.hidden: list[Any] = []
        self.attn: list[Any] = []
        self.handles = []
        if hidden:
            for layer in model.model.layers:
                self.handles.append(layer.register_forward_hook(self._keep_hidden))
        if attention:
            for layer in model.model.layers:
                self.handles.append(layer.self_attn.register_forward_hook(self._keep_attn))

    def _keep_hidden(self, _module, _inputs, output) -> None:
        self.hidden.append(output[0] if isinstance(output, tuple) else output)

    def _keep_attn(self, _module, _inputs, output) -> None:
        self.attn.append(output[1])

    def clear(self) -> None:
        self.hidden, self.attn = [], []


class _Training:
    """The training loop's state, so checkpoints hold exactly what a resume needs."""

    def __init__(self, cfg: KDConfig, env: DistEnv, teacher, student, tokenizer, texts: Sequence[str],
                 resume_dir: Path, model_dirs: Sequence[Path], teacher_map: Sequence[int],
                 hidden_channels, keep_zeros: bool) -> None:
        import torch

        self.cfg, self.env = cfg, env
        self.windows = pack_windows(tokenizer, texts, cfg.seq_len)
        if len(self.windows) == 0:
            raise ConfigError("distill.seq_len", cfg.seq_len,
                              f"the {len(texts)} training texts hold fewer tokens than one window")
        self.device = env.device()
        self.cuda = self.device.startswith("cuda")
        # On a GPU the frozen teacher is held in bf16 (half the memory); autocast runs both in bf16.
        self.teacher = teacher.to(self.device, dtype=torch.bfloat16 if self.cuda else torch.float32).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_map = list(teacher_map)
        t_width, s_width = teacher.config.hidden_size, student.config.hidden_size
        use_hidden = cfg.hidden_weight > 0
        self.channels = None
        if use_hidden and s_width != t_width and hidden_channels is not None:
            self.channels = torch.as_tensor(hidden_channels, dtype=torch.long, device=self.device)
        learned = use_hidden and s_width != t_width and self.channels is None
        self.module = _trainable(student, t_width, learned).to(self.device).train()
        self.student = self.module.student
        if cfg.attention_weight > 0:  # fused kernels (sdpa, flash) do not return attention maps
            self.teacher.set_attn_implementation("eager")
            self.student.set_attn_implementation("eager")
        self.s_capture = _Capture(self.student, use_hidden, cfg.attention_weight > 0)
        self.t_capture = _Capture(self.teacher, use_hidden, cfg.attention_weight > 0)
        self.masks = _zero_masks(self.student) if keep_zeros else {}
        self.model = self.module
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.module, device_ids=[env.local_rank] if self.cuda else None)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.steps, cfg.warmup_ratio, cfg.lr_schedule))
        self.step = 0
        self.resumed_from = 0
        self.losses: list[list[float]] = []  # [loss, kl, ce, hidden, attention] per optimizer step
        self.train_seconds = 0.0
        self.path = Path(resume_dir) / CHECKPOINT
        self.fingerprint = self._fingerprint(model_dirs)

    def _fingerprint(self, model_dirs: Sequence[Path]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.cfg.model_dump(mode="json", exclude={"progress"}), sort_keys=True).encode())
        for d in model_dirs:
            h.update((Path(d) / "config.json").read_bytes())
        h.update(self.windows.numpy().tobytes())
        return h.hexdigest()[:16]

    def _micro_step(self, ids, sync: bool):
        """Forward + backward of one micro-batch shard; returns the unscaled loss terms."""
        import torch

        cfg = self.cfg
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
        no_sync = self.model.no_sync() if (self.env.distributed and not sync) else nullcontext()
        self.s_capture.clear()
        self.t_capture.clear()
        with no_sync:
            with autocast:
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=ids, use_cache=False).logits
                s_logits = self.model(ids)
                loss, kl, ce = kd_loss(s_logits, t_logits, ids, cfg.temperature, cfg.alpha_ce)
                hid = att = torch.zeros((), device=ids.device)
                if cfg.hidden_weight > 0:
                    t_states = [self.t_capture.hidden[j] for j in self.teacher_map]
                    s_states = self.s_capture.hidden
                    if self.channels is not None:
                        t_states = [t.index_select(-1, self.channels) for t in t_states]
                    elif self.module.proj is not None:
                        s_states = [self.module.proj(s) for s in s_states]
                    hid = hidden_state_loss(s_states, t_states, cfg.hidden_loss)
                    loss = loss + cfg.hidden_weight * hid
                if cfg.attention_weight > 0:
                    att = attention_loss(self.s_capture.attn, [self.t_capture.attn[j] for j in self.teacher_map])
                    loss = loss + cfg.attention_weight * att
            (loss / cfg.grad_accum).backward()
        return [loss.detach(), kl.detach(), ce.detach(), hid.detach(), att.detach()]

    def run(self) -> None:
        import torch
        import torch.distributed as dist
        from tqdm.auto import tqdm

        cfg, env = self.cfg, self.env
        self._maybe_resume()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0, disable=not (cfg.progress and env.is_main))
        t0 = time.time()
        while self.step < cfg.steps:
            self.optimizer.zero_grad(set_to_none=True)
            totals = torch.zeros(5, device=self.device)
            for micro in range(cfg.grad_accum):
                idx = batch_indices(self.step * cfg.grad_accum + micro, cfg.batch_size, len(self.windows), cfg.seed)
                ids = self.windows[idx[env.rank::env.world]].to(self.device)
                totals += torch.stack(self._micro_step(ids, sync=micro == cfg.grad_accum - 1)).float()
            totals /= cfg.grad_accum
            if env.distributed:  # report the global loss, not rank 0's shard
                dist.all_reduce(totals)
                totals /= env.world
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            if self.masks:
                _apply_masks(self.student, self.masks)
            self.step += 1
            values = [float(v) for v in totals.tolist()]
            self.losses.append(values)
            bar.update(1)
            bar.set_postfix(loss=f"{values[0]:.3f}", kl=f"{values[1]:.3f}", ce=f"{values[2]:.3f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.train_seconds += time.time() - t0
                if env.is_main:
                    _save_checkpoint(self)
                t0 = time.time()  # checkpoint writes are not part of a step's time
        bar.close()
        self.train_seconds += time.time() - t0
        for cap in (self.s_capture, self.t_capture):
            for h in cap.handles:
                h.remove()

    def state(self) -> dict[str, Any]:
        import torch

        return {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.cuda else None,
            "losses": self.losses,
            "train_seconds": self.train_seconds,
        }

    def _maybe_resume(self) -> None:
        import torch

        ckpt = resume_checkpoint(self.path, self.device, self.fingerprint, "distill resume_dir",
                                 "config, teacher, source or texts", self.module, self.optimizer, self.scheduler)
        if ckpt is None:
            return
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if ckpt["rng_cuda"] is not None and self.cuda:
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])
        self.step = self.resumed_from = int(ckpt["step"])
        self.losses = [list(x) + [0.0] * (5 - len(x)) for x in ckpt["losses"]]
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        log.info("distill: resuming from step %d of %d (%s)", self.step, self.cfg.steps, self.path)

    def summary(self) -> dict[str, Any]:
        losses = [x[0] for x in self.losses]
        every = max(1, math.ceil(len(losses) / 50))
        curve = [[i + 1, round(v, 4)] for i, v in enumerate(losses) if i % every == 0 or i == len(losses) - 1]
        last = self.losses[-1] if self.losses else [None] * 5
        return {
            "steps": self.step,
            "resumed_from_step": self.resumed_from,
            "first_loss": losses[0] if losses else None,
            "final_loss": last[0],
            "avg_loss": sum(losses) / len(losses) if losses else None,
            "final_kl": last[1],
            "final_ce": last[2],
            "first_hidden": self.losses[0][3] if self.losses and self.cfg.hidden_weight > 0 else None,
            "final_hidden": last[3] if self.cfg.hidden_weight > 0 else None,
            "final_attention": last[4] if self.cfg.attention_weight > 0 else None,
            "loss_curve": curve,
            "tokens_seen": self.step * self.cfg.grad_accum * self.cfg.batch_size * self.cfg.seq_len,
            "train_windows": len(self.windows),
            "seconds_per_step": round(self.train_seconds / self.step, 3) if self.step else None,
            "device": self.device,
            "dtype": "bfloat16-autocast" if self.cuda else "float32",
        }


def _zero_masks(model) -> dict[str, Any]:
    """``name -> bool mask of nonzero entries`` for the 2-D weights of the decoder layers' linear maps."""
    return {name: p.detach() != 0 for name, p in model.model.layers.named_parameters()
            if p.dim() == 2 and bool((p == 0).any())}


def _apply_masks(model, masks: dict[str, Any]) -> None:
    import torch

    params = dict(model.model.layers.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def _save_checkpoint(train: _Training) -> None:
    """Write the checkpoint to a temp name, flush it to disk, then rename over the previous one."""
    import torch

    train.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = train.path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(train.state(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, train.path)
    log.info("distill: checkpoint at step %d -> %s", train.step, train.path)


def _run(cfg: KDConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    # src is where the student starts (the teacher for a first distill step); the teacher is fixed.
    return distill(cfg, ctx.teacher_dir, ctx.texts("train"), out, resume_dir=ctx.resume_dir, src_dir=src)


TECHNIQUES = [Technique("distill", stage="distill", config=KDConfig, run=_run, kinds=("causal_lm",),
                        description="student cut from src (layers and/or width) trained with KD on "
                                    "temperature-softened logits, optional hidden-state/attention transfer")]


def _read_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tasks.distill`` / ``torchrun ... -m tasks.distill``: one distillation from the command line."""
    p = argparse.ArgumentParser(prog="python -m tasks.distill", description=main.__doc__)
    p.add_argument("--teacher", type=Path, required=True, help="teacher HF folder")
    p.add_argument("--src", type=Path, default=None, help="where the student starts (default: the teacher)")
    p.add_argument("--texts", type=Path, required=True, help="training texts: .jsonl of {text} or blank-line-separated")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume-dir", type=Path, required=True)
    p.add_argument("--config", default="{}", help="KDConfig fields as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = KDConfig.model_validate(json.loads(args.config))
    except ValueError as e:
        p.error(str(e))
    result = distill(cfg, args.teacher, _read_texts(args.texts), args.out, args.resume_dir, src_dir=args.src)
    if DistEnv().is_main:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
