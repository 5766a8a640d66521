"""Quality and cost of a sentence encoder, measured by one piece of code for teacher and candidate.

Quality is the Spearman rank correlation between the cosine similarities of document embeddings
and human similarity ratings on the Lee corpus (Lee, Pincombe & Welsh 2005), read from the test
data of the ``gensim`` wheel (never imported). Cost is weights on disk, batch-1 latency and
batch-16 throughput on the same real text, with the same thread count for every runtime.

    teacher = measure_encoder(TorchEncoderRunner(hf_dir), EncoderEvalConfig())
    student = measure_encoder(OrtEncoderRunner(onnx_dir), EncoderEvalConfig())
    student["quality"] / teacher["quality"], student["throughput_b16"] / teacher["throughput_b16"]
    both = measure_encoders({"teacher": t_runner, "student": s_runner})   # timings interleaved

The Lee files (``gensim/test/test_data``):

* ``lee.cor``: 50 short news documents (Australian Broadcasting Corporation, 51–126 words), one per
  line, Latin-1 encoded (a ``£`` sign), ``\\n`` separated, no newline after the last one.
* ``similarities0-1.txt``: a 50×50 tab-separated matrix. Row ``i`` column ``j > i`` holds the mean of
  the 1–5 human relatedness ratings of documents ``i`` and ``j`` divided by 5 (so 0.2 … 1.0;
  means over 9–11 raters give values such as 0.2222 = 1.111/5); the diagonal is 1 and the lower
  triangle 0. The 1,225 upper-triangle pairs are the benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from pydantic import Field

from tasks.config import _Frozen
from tasks.encoder_common import (EARLY_EXIT_FORMAT, INPUT_NAMES, batch_arrays, encoder_tokenizer, onnx_files,
                                  read_meta, require_encoder)
from tasks.errors import ConfigError, SourceError

LEE_DIR = "gensim/test/test_data"
LEE_DOCS = "lee.cor"
LEE_RATINGS = "similarities0-1.txt"


@dataclass(frozen=True)
class LeeCorpus:
    """The Lee benchmark: documents and the human similarity of every unordered pair.

    Attributes:
        documents: the texts, in file order.
        ratings: [N, N] symmetric human similarities in [0, 1] (diagonal 1).
    """

    documents: tuple[str, ...]
    ratings: np.ndarray

    def pairs(self) -> np.ndarray:
        """Human similarities of the ``i < j`` pairs, row-major (1,225 for 50 documents)."""
        return self.ratings[np.triu_indices(len(self.documents), 1)]


def read_lee(docs_path: Path, ratings_path: Path) -> LeeCorpus:
    """Parse the Lee corpus files (format in the module docstring) and check them.

    Raises:
        SourceError: a file is missing, the matrix is not square with one row per document, the
            diagonal is not 1, the lower triangle is not 0, or a rating is outside [0, 1].
    """
    docs_path, ratings_path = Path(docs_path), Path(ratings_path)
    for p in (docs_path, ratings_path):
        if not p.is_file():
            raise SourceError(f"Lee corpus file {p} is missing")
    # Latin-1 maps every byte, so a wrongly encoded file shows up as odd text, never as a crash.
    docs = tuple(line.strip() for line in docs_path.read_text(encoding="latin-1").split("\n") if line.strip())
    try:
        rows = [[float(v) for v in line.split("\t")] for line in ratings_path.read_text().splitlines() if line.strip()]
        m = np.asarray(rows, np.float64)
    except ValueError as e:
        raise SourceError(f"{ratings_path}: not a tab-separated numeric matrix ({e})") from None
    n = len(docs)
    problems = []
    if m.ndim != 2 or m.shape != (n, n):
        raise SourceError(f"{ratings_path}: matrix shape {m.shape} does not match {n} documents in {docs_path}")
    if not np.allclose(np.diag(m), 1.0):
        problems.append("diagonal is not 1")
    if np.any(np.tril(m, -1) != 0):
        problems.append("lower triangle is not 0 (expected an upper-triangular matrix)")
    upper = m[np.triu_indices(n, 1)]
    if upper.size == 0 or upper.min() < 0 or upper.max() > 1:
        problems.append("ratings outside [0, 1]")
    if problems:
        raise SourceError(f"{ratings_path}: {'; '.join(problems)}")
    full = np.triu(m) + np.triu(m, 1).T
    return LeeCorpus(documents=docs, ratings=full)


def lee_corpus() -> LeeCorpus:
    """The Lee benchmark from the installed ``gensim`` wheel's test data."""
    from tasks.ingest import package_path

    folder = package_path(LEE_DIR)
    return read_lee(folder / LEE_DOCS, folder / LEE_RATINGS)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson of average ranks; ties handled)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ConfigError("spearman", (a.shape, b.shape), "needs two equally long sequences of at least 2 values")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def lee_spearman(embeddings: np.ndarray, corpus: LeeCorpus) -> float:
    """Spearman between the pairwise cosine similarities of ``embeddings`` and the human ratings."""
    e = np.asarray(embeddings, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sims = (e @ e.T)[np.triu_indices(len(e), 1)]
    return spearman(sims, corpus.pairs())


@runtime_checkable
class EncoderRunner(Protocol):
    """What ``measure_encoder`` needs from a runtime: tokenized batches in, embeddings out."""

    name: str
    tokenizer: Any

    def use_threads(self, threads: int) -> None:
        """Run later calls with ``threads`` intra-op threads."""

    def embed_arrays(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """L2-normalised float32 embeddings [B, H] of int64 ``input_ids``/``attention_mask``/``token_type_ids``."""

    def size_bytes(self) -> int:
        """Bytes of the weights on disk."""


class TorchEncoderRunner:
    """PyTorch fp32 on a Hugging Face BERT folder, pooled exactly like the export.

    Runs ``BertModel`` with its default attention (SDPA), i.e. the teacher as PyTorch serves it.

    Args:
        hf_dir: Hugging Face folder of a BERT encoder with ``tokenizer.json``.
        threads: torch intra-op threads (default 2; ``measure_encoder`` sets ``EncoderEvalConfig.threads``).
    """

    def __init__(self, hf_dir: Path, threads: int = 2) -> None:
        import torch
        from transformers import AutoModel

        from tasks.modelio import torch_threads

        self.hf_dir = Path(hf_dir)
        require_encoder(self.hf_dir, "encoder evaluation")
        self.tokenizer = encoder_tokenizer(self.hf_dir)
        self.threads = threads
        with torch_threads(threads):
            self.model = AutoModel.from_pretrained(self.hf_dir, dtype=torch.float32).eval()
        self.name = "torch-fp32"

    def use_threads(self, threads: int) -> None:
        self.threads = threads

    def embed_arrays(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        from tasks.encoder_common import mean_pool
        from tasks.modelio import torch_threads

        with torch_threads(self.threads), torch.inference_mode():
            t = {k: torch.from_numpy(feed[k]) for k in INPUT_NAMES}
            h = self.model(**t).last_hidden_state
            return mean_pool(h, t["attention_mask"]).numpy()

    def size_bytes(self) -> int:
        from tasks.modelio import weights_size_bytes

        return weights_size_bytes(self.hf_dir)

    def num_parameters(self) -> int:
        from tasks.modelio import count_parameters

        return count_parameters(self.model)


class OrtEncoderRunner:
    """onnxruntime on a trimflow encoder export (single graph or early exit), through ``load_encoder``.

    Args:
        folder: export folder with ``trimflow_encoder.json``.
        threads: onnxruntime intra-op threads (default 2; ``measure_encoder`` sets ``EncoderEvalConfig.threads``).
        threshold: early-exit threshold override (default None: the calibrated one; ignored otherwise).
    """

    def __init__(self, folder: Path, threads: int = 2, threshold: float | None = None) -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self._threshold = threshold
        self.threads = threads
        self.enc = self._load(threads)
        self.tokenizer = self.enc.tokenizer
        files = onnx_files(self.folder, self.meta)
        self.name = f"onnxruntime:{files[0] if len(files) == 1 else 'early-exit'}"

    def _load(self, threads: int):
        from tasks.encoder_runtime import OnnxEarlyExitEncoder, load_encoder

        if self.meta["format"] == EARLY_EXIT_FORMAT and self._threshold is not None:
            return OnnxEarlyExitEncoder(self.folder, threads=threads, threshold=self._threshold)
        return load_encoder(self.folder, threads=threads)

    def use_threads(self, threads: int) -> None:
        if threads != self.threads:  # an onnxruntime session's thread pool is fixed at creation
            self.enc = self._load(threads)
            self.threads = threads

    def embed_arrays(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.enc.embed_arrays(feed)

    @property
    def last_layers_used(self) -> np.ndarray | None:
        return getattr(self.enc, "last_layers_used", None)

    def size_bytes(self) -> int:
        total = 0
        for name in onnx_files(self.folder, self.meta):
            path = self.folder / name
            total += path.stat().st_size
            total += sum(p.stat().st_size for p in self.folder.glob(name + ".data") if p.is_file())
        return total


class EncoderEvalConfig(_Frozen):
    """How encoder quality and cost are measured (the same for teacher and candidate).

    Args:
        threads: intra-op threads for every runtime, so they compare fairly (default 2).
        batch_size: items per batch for the throughput figure (default 16).
        latency_items: documents timed one at a time for the batch-1 latency (default 20).
        repeats: timed passes over the throughput batches, after one warm-up pass; the median pass
            is reported, which is robust to a noisy neighbour on a shared machine (default 3).
    """

    threads: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    latency_items: int = Field(20, ge=1)
    repeats: int = Field(3, ge=1)


def embed_texts(runner: EncoderRunner, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Embeddings [N, H] of ``texts`` through ``runner``, ``batch_size`` at a time (default 16)."""
    parts = [runner.embed_arrays(batch_arrays(runner.tokenizer, list(texts[i:i + batch_size])))
             for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts)


def measure_encoder(runner: EncoderRunner, cfg: EncoderEvalConfig = EncoderEvalConfig(),
                    corpus: LeeCorpus | None = None, timing_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Quality on Lee and the cost of ``runner``, measured identically for any runtime.

    Args:
        runner: a ``TorchEncoderRunner``, ``OrtEncoderRunner`` or anything meeting ``EncoderRunner``.
        cfg: threads, batch size, latency items, repeats.
        corpus: the quality benchmark (default None: ``lee_corpus()``).
        timing_texts: real text for latency and throughput (default None: the benchmark's
            documents, news paragraphs of 50–160 tokens). Throughput uses whole batches only.

    Returns:
        ``runtime``, ``threads``, ``quality`` (Spearman on Lee), ``size_bytes``, ``latency_ms_p50_b1``,
        ``latency_ms_p95_b1``, ``throughput_b16`` (items/s at ``cfg.batch_size``), ``batch_size``,
        ``timed_items``, ``tokens_mean``, ``avg_layers`` (early-exit runtimes only, else None), ``seconds``.

    Raises:
        ConfigError: fewer timing texts than one batch.
    """
    return measure_encoders({"runner": runner}, cfg, corpus, timing_texts)["runner"]


def measure_encoders(runners: dict[str, EncoderRunner], cfg: EncoderEvalConfig = EncoderEvalConfig(),
                     corpus: LeeCorpus | None = None, timing_texts: Sequence[str] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """``measure_encoder`` for several runtimes at once, with their timings interleaved.

    Every latency item and every throughput pass runs each runner in turn (the order rotating),
    so load that comes and goes on a shared machine hits all of them alike and the ratios between
    them stay meaningful even when the absolute numbers drift.

    Returns:
        One ``measure_encoder`` result per key of ``runners``; ``seconds`` is the whole measurement's.
    """
    started = time.time()
    corpus = corpus or lee_corpus()
    texts = list(timing_texts if timing_texts is not None else corpus.documents)
    n_batches = len(texts) // cfg.batch_size
    if n_batches == 0:
        raise ConfigError("timing_texts", len(texts), f"fewer than one batch of {cfg.batch_size}")
    names = list(runners)
    quality, layers, singles, batches = {}, {}, {}, {}
    for name in names:
        r = runners[name]
        r.use_threads(cfg.threads)
        quality[name] = lee_spearman(embed_texts(r, corpus.documents, cfg.batch_size), corpus)
        layers[name] = _layers_used(r, corpus.documents, cfg.batch_size)
        singles[name] = [batch_arrays(r.tokenizer, [t]) for t in texts[: cfg.latency_items]]
        batches[name] = [batch_arrays(r.tokenizer, texts[i * cfg.batch_size:(i + 1) * cfg.batch_size])
                         for i in range(n_batches)]
        r.embed_arrays(singles[name][0])  # warm-up: first-call allocations and lazy init
        for feed in batches[name]:  # and every batch shape once
            r.embed_arrays(feed)

    def rotated(k: int) -> list[str]:
        k %= len(names)
        return names[k:] + names[:k]

    latency: dict[str, list[float]] = {n: [] for n in names}
    for i in range(len(singles[names[0]])):
        for name in rotated(i):
            t0 = time.perf_counter()
            runners[name].embed_arrays(singles[name][i])
            latency[name].append(time.perf_counter() - t0)
    passes: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(cfg.repeats):
        for name in rotated(rep):
            t0 = time.perf_counter()
            for feed in batches[name]:
                runners[name].embed_arrays(feed)
            passes[name].append(n_batches * cfg.batch_size / (time.perf_counter() - t0))
    seconds = round(time.time() - started, 2)
    return {name: {
        "runtime": getattr(runners[name], "name", type(runners[name]).__name__),
        "threads": cfg.threads,
        "quality": round(quality[name], 4),
        "size_bytes": int(runners[name].size_bytes()),
        "latency_ms_p50_b1": round(float(np.percentile(latency[name], 50)) * 1000, 3),
        "latency_ms_p95_b1": round(float(np.percentile(latency[name], 95)) * 1000, 3),
        "throughput_b16": round(float(np.median(passes[name])), 2),
        "batch_size": cfg.batch_size,
        "timed_items": n_batches * cfg.batch_size,
        "tokens_mean": round(float(np.mean([int(f["attention_mask"].sum()) for f in singles[name]])), 1),
        "avg_layers": layers[name],
        "seconds": seconds,
    } for name in names}


def _layers_used(runner: Any, texts: Sequence[str], batch_size: int) -> float | None:
    """Mean layers per item of an early-exit runtime over ``texts`` (None for a fixed-depth runtime)."""
    if getattr(runner, "last_layers_used", None) is None:
        return None
    used = []
    for i in range(0, len(texts), batch_size):
        runner.embed_arrays(batch_arrays(runner.tokenizer, list(texts[i:i + batch_size])))
        used.append(np.asarray(runner.last_layers_used))
    return round(float(np.concatenate(used).mean()), 3)
