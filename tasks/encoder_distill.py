"""Distil a shallower sentence encoder from a BERT teacher by matching its embeddings.

The student keeps ``student_layers`` of the teacher's layers (evenly spaced, first and last
always kept, or an explicit ``layer_map``) and starts from their weights; the embedding table is
copied. It is trained on news paragraphs to reproduce the teacher's pooled, normalised
embeddings: ``cosine_weight · (1 − cos(s, t))`` plus ``similarity_weight · MSE`` between the
in-batch cosine-similarity matrices of student and teacher (what a similarity benchmark scores)
plus, optionally, ``hidden_weight · MSE`` between each student layer's states and those of the
teacher layer it came from. Batches pair paragraphs from the same article with unrelated ones,
so the similarity term sees both high and low similarities. Checkpoints go to ``resume_dir``; a
killed run resumes from its last one.

    result = distill_encoder(EncoderDistillConfig(student_layers=3, steps=200), teacher_dir,
                             train_texts, out_dir, resume_dir)
    result["layer_map"], result["final_loss"], result["num_parameters"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field, field_validator

from tasks.config import _Frozen
from tasks.encoder_common import encoder_tokenizer, require_encoder
from tasks.errors import ConfigError
from tasks.technique import Technique

log = logging.getLogger(__name__)

CHECKPOINT = "encoder_checkpoint.pt"
RESULT_FILE = "trimflow_encoder_distill.json"
# Files a sentence-transformers folder carries beside the weights; export reads max_seq_length and pooling.
SIDECARS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
            "sentence_bert_config.json", "config_sentence_transformers.json")
_LAYER_KEY = re.compile(r"^(?:bert\.)?encoder\.layer\.(\d+)\.(.+)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


class EncoderDistillConfig(_Frozen):
    """Embedding distillation of a shallower BERT student.

    The defaults are the quick CPU recipe for all-MiniLM-L6-v2 (6 layers) on 2 cores; see
    ``tasks/recipes/encoder-*.yaml`` for the measured effect.

    Args:
        student_layers: teacher layers kept, evenly spaced with first and last kept (default 3).
        layer_map: explicit teacher layer indices, in order; overrides ``student_layers`` (default None).
        steps: optimizer steps; 0 writes the layer-selected student untrained (default 150).
        batch_size: paragraphs per step (default 32).
        max_length: tokens per paragraph after truncation (default 128).
        min_chars / max_chars: paragraph length bounds; paragraphs are runs of whole sentences of a
            training document (defaults 80 / 700, about 20–170 tokens, like the Lee documents).
        lr: peak AdamW learning rate, linear warmup then cosine decay to 10% (default 1e-4).
        warmup_ratio: share of ``steps`` spent warming up (default 0.1).
        weight_decay: AdamW weight decay (default 0.01).
        max_grad_norm: gradient clipping threshold (default 1.0).
        cosine_weight: weight of ``1 − cos(student, teacher)`` per item (default 1.0).
        similarity_weight: weight of the MSE between in-batch cosine matrices (default 1.0).
        hidden_weight: weight of the per-layer hidden-state MSE (default 0.0: off).
        dropout: dropout in the student while training (default 0.0: a short run converges faster
            without it; the teacher's own value was 0.1).
        checkpoint_every: steps between resumable checkpoints (default 50).
        seed: RNG seed of batch sampling (default 0).
        threads: torch threads (default None: every core this process may use). On a machine whose
            cores are oversubscribed, or for a tiny model, 1 can be many times faster: OpenMP threads
            wait on each other at every op. Not part of the resume fingerprint.
    """

    student_layers: int = Field(3, ge=1)
    layer_map: tuple[int, ...] | None = None
    steps: int = Field(150, ge=0)
    batch_size: int = Field(32, ge=2)
    max_length: int = Field(128, ge=8)
    min_chars: int = Field(80, ge=1)
    max_chars: int = Field(700, ge=20)
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    cosine_weight: float = Field(1.0, ge=0)
    similarity_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    threads: int | None = Field(None, ge=1)

    @field_validator("layer_map")
    @classmethod
    def _increasing(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or any(b <= a for a, b in zip(v, v[1:])) or v[0] < 0):
            raise ValueError("layer_map must be non-empty, non-negative and strictly increasing")
        return v


def select_layers(teacher_layers: int, cfg: EncoderDistillConfig) -> list[int]:
    """Teacher layer indices kept in the student (``layer_map``, else evenly spaced incl. first and last).

    Raises:
        ConfigError: more layers than the teacher has, or a ``layer_map`` index out of range.
    """
    if cfg.layer_map is not None:
        if cfg.layer_map[-1] >= teacher_layers:
            raise ConfigError("encoder_distill.layer_map", list(cfg.layer_map),
                              f"the teacher has layers 0..{teacher_layers - 1}")
        return list(cfg.layer_map)
    n, k = teacher_layers, cfg.student_layers
    if k > n:
        raise ConfigError("encoder_distill.student_layers", k, f"the teacher has only {n} layers")
    if k == 1:
        return [0]
    # Spacing (n-1)/(k-1) ≥ 1, so flooring half-way values never picks a layer twice.
    return [int(math.floor(i * (n - 1) / (k - 1) + 0.5)) for i in range(k)]


def paragraphs(texts: Sequence[str], min_chars: int, max_chars: int) -> tuple[list[str], list[int]]:
    """Cut documents into paragraphs of whole sentences between ``min_chars`` and ``max_chars``.

    Returns:
        The paragraphs and, for each, the index of the document it came from.
    """
    out, doc_of = [], []
    for d, text in enumerate(texts):
        if not text:
            continue
        current = ""
        for sentence in _SENTENCE_END.split(text.strip()):
            sentence = sentence.strip()
            if len(current) + 1 + len(sentence) > max_chars and len(current) >= min_chars:
                out.append(current)
                doc_of.append(d)
                current = ""
            current = f"{current} {sentence}".strip()
        if min_chars <= len(current) <= max_chars:
            out.append(current)
            doc_of.append(d)
    return out, doc_of


def batch_indices(step: int, batch_size: int, doc_of: Sequence[int], seed: int) -> list[int]:
    """Paragraph indices of batch ``step``: half the batch is pairs of paragraphs from one article,
    the rest random paragraphs. A pure function of ``(seed, step)``, so a resumed run sees exactly
    the batches it would have seen."""
    rng = np.random.default_rng([seed, step])
    by_doc: dict[int, list[int]] = {}
    for i, d in enumerate(doc_of):
        by_doc.setdefault(d, []).append(i)
    multi = [v for v in by_doc.values() if len(v) >= 2]
    chosen: list[int] = []
    pairs = batch_size // 4 if multi else 0
    for j in rng.choice(len(multi), size=min(pairs, len(multi)), replace=False) if pairs else []:
        chosen += [int(x) for x in rng.choice(multi[j], size=2, replace=False)]
    taken = set(chosen)
    while len(chosen) < batch_size:
        i = int(rng.integers(len(doc_of)))
        if i not in taken or len(taken) >= len(doc_of):
            chosen.append(i)
            taken.add(i)
    return chosen


def build_student(teacher, layer_map: Sequence[int], dropout: float):
    """A BERT with only the teacher layers in ``layer_map`` (renumbered), initialised from them."""
    import copy

    import torch
    from transformers import AutoModel

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layer_map)
    cfg.hidden_dropout_prob = dropout
    cfg.attention_probs_dropout_prob = dropout
    new_index = {t: s for s, t in enumerate(layer_map)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.detach().clone()
        elif int(m.group(1)) in new_index:
            state[f"encoder.layer.{new_index[int(m.group(1))]}.{m.group(2)}"] = value.detach().clone()
    student = AutoModel.from_config(cfg, dtype=torch.float32)
    student.load_state_dict(state, strict=True)
    return student


def distill_loss(s_emb, t_emb, cfg: EncoderDistillConfig, s_hidden=None, t_hidden=None, mask=None):
    """The objective of the module docstring. Returns ``(loss, parts)`` with float ``parts`` for logging."""
    import torch.nn.functional as F

    cos = (s_emb * t_emb).sum(-1)
    cos_term = (1 - cos).mean()
    sim_term = F.mse_loss(s_emb @ s_emb.T, t_emb @ t_emb.T)
    loss = cfg.cosine_weight * cos_term + cfg.similarity_weight * sim_term
    parts = {"cos": float(cos.mean().detach()), "sim_mse": float(sim_term.detach())}
    if cfg.hidden_weight > 0 and s_hidden is not None:
        m = mask.unsqueeze(-1).to(s_hidden[0].dtype)
        hid = sum(((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]) for s, t in zip(s_hidden, t_hidden))
        hid = hid / len(s_hidden)
        loss = loss + cfg.hidden_weight * hid
        parts["hidden_mse"] = float(hid.detach())
    return loss, parts


def distill_encoder(cfg: EncoderDistillConfig, teacher_dir: Path, train_texts: Sequence[str], out_dir: Path,
                    resume_dir: Path, student_dir: Path | None = None) -> dict[str, Any]:
    """Distil a student from ``teacher_dir`` on ``train_texts`` and save it as a HF folder in ``out_dir``.

    Args:
        cfg: student shape, schedule, loss weights, checkpointing.
        teacher_dir: fp32 BERT sentence encoder (HF folder with ``tokenizer.json``).
        train_texts: training documents, cut into paragraphs.
        out_dir: receives the student (``model.safetensors``, ``config.json``, tokenizer and
            sentence-transformers files) and ``trimflow_encoder_distill.json`` (config + result).
        resume_dir: stable folder for ``encoder_checkpoint.pt``.
        student_dir: where the student's layers come from (default None: the teacher); a recipe
            passes its current model so distillation can follow another PyTorch step.

    Returns:
        ``layer_map``, ``teacher_layers``, ``student_layers``, ``num_parameters``,
        ``teacher_parameters``, ``steps``, ``resumed_from_step``, ``first_loss``, ``final_loss``,
        ``final_cos`` (mean student/teacher cosine over the last 10 steps), ``loss_curve``,
        ``train_paragraphs``, ``seconds``, ``seconds_per_step``, ``device``.

    Raises:
        UnsupportedModelError: the teacher is not a BERT encoder with mean pooling.
        ConfigError: the layer choice does not fit, no training paragraph survives the length
            bounds while ``steps > 0``, or ``resume_dir`` holds another run's checkpoint.
    """
    teacher_dir, out_dir, resume_dir = Path(teacher_dir), Path(out_dir), Path(resume_dir)
    tconf = require_encoder(teacher_dir, "encoder distillation")
    source_dir = Path(student_dir) if student_dir is not None else teacher_dir
    sconf = require_encoder(source_dir, "encoder distillation") if source_dir != teacher_dir else tconf
    layer_map = select_layers(int(sconf["num_hidden_layers"]), cfg)
    paras, doc_of = paragraphs(train_texts, cfg.min_chars, cfg.max_chars) if cfg.steps else ([], [])
    if cfg.steps > 0 and len(paras) < cfg.batch_size:
        raise ConfigError("encoder_distill.train_texts", len(train_texts),
                          f"{len(paras)} paragraphs of {cfg.min_chars}-{cfg.max_chars} characters, fewer than "
                          f"one batch of {cfg.batch_size}")

    import torch
    from transformers import AutoModel

    from tasks.modelio import available_cores, count_parameters, torch_threads

    started = time.time()
    with torch_threads(cfg.threads or available_cores()):
        teacher = AutoModel.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        source = teacher if source_dir == teacher_dir else AutoModel.from_pretrained(source_dir, dtype=torch.float32)
        student = build_student(source, layer_map, cfg.dropout)
        train = None
        if cfg.steps:
            train = _Training(cfg, teacher, student, encoder_tokenizer(teacher_dir, cfg.max_length), paras, doc_of,
                              resume_dir, teacher_dir, layer_map)
            train.run()
        student = student.cpu().eval()
        # Serve with the teacher's dropout setting: it only matters if someone fine-tunes further.
        student.config.hidden_dropout_prob = tconf.get("hidden_dropout_prob", 0.1)
        student.config.attention_probs_dropout_prob = tconf.get("attention_probs_dropout_prob", 0.1)
        out_dir.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out_dir, safe_serialization=True)
        _copy_sidecars(source_dir, out_dir)
    result: dict[str, Any] = {
        "layer_map": layer_map,
        "teacher_layers": int(tconf["num_hidden_layers"]),
        "student_layers": len(layer_map),
        "num_parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
        "train_paragraphs": len(paras),
    }
    result.update(train.summary() if train is not None else {
        "steps": 0, "resumed_from_step": 0, "first_loss": None, "final_loss": None, "final_cos": None,
        "loss_curve": [], "seconds_per_step": None, "device": "cpu"})
    result["seconds"] = round(time.time() - started, 2)
    (out_dir / RESULT_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
    return result


def _copy_sidecars(src: Path, dst: Path) -> None:
    for name in SIDECARS:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", dst / "1_Pooling", dirs_exist_ok=True)


class _Training:
    """The training loop's state, so a checkpoint holds exactly what a resume needs."""

    def __init__(self, cfg: EncoderDistillConfig, teacher, student, tokenizer, paras: list[str], doc_of: list[int],
                 resume_dir: Path, teacher_dir: Path, layer_map: list[int]) -> None:
        import torch

        self.cfg, self.tokenizer, self.paras, self.doc_of = cfg, tokenizer, paras, doc_of
        self.layer_map = layer_map
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.steps, cfg.warmup_ratio))
        self.step = self.resumed_from = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.path = Path(resume_dir) / CHECKPOINT
        h = hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude={"threads"}), sort_keys=True).encode())
        h.update((Path(teacher_dir) / "config.json").read_bytes())
        h.update(json.dumps(layer_map).encode())
        h.update("\x00".join(paras).encode())
        self.fingerprint = h.hexdigest()[:16]

    def run(self) -> None:
        import torch
        from tqdm.auto import tqdm

        from tasks.encoder_common import batch_arrays, mean_pool

        self._maybe_resume()
        want_hidden = self.cfg.hidden_weight > 0
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="encoder distill", unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        t0 = time.time()
        while self.step < self.cfg.steps:
            idx = batch_indices(self.step, self.cfg.batch_size, self.doc_of, self.cfg.seed)
            feed = {k: torch.from_numpy(v).to(self.device)
                    for k, v in batch_arrays(self.tokenizer, [self.paras[i] for i in idx]).items()}
            with torch.no_grad():
                t_out = self.teacher(**feed, output_hidden_states=want_hidden)
                t_emb = mean_pool(t_out.last_hidden_state, feed["attention_mask"])
            s_out = self.student(**feed, output_hidden_states=want_hidden)
            s_emb = mean_pool(s_out.last_hidden_state, feed["attention_mask"])
            s_hidden = t_hidden = None
            if want_hidden:  # student layer i is teacher layer layer_map[i]; index 0 is the embeddings
                s_hidden = s_out.hidden_states[1:]
                t_hidden = [t_out.hidden_states[j + 1] for j in self.layer_map]
            loss, parts = distill_loss(s_emb, t_emb, self.cfg, s_hidden, t_hidden, feed["attention_mask"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.history.append({"loss": float(loss.item()), **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", cos=f"{parts['cos']:.4f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.train_seconds += time.time() - t0
                self._save()
                t0 = time.time()  # checkpoint writes are not part of a step's time
        bar.close()
        self.train_seconds += time.time() - t0

    def _save(self) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
        state = {"fingerprint": self.fingerprint, "step": self.step, "model": self.student.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "history": self.history, "train_seconds": self.train_seconds}
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        log.info("encoder distill: checkpoint at step %d -> %s", self.step, self.path)

    def _maybe_resume(self) -> None:
        from tasks.distill import resume_checkpoint

        ckpt = resume_checkpoint(self.path, self.device, self.fingerprint, "encoder_distill resume_dir",
                                 "config, teacher, layers or texts", self.student, self.optimizer, self.scheduler)
        if ckpt is None:
            return
        self.step = self.resumed_from = int(ckpt["step"])
        self.history = list(ckpt["history"])
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        log.info("encoder distill: resuming from step %d of %d (%s)", self.step, self.cfg.steps, self.path)

    def summary(self) -> dict[str, Any]:
        losses = [h["loss"] for h in self.history]
        every = max(1, math.ceil(len(losses) / 50))
        curve = [[i + 1, round(v, 5)] for i, v in enumerate(losses) if i % every == 0 or i == len(losses) - 1]
        trained = self.step - self.resumed_from
        return {
            "steps": self.step,
            "resumed_from_step": self.resumed_from,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "final_cos": round(float(np.mean([h["cos"] for h in self.history[-10:]])), 5) if self.history else None,
            "loss_curve": curve,
            "seconds_per_step": round(self.train_seconds / max(1, trained), 3) if trained else None,
            "device": self.device,
        }


def _lr_lambda(steps: int, warmup_ratio: float):
    """Multiplier of the peak LR: linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, round(warmup_ratio * steps)) if steps > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _run(cfg: EncoderDistillConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    return distill_encoder(cfg, ctx.teacher_dir, ctx.texts("train"), out, ctx.resume_dir, student_dir=src)


TECHNIQUES = [Technique("encoder_distill", stage="distill", config=EncoderDistillConfig, run=_run, kinds=("encoder",),
                        consumes="hf", produces="hf",
                        description="layer-selected BERT student trained to match the teacher's pooled embeddings")]
