"""Knowledge distillation of a shallower student from a Llama-style teacher.

The student is the teacher with fewer decoder layers, picked evenly (first and last always
kept) and initialised from those teacher layers; embeddings, final norm and head are copied.
It is trained on packed token windows with a KD loss (temperature-softened KL to the teacher,
plus a little next-token cross-entropy) and checkpoints to ``resume_dir``, so a killed run
resumes from its last checkpoint instead of starting over.

    cfg = DistillConfig(student_layers=10, steps=40)
    result = distill(cfg, teacher_dir, train_texts, out_dir, resume_dir)
    result["layer_map"], result["final_loss"]           # student layer i = teacher layer map[i]
"""

from __future__ import annotations

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
from typing import Any, Sequence

from tasks.technique import Technique
from tasks.config import DistillConfig
from tasks.errors import ConfigError
from tasks.modelio import available_cores, copy_tokenizer, count_parameters, require_causal_lm, torch_threads

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT_FILE = "trimflow_distill.json"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def select_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer indices kept in the student: evenly spaced, first and last always included.

    Args:
        teacher_layers: decoder layers in the teacher.
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


def lr_lambda(steps: int, warmup_ratio: float):
    """Multiplier of the peak LR at each step: linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, round(warmup_ratio * steps)) if steps > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def distill(cfg: DistillConfig, teacher_dir: Path, train_texts: list[str], out_dir: Path,
            resume_dir: Path) -> dict[str, Any]:
    """Distill a shallower student from ``teacher_dir`` and save it as a HF folder in ``out_dir``.

    Args:
        cfg: layers kept, steps, batch, LR schedule, loss weights, checkpoint interval, seed.
        teacher_dir: fp32 Hugging Face folder of a Llama-style causal LM with its tokenizer.
        train_texts: training documents; tokenized and packed into ``cfg.seq_len`` windows.
        out_dir: receives ``model.safetensors``, ``config.json`` (new ``num_hidden_layers``), the
            tokenizer files and ``trimflow_distill.json`` (this result).
        resume_dir: stable folder for ``checkpoint.pt``; a rerun with the same config, teacher and
            texts resumes from it. ``steps=0`` writes the layer-selected student without training.

    Returns:
        ``steps``, ``resumed_from_step``, ``first_loss``, ``final_loss``, ``avg_loss``, ``final_kl``,
        ``final_ce``, ``loss_curve`` (≤ 50 ``[step, loss]`` points), ``layer_map``, ``teacher_layers``,
        ``student_layers``, ``num_parameters``, ``teacher_parameters``, ``tokens_seen``,
        ``train_windows``, ``seconds``, ``seconds_per_step``, ``device``.

    Raises:
        UnsupportedModelError: the teacher is not a Llama-style causal LM.
        ConfigError: ``student_layers`` does not fit the teacher, the texts are too short for one
            window, or ``resume_dir`` holds a checkpoint of a different run.
    """
    teacher_dir, out_dir, resume_dir = Path(teacher_dir), Path(out_dir), Path(resume_dir)
    tconf = require_causal_lm(teacher_dir, "distill")
    layer_map = select_layers(int(tconf["num_hidden_layers"]), cfg.student_layers)
    if cfg.steps > 0 and not train_texts:
        raise ConfigError("train_texts", 0, "distillation with steps > 0 needs training texts")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    with torch_threads(available_cores()):
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        teacher_params = count_parameters(teacher)
        student = build_student(teacher, layer_map)
        train = _Training(cfg, teacher, student, tokenizer, train_texts, resume_dir, teacher_dir) if cfg.steps else None
        if train is not None:
            train.run()
        student = student.cpu().eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out_dir, safe_serialization=True)
        copy_tokenizer(teacher_dir, out_dir)
    seconds = time.time() - started
    result: dict[str, Any] = {
        "layer_map": layer_map,
        "teacher_layers": int(tconf["num_hidden_layers"]),
        "student_layers": len(layer_map),
        "num_parameters": count_parameters(student),
        "teacher_parameters": teacher_params,
        "seconds": round(seconds, 2),
    }
    result.update(train.summary() if train is not None else {
        "steps": 0, "resumed_from_step": 0, "first_loss": None, "final_loss": None, "avg_loss": None,
        "final_kl": None, "final_ce": None, "loss_curve": [], "tokens_seen": 0, "train_windows": 0,
        "seconds_per_step": None, "device": "cpu"})
    (out_dir / RESULT_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
    return result


class _Training:
    """The training loop's state, so checkpoints hold exactly what a resume needs."""

    def __init__(self, cfg: DistillConfig, teacher, student, tokenizer, texts: Sequence[str], resume_dir: Path,
                 teacher_dir: Path) -> None:
        import torch

        self.cfg = cfg
        self.windows = pack_windows(tokenizer, texts, cfg.seq_len)
        if len(self.windows) == 0:
            raise ConfigError("distill.seq_len", cfg.seq_len,
                              f"the {len(texts)} training texts hold fewer tokens than one window")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.steps, cfg.warmup_ratio))
        self.step = 0
        self.resumed_from = 0
        self.losses: list[list[float]] = []  # [loss, kl, ce] per step
        self.train_seconds = 0.0
        self.path = Path(resume_dir) / CHECKPOINT
        self.fingerprint = self._fingerprint(teacher_dir)

    def _fingerprint(self, teacher_dir: Path) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True).encode())
        h.update((Path(teacher_dir) / "config.json").read_bytes())
        h.update(self.windows.numpy().tobytes())
        return h.hexdigest()[:16]

    def run(self) -> None:
        import torch
        from tqdm.auto import tqdm

        self._maybe_resume()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda" else nullcontext()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="distill", unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        t0 = time.time()
        while self.step < self.cfg.steps:
            idx = batch_indices(self.step, self.cfg.batch_size, len(self.windows), self.cfg.seed)
            ids = self.windows[idx].to(self.device)
            with autocast:
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=ids, use_cache=False).logits
                s_logits = self.student(input_ids=ids, use_cache=False).logits
                loss, kl, ce = kd_loss(s_logits, t_logits, ids, self.cfg.temperature, self.cfg.alpha_ce)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            values = [loss.item(), kl.item(), ce.item()]
            self.losses.append(values)
            bar.update(1)
            bar.set_postfix(loss=f"{values[0]:.3f}", kl=f"{values[1]:.3f}", ce=f"{values[2]:.3f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.train_seconds += time.time() - t0
                _save_checkpoint(self)
                t0 = time.time()  # checkpoint writes are not part of a step's time
        bar.close()
        self.train_seconds += time.time() - t0

    def state(self) -> dict[str, Any]:
        import torch

        return {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device == "cuda" else None,
            "losses": self.losses,
            "train_seconds": self.train_seconds,
        }

    def _maybe_resume(self) -> None:
        import torch

        if not self.path.is_file():
            return
        ckpt = torch.load(self.path, map_location=self.device, weights_only=False)
        if ckpt.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                "distill resume_dir", str(self.path),
                f"holds a checkpoint of a different run (fingerprint {ckpt.get('fingerprint')}, this run "
                f"{self.fingerprint}: config, teacher or texts changed); delete it to start over")
        self.student.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] is not None and self.device == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        self.step = self.resumed_from = int(ckpt["step"])
        self.losses = [list(x) for x in ckpt["losses"]]
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        log.info("distill: resuming from step %d of %d (%s)", self.step, self.cfg.steps, self.path)

    def summary(self) -> dict[str, Any]:
        losses = [x[0] for x in self.losses]
        every = max(1, math.ceil(len(losses) / 50))
        curve = [[i + 1, round(v, 4)] for i, v in enumerate(losses) if i % every == 0 or i == len(losses) - 1]
        return {
            "steps": self.step,
            "resumed_from_step": self.resumed_from,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "avg_loss": sum(losses) / len(losses) if losses else None,
            "final_kl": self.losses[-1][1] if losses else None,
            "final_ce": self.losses[-1][2] if losses else None,
            "loss_curve": curve,
            "tokens_seen": self.step * self.cfg.batch_size * self.cfg.seq_len,
            "train_windows": len(self.windows),
            "seconds_per_step": round(self.train_seconds / self.step, 3) if self.step else None,
            "device": self.device,
        }


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


def _run(cfg: DistillConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    # The first distill step of a recipe starts from the teacher itself, so src is the teacher.
    return distill(cfg, src, ctx.texts("train"), out, resume_dir=ctx.resume_dir)


TECHNIQUES = [Technique("distill", stage="distill", config=DistillConfig, run=_run, kinds=("causal_lm",),
                        description="layer-selected student trained with KD on temperature-softened logits")]
