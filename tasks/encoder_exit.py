"""Early exit for sentence encoders (DeeBERT-style, adapted to embeddings), exported for onnxruntime.

An item may leave the encoder after an intermediate layer once its embedding has stabilised.
Intermediate states live in a different space from the final embedding, so every layer gets an
exit head: a linear map, fitted in closed form (ridge regression) on training paragraphs, from
that layer's mean-pooled state to the final mean-pooled state, then L2-normalised. An exited
item's embedding is its head's output, comparable with full-depth embeddings. After each exit
layer ``l``, an item whose head embeddings at ``l`` and ``l - 1`` have cosine ≥ ``threshold``
is finished and leaves the batch. The threshold is calibrated on held-out paragraphs: the
loosest one whose embeddings still rank pairs like the full-depth model (Spearman of pairwise
cosines ≥ ``target_rank_fidelity``).

The artifact (``trimflow-encoder-early-exit/1``, run by ``OnnxEarlyExitEncoder``): ``embed.onnx``
(``input_ids``, ``token_type_ids`` -> ``hidden_states``), ``layer_NN.onnx`` per layer
(``hidden_states``, ``attention_mask`` -> ``hidden_states``, ``exit_embedding``), the tokenizer and
``trimflow_encoder.json`` with the exit layers and the calibrated threshold.

    result = early_exit_encoder(EncoderEarlyExitConfig(), hf_dir, out_dir, fit_texts, calib_texts)
    result["threshold"], result["avg_layers"], result["speedup_b16"]
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field, field_validator

from tasks.config import _Frozen
from tasks.encoder_common import (EARLY_EXIT_FORMAT, ENCODER_META, INPUT_NAMES, OUTPUT_NAME, batch_arrays,
                                  encoder_tokenizer, max_seq_length, require_encoder)
from tasks.errors import ConfigError, ExportMismatch
from tasks.technique import Technique

log = logging.getLogger(__name__)

RESULT_FILE = "trimflow_encoder_early_exit.json"
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)
NEVER_EXIT = 1.001  # above any cosine
EMBED_FILE = "embed.onnx"


class EncoderEarlyExitConfig(_Frozen):
    """Exit heads, threshold calibration and export of an early-exit encoder.

    Args:
        exit_layers: 1-based layers after which an item may leave (default None: every layer from the
            second to the one before last).
        target_rank_fidelity: least Spearman correlation between the pairwise cosine similarities of
            early-exit and full-depth embeddings of the held-out paragraphs (default 0.95). On
            all-MiniLM-L6-v2 few items can exit at all, because its last layer turns the pooled state
            round (raw cosine 0.29 between layers 5 and 6, 0.70 after the best linear head): 5.9 of 6
            layers on average at 0.98, 5.7 at 0.95, 4.9 at 0.88.
        fit_items: training paragraphs used to fit the exit heads (default 512).
        calib_items: held-out paragraphs used to calibrate the threshold (default 128).
        ridge: ridge penalty of the heads, relative to the mean feature variance (default None: the
            value of ``RIDGE_GRID`` whose heads come closest to the final embedding on a held-out
            fifth of the fit items).
        thresholds: candidate thresholds (default None: 24 quantiles of the consecutive-layer cosines
            seen on the calibration paragraphs, denser towards the top, so the candidates span the
            model's real range).
        opset: ONNX opset (default 17).
        atol: largest allowed |difference| between the ONNX chain and PyTorch at full depth (default 1e-4).
        threads: torch and onnxruntime threads for fitting and the speed measurement (default None:
            every core this process may use; 1 suits tiny models and oversubscribed machines).
    """

    exit_layers: tuple[int, ...] | None = None
    target_rank_fidelity: float = Field(0.95, gt=0, le=1)
    fit_items: int = Field(512, ge=8)
    calib_items: int = Field(128, ge=8)
    ridge: float | None = Field(None, ge=0)
    thresholds: tuple[float, ...] | None = None
    opset: int = Field(17, ge=14)
    atol: float = Field(1e-4, gt=0)
    threads: int | None = Field(None, ge=1)

    @field_validator("thresholds")
    @classmethod
    def _sorted(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and not v:
            raise ValueError("at least one candidate threshold is needed")
        return None if v is None else tuple(sorted(set(v), reverse=True))


def default_exit_layers(n_layers: int) -> list[int]:
    """Layers 2 … n-1: the first layer has no predecessor to compare with, the last always finishes."""
    return list(range(2, n_layers))


def check_exit_layers(exit_layers: Sequence[int], n_layers: int) -> list[int]:
    """Sorted exit layers, each in ``2 … n_layers - 1``.

    Raises:
        ConfigError: a layer outside that range, or a model too shallow to exit anywhere.
    """
    layers = sorted(set(int(x) for x in exit_layers))
    if not layers:
        raise ConfigError("encoder_early_exit.exit_layers", list(exit_layers),
                          f"a {n_layers}-layer encoder has no layer to exit after (needs 3 or more layers)")
    bad = [x for x in layers if not 2 <= x <= n_layers - 1]
    if bad:
        raise ConfigError("encoder_early_exit.exit_layers", list(exit_layers),
                          f"exits must be after layers 2..{n_layers - 1} of this {n_layers}-layer encoder")
    return layers


def pooled_states(bert, tok, texts: Sequence[str], batch_size: int = 16) -> list[np.ndarray]:
    """Mean-pooled (unnormalised) states after every layer: a list of L arrays [N, H] (float64)."""
    import torch

    from tasks.encoder_common import mean_pool, run_layers

    per_layer: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            f = {k: torch.from_numpy(v) for k, v in batch_arrays(tok, list(texts[i:i + batch_size])).items()}
            states = run_layers(bert, f["input_ids"], f["attention_mask"], f["token_type_ids"])[1:]
            if not per_layer:
                per_layer = [[] for _ in states]
            for j, h in enumerate(states):
                per_layer[j].append(mean_pool(h, f["attention_mask"], normalize=False).double().numpy())
    return [np.concatenate(p) for p in per_layer]


def fit_heads(pooled: list[np.ndarray], ridge: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge maps ``(W, b)`` from each layer's pooled state to the last layer's (identity for the last).

    The target is the final pooled state; ``x @ W + b`` is normalised afterwards, so only its
    direction matters, as for the real embedding.
    """
    y = pooled[-1]
    heads = []
    for x in pooled[:-1]:
        mu_x, mu_y = x.mean(0), y.mean(0)
        xc, yc = x - mu_x, y - mu_y
        gram = xc.T @ xc
        lam = ridge * float(np.trace(gram)) / gram.shape[0]
        w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)
        heads.append((w, mu_y - mu_x @ w))
    h = y.shape[1]
    heads.append((np.eye(h), np.zeros(h)))
    return heads


