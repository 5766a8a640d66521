"""Run a trimflow encoder export with onnxruntime alone (numpy, onnxruntime, tokenizers; no torch).

Two export formats share one call surface, ``embed(texts) -> [N, H]`` float32, L2-normalised rows:

* ``trimflow-encoder/1`` (``OnnxEncoder``): one graph, inputs ``input_ids`` / ``attention_mask`` /
  ``token_type_ids`` int64 [B, S], output ``sentence_embedding`` float32 [B, H].
* ``trimflow-encoder-early-exit/1`` (``OnnxEarlyExitEncoder``): an embedding graph and one graph per
  layer; after each exit layer an item whose embedding has stopped changing leaves the batch.

    enc = load_encoder(folder, threads=2)
    vectors = enc.embed(["first text", "second text"])    # cosine similarity = vectors @ vectors.T
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.encoder_common import (EARLY_EXIT_FORMAT, INPUT_NAMES, OUTPUT_NAME, batch_arrays, encoder_tokenizer,
                                  read_meta)
from tasks.errors import SourceError


def ort_session(path: Path, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",),
                spin: bool = True):
    """An onnxruntime session with ``threads`` intra-op threads (0 = onnxruntime decides) and full graph
    optimisation; one inter-op thread, since these graphs are a single chain.

    ``spin=False`` stops idle pool threads from busy-waiting: with one session per layer, the pool
    of the layer that just ran would otherwise spin on the cores the next layer needs.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not Path(path).is_file():
        raise SourceError(f"ONNX file {path} is missing")
    return ort.InferenceSession(str(path), opts, providers=list(providers))


class OnnxEncoder:
    """A ``trimflow-encoder/1`` export: one graph from token ids to the pooled, normalised embedding.

    Args:
        folder: export folder with ``trimflow_encoder.json``, ``tokenizer.json`` and the ONNX file.
        threads: onnxruntime intra-op threads (default 0 = onnxruntime decides).
        onnx_file: overrides the file named in the metadata (default None).
        providers: execution providers (default CPU).
        spin: let idle onnxruntime threads busy-wait for the next call (default True; on oversubscribed
            cores False was faster: MiniLM fp32 at batch 16, 4.6 vs 3.9 items/s at load average 8 on 2 cores).
    """

    def __init__(self, folder: str | Path, threads: int = 0, onnx_file: str | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), spin: bool = True) -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if self.meta["format"] == EARLY_EXIT_FORMAT:
            raise SourceError(f"{folder} is an early-exit export; use OnnxEarlyExitEncoder or load_encoder()")
        self.onnx_file = onnx_file or self.meta["onnx_file"]
        self.session = ort_session(self.folder / self.onnx_file, threads, providers, spin)
        self.tokenizer = encoder_tokenizer(self.folder)
        self.dim = int(self.meta["embedding_dim"])

    def embed_arrays(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embeddings [B, H] of already tokenized int64 inputs (the three contract inputs)."""
        return self.session.run([OUTPUT_NAME], {k: feed[k] for k in INPUT_NAMES})[0]

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings [N, H] of ``texts``, tokenized and run ``batch_size`` at a time (default 32)."""
        return _embed_batches(self, texts, batch_size)


class OnnxEarlyExitEncoder:
    """A ``trimflow-encoder-early-exit/1`` export, exits honoured per item.

    The embedding graph maps ids to the first hidden states; layer graph ``i`` maps
    (hidden [B, S, H], attention_mask [B, S]) to (hidden, ``exit_embedding`` [B, H]): the pooled
    state passed through exit ``i``'s head, in the final embedding's space. After each exit layer,
    items whose exit embedding has cosine ≥ ``threshold`` with the exit embedding of the layer
    before it (layer ``i - 1``) are finished and leave the batch; the rest run on. The last layer
    always finishes everything.

    Args:
        folder: the early-exit export.
        threads: onnxruntime intra-op threads (default 0 = onnxruntime decides).
        threshold: overrides the calibrated threshold in the metadata (default None; > 1 disables exits).
        providers: execution providers (default CPU).
        spin: let idle onnxruntime threads busy-wait between layers (default False; see ``ort_session``).
    """

    def __init__(self, folder: str | Path, threads: int = 0, threshold: float | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), spin: bool = False) -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if self.meta["format"] != EARLY_EXIT_FORMAT:
            raise SourceError(f"{folder} is not an early-exit export (format {self.meta['format']!r})")
        self.embed_session = ort_session(self.folder / self.meta["embed_file"], threads, providers, spin)
        self.layer_sessions = [ort_session(self.folder / f, threads, providers, spin) for f in self.meta["layer_files"]]
        self.exit_layers = [int(i) for i in self.meta["exit_layers"]]  # 1-based layer counts
        self.threshold = float(self.meta["threshold"] if threshold is None else threshold)
        self.tokenizer = encoder_tokenizer(self.folder)
        self.dim = int(self.meta["embedding_dim"])
        self.last_layers_used: np.ndarray = np.zeros(0, np.int64)

    def embed_arrays(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embeddings [B, H]; sets ``last_layers_used`` [B] (layers each item ran through)."""
        n_layers = len(self.layer_sessions)
        b = feed["input_ids"].shape[0]
        out = np.zeros((b, self.dim), np.float32)
        used = np.full(b, n_layers, np.int64)
        hidden = self.embed_session.run(None, {"input_ids": feed["input_ids"],
                                               "token_type_ids": feed["token_type_ids"]})[0]
        mask = feed["attention_mask"]
        alive = np.arange(b)
        previous: np.ndarray | None = None
        for depth, sess in enumerate(self.layer_sessions, start=1):
            hidden, emb = sess.run(None, {"hidden_states": hidden, "attention_mask": mask})
            if depth == n_layers:
                out[alive] = emb
                break
            if depth in self.exit_layers and previous is not None:
                done = (emb * previous).sum(-1) >= self.threshold
                if done.any():
                    out[alive[done]] = emb[done]
                    used[alive[done]] = depth
                    keep = ~done
                    alive, hidden, mask, emb = alive[keep], hidden[keep], mask[keep], emb[keep]
                    if alive.size == 0:
                        break
                    # Drop padding columns no remaining item needs: shorter items that stay would
                    # otherwise pay for the longest item that left.
                    width = int(mask.sum(1).max())
                    hidden, mask = hidden[:, :width], mask[:, :width]
            previous = emb
        self.last_layers_used = used
        return out

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings [N, H] of ``texts``; sets ``layers_used`` [N] for the whole call."""
        used: list[np.ndarray] = []
        out = _embed_batches(self, texts, batch_size, on_batch=lambda: used.append(self.last_layers_used))
        self.layers_used = np.concatenate(used) if used else np.zeros(0, np.int64)
        return out


def _embed_batches(enc: Any, texts: Sequence[str], batch_size: int, on_batch=None) -> np.ndarray:
    texts = list(texts)
    if not texts:
        return np.zeros((0, enc.dim), np.float32)
    parts = []
    for i in range(0, len(texts), batch_size):
        parts.append(enc.embed_arrays(batch_arrays(enc.tokenizer, texts[i:i + batch_size])))
        if on_batch is not None:
            on_batch()
    return np.concatenate(parts)


def load_encoder(folder: str | Path, threads: int = 0, **kwargs: Any) -> OnnxEncoder | OnnxEarlyExitEncoder:
    """The right runtime for the export format found in ``folder``."""
    meta = read_meta(Path(folder))
    cls = OnnxEarlyExitEncoder if meta["format"] == EARLY_EXIT_FORMAT else OnnxEncoder
    return cls(folder, threads=threads, **kwargs)