def choose_ridge(pooled: list[np.ndarray], grid: Sequence[float] = RIDGE_GRID) -> tuple[float, dict[str, float]]:
    """The ridge of ``grid`` whose heads, fitted on four fifths of the items, give the highest mean
    cosine to the final embedding on the last fifth (averaged over the exit-able layers).

    Returns the chosen value and the validation score of every candidate.
    """
    n = pooled[0].shape[0]
    cut = max(1, n - max(2, n // 5))
    train, val = [p[:cut] for p in pooled], [p[cut:] for p in pooled]
    scores = {}
    for r in grid:
        embs = head_embeddings(val, fit_heads(train, r))
        scores[str(r)] = round(float(np.mean([(e * embs[-1]).sum(1).mean() for e in embs[:-1]])), 5)
    best = max(grid, key=lambda r: scores[str(r)])
    return float(best), scores


def candidate_thresholds(embs: list[np.ndarray], exit_layers: Sequence[int], n: int = 24) -> list[float]:
    """``n`` quantiles (strictest first) of the consecutive-layer cosines at the exit layers, spaced
    geometrically towards the top: the useful thresholds let only the most stable few percent exit."""
    cos = np.concatenate([(embs[l - 1] * embs[l - 2]).sum(1) for l in exit_layers])
    qs = np.quantile(cos, 1.0 - np.geomspace(0.002, 1.0, n))
    return sorted({round(float(q), 6) for q in qs}, reverse=True)


def head_embeddings(pooled: list[np.ndarray], heads: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Every layer's exit embedding (head output, L2-normalised): L arrays [N, H]."""
    out = []
    for x, (w, b) in zip(pooled, heads):
        e = x @ w + b
        out.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    return out


def simulate_exits(embs: list[np.ndarray], exit_layers: Sequence[int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """What ``OnnxEarlyExitEncoder`` returns for these per-layer embeddings: (embeddings [N, H], layers used [N])."""
    n_layers, n = len(embs), embs[0].shape[0]
    used = np.full(n, n_layers)
    out = embs[-1].copy()
    alive = np.ones(n, bool)
    for layer in exit_layers:
        cos = (embs[layer - 1] * embs[layer - 2]).sum(1)
        done = alive & (cos >= threshold)
        out[done] = embs[layer - 1][done]
        used[done] = layer
        alive &= ~done
    return out, used


def calibrate(embs: list[np.ndarray], exit_layers: Sequence[int], thresholds: Sequence[float],
              target: float) -> dict[str, Any]:
    """The loosest threshold whose exits keep the rank fidelity ≥ ``target`` on these held-out embeddings.

    Returns:
        ``threshold`` (None when even the strictest candidate misses the target; include ``NEVER_EXIT``
        among the candidates to always have one), ``rank_fidelity``,
        ``mean_cosine`` (to full depth), ``avg_layers``, and ``sweep``: one row per candidate.
    """
    from tasks.encoder_eval import spearman

    full = embs[-1]
    iu = np.triu_indices(full.shape[0], 1)
    ref = (full @ full.T)[iu]
    sweep, chosen = [], None
    for t in thresholds:  # strictest first
        out, used = simulate_exits(embs, exit_layers, t)
        row = {"threshold": t, "rank_fidelity": round(spearman((out @ out.T)[iu], ref), 5),
               "mean_cosine": round(float((out * full).sum(1).mean()), 5), "avg_layers": round(float(used.mean()), 3)}
        sweep.append(row)
        if row["rank_fidelity"] >= target:
            chosen = row
    if chosen is None:
        return {"threshold": None, "rank_fidelity": None, "mean_cosine": None, "avg_layers": float(len(embs)),
                "sweep": sweep}
    return {**chosen, "sweep": sweep}


def _layer_module(layer, w: np.ndarray, b: np.ndarray):
    import torch

    from tasks.encoder_common import additive_mask, mean_pool

    class ExitLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer
            self.head = torch.nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
                self.head.bias.copy_(torch.from_numpy(b.astype(np.float32)))

        def forward(self, hidden_states, attention_mask):
            h = self.layer(hidden_states, additive_mask(attention_mask, hidden_states.dtype))
            h = h[0] if isinstance(h, tuple) else h
            e = self.head(mean_pool(h, attention_mask, normalize=False))
            return h, torch.nn.functional.normalize(e, p=2.0, dim=-1)

    return ExitLayer().eval()


def _embed_module(bert):
    import torch

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = bert.embeddings

        def forward(self, input_ids, token_type_ids):
            return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    return Embed().eval()


def export_segments(bert, heads, out_dir: Path, opset: int) -> tuple[str, list[str]]:
    """Write ``embed.onnx`` and one ``layer_NN.onnx`` per layer; returns their file names."""
    import onnx
    import torch

    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 7, 3, 0, 0]], dtype=torch.long)
    am = (ids != 0).long()
    tt = torch.zeros_like(ids)
    seq = {0: "batch", 1: "seq"}
    h_dim = int(bert.config.hidden_size)
    with torch.no_grad():
        torch.onnx.export(_embed_module(bert), (ids, tt), str(out_dir / EMBED_FILE),
                          input_names=["input_ids", "token_type_ids"], output_names=["hidden_states"],
                          dynamic_axes={"input_ids": seq, "token_type_ids": seq, "hidden_states": seq},
                          opset_version=opset, dynamo=False)
        hidden = bert.embeddings(input_ids=ids, token_type_ids=tt)
        names = []
        for i, (layer, (w, b)) in enumerate(zip(bert.encoder.layer, heads), start=1):
            name = f"layer_{i:02d}.onnx"
            torch.onnx.export(_layer_module(layer, w, b), (hidden, am), str(out_dir / name),
                              input_names=["hidden_states", "attention_mask"],
                              output_names=["hidden_states_out", "exit_embedding"],
                              dynamic_axes={"hidden_states": seq, "attention_mask": seq, "hidden_states_out": seq,
                                            "exit_embedding": {0: "batch"}},
                              opset_version=opset, dynamo=False)
            model = onnx.load(str(out_dir / name))
            model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = h_dim
            onnx.save(model, str(out_dir / name))
            names.append(name)
    return EMBED_FILE, names


def early_exit_encoder(cfg: EncoderEarlyExitConfig, hf_dir: Path, out_dir: Path, fit_texts: Sequence[str],
                       calib_texts: Sequence[str]) -> dict[str, Any]:
    """Fit exit heads, calibrate the threshold, export the segments and measure the exits.

    Args:
        cfg: exit layers, target, item counts, ridge, candidates, export settings.
        hf_dir: BERT sentence encoder (HF folder).
        out_dir: receives the early-exit export and ``trimflow_encoder_early_exit.json``.
        fit_texts: paragraphs the heads are fitted on (training split).
        calib_texts: held-out paragraphs the threshold is calibrated and the speedup measured on.

    Returns:
        ``threshold``, ``exit_layers``, ``rank_fidelity``, ``mean_cosine``, ``avg_layers``, ``num_layers``,
        ``sweep``, ``heads_fit_items``, ``calib_items``, ``ridge``, ``ridge_validation``,
        ``head_cosine_to_final`` (per layer, held-out), ``throughput_full_b16`` (same graphs, exits
        off), ``throughput_exit_b16``, ``speedup_b16``, ``parity_max_abs_diff``, ``size_bytes``, ``seconds``.

    Raises:
        UnsupportedModelError: not a BERT encoder with mean pooling.
        ConfigError: bad exit layers, or too few fit or calibration paragraphs (an empty calibration
            set included). A target no threshold reaches gives an export that never exits (logged,
            ``avg_layers`` = all layers), not an error.
        ExportMismatch: the ONNX chain at full depth differs from PyTorch by more than ``cfg.atol``.
    """
    import torch

    from tasks.encoder_common import load_bert, pooled_encoder
    from tasks.encoder_export import encoder_meta, write_tokenizer
    from tasks.modelio import available_cores, torch_threads

    started = time.time()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    conf = require_encoder(hf_dir, "encoder early exit")
    n_layers = int(conf["num_hidden_layers"])
    exit_layers = check_exit_layers(cfg.exit_layers if cfg.exit_layers is not None else default_exit_layers(n_layers),
                                    n_layers)
    fit = [t for t in fit_texts if t and t.strip()][: cfg.fit_items]
    calib = [t for t in calib_texts if t and t.strip()][: cfg.calib_items]
    if len(calib) < 8:
        raise ConfigError("encoder_early_exit.calib_texts", len(calib),
                          "the calibration set needs at least 8 held-out paragraphs to calibrate a threshold")
    if len(fit) < 8:
        raise ConfigError("encoder_early_exit.fit_texts", len(fit), "at least 8 paragraphs are needed to fit heads")

    max_len = max_seq_length(hf_dir, conf)
    tok = encoder_tokenizer(hf_dir, max_len)
    threads = cfg.threads or available_cores()
    with torch_threads(threads):
        bert = load_bert(hf_dir)
        fit_pooled = pooled_states(bert, tok, fit)
        ridge, ridge_scores = (cfg.ridge, {}) if cfg.ridge is not None else choose_ridge(fit_pooled)
        heads = fit_heads(fit_pooled, ridge)
        calib_embs = head_embeddings(pooled_states(bert, tok, calib), heads)
    # NEVER_EXIT is always a candidate: when no looser threshold keeps the target, the export runs at
    # full depth rather than failing the pipeline or breaking the promise.
    thresholds = sorted({*(cfg.thresholds or candidate_thresholds(calib_embs, exit_layers)), NEVER_EXIT}, reverse=True)
    cal = calibrate(calib_embs, exit_layers, thresholds, cfg.target_rank_fidelity)
    if cal["avg_layers"] >= n_layers:
        log.warning("encoder early exit: no threshold keeps rank fidelity >= %s on %d held-out paragraphs; the "
                    "export never exits (sweep: %s)", cfg.target_rank_fidelity, len(calib), cal["sweep"])

    out_dir.mkdir(parents=True, exist_ok=True)
    pad_id = write_tokenizer(hf_dir, out_dir, max_len)
    embed_file, layer_files = export_segments(bert, heads, out_dir, cfg.opset)
    meta = encoder_meta(conf, max_len, pad_id, cfg.opset) | {
        "format": EARLY_EXIT_FORMAT, "embed_file": embed_file, "layer_files": layer_files,
        "exit_layers": exit_layers, "threshold": cal["threshold"], "exit_rule": "cosine(head_l, head_{l-1}) >= threshold",
        "heads": "ridge-linear"}
    meta.pop("onnx_file")
    (out_dir / ENCODER_META).write_text(json.dumps(meta, indent=2))

    from tasks.encoder_runtime import OnnxEarlyExitEncoder

    # Parity at full depth (exits off) against the plain PyTorch pooled encoder.
    probe = calib[:8]
    with torch_threads(threads), torch.inference_mode():
        f = batch_arrays(tok, probe)
        ref = pooled_encoder(bert)(*(torch.from_numpy(f[k]) for k in INPUT_NAMES)).numpy()
    got = OnnxEarlyExitEncoder(out_dir, threads=threads, threshold=2.0).embed_arrays(f)
    diff = float(np.abs(got - ref).max())
    if not diff <= cfg.atol:
        raise ExportMismatch(f"early-exit chain {out_dir} differs from PyTorch at full depth: max |diff| {diff:.3g} "
                             f"> atol {cfg.atol}")
    speed = measure_exit_speed(out_dir, calib, threads)
    size = sum((out_dir / n).stat().st_size for n in [embed_file, *layer_files])
    result = {
        "threshold": cal["threshold"], "exit_layers": exit_layers, "rank_fidelity": cal["rank_fidelity"],
        "mean_cosine": cal["mean_cosine"], "avg_layers": cal["avg_layers"], "num_layers": n_layers,
        "sweep": cal["sweep"], "heads_fit_items": len(fit), "calib_items": len(calib), "ridge": ridge,
        "ridge_validation": ridge_scores,
        "head_cosine_to_final": [round(float((e * calib_embs[-1]).sum(1).mean()), 4) for e in calib_embs], **speed,
        "parity_max_abs_diff": diff, "size_bytes": size, "output": OUTPUT_NAME,
        "seconds": round(time.time() - started, 2),
    }
    (out_dir / RESULT_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
    return result


def measure_exit_speed(folder: Path, texts: Sequence[str], threads: int, batch_size: int = 16,
                       repeats: int = 3) -> dict[str, Any]:
    """Batch throughput of the early-exit runtime with exits on vs off (same graphs), on ``texts``.

    Returns ``throughput_full_b16``, ``throughput_exit_b16``, ``speedup_b16``, ``avg_layers_runtime``
    (layers the runtime really ran per item).
    """
    from tasks.encoder_runtime import OnnxEarlyExitEncoder

    on = OnnxEarlyExitEncoder(folder, threads=threads)
    off = OnnxEarlyExitEncoder(folder, threads=threads, threshold=2.0)
    batches = [batch_arrays(on.tokenizer, list(texts[i:i + batch_size]))
               for i in range(0, len(texts) - batch_size + 1, batch_size)]
    used = []
    for b in batches:  # warm-up, and the real per-item depth
        off.embed_arrays(b)
        on.embed_arrays(b)
        used.append(on.last_layers_used)
    rates: dict[str, list[float]] = {"full": [], "exit": []}
    for _ in range(repeats):  # interleaved, so a noisy neighbour hits both alike
        for key, enc in (("full", off), ("exit", on)):
            t0 = time.perf_counter()
            for b in batches:
                enc.embed_arrays(b)
            rates[key].append(len(batches) * batch_size / (time.perf_counter() - t0))
    full, exit_ = float(np.median(rates["full"])), float(np.median(rates["exit"]))
    return {"throughput_full_b16": round(full, 2), "throughput_exit_b16": round(exit_, 2),
            "speedup_b16": round(exit_ / full, 3), "avg_layers_runtime": round(float(np.concatenate(used).mean()), 3)}


def _run(cfg: EncoderEarlyExitConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    from tasks.encoder_distill import paragraphs

    fit, _ = paragraphs(ctx.texts("train"), 80, 700)
    calib, _ = paragraphs(ctx.texts("calib"), 80, 700)
    # Spread the fit items over many articles rather than the first few.
    step = max(1, len(fit) // max(1, cfg.fit_items))
    return early_exit_encoder(cfg, src, out, fit[::step], calib)


TECHNIQUES = [Technique("encoder_early_exit", stage="early_exit", config=EncoderEarlyExitConfig, run=_run,
                        kinds=("encoder",), consumes="hf", produces="onnx",
                        description="per-item early exit on embedding stability, ridge exit heads, threshold "
                                    "calibrated on held-out text; exported per layer for onnxruntime")]
