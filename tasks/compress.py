"""Compression of a causal LM's weights: low-rank factorization and k-means weight sharing.

``lowrank`` splits a linear layer ``W`` (out×in) into ``U`` (out×r) · ``V`` (r×in) from a truncated
SVD, by default of ``W`` whitened by the layer's input statistics on calibration text (SVD-LLM), so
"energy kept" is the share of the layer's output energy on that text. A factorization is kept only
where it is smaller and, measured with onnxruntime at the decode shape (1 token) and at prefill,
faster than the dense layer. ``weight_sharing`` clusters each weight matrix into a codebook of at
most 256 values (k-means) and stores uint8 (or, for ≤16 clusters, packed 4-bit) indices; the ONNX
export keeps the codebook + indices form, so files really shrink.

    result = lowrank(LowRankConfig(energy=0.9), hf_dir, out_dir, calib_texts, eval_texts)
    result = weight_sharing(WeightSharingConfig(clusters=16), hf_dir, out_dir, calib_texts, eval_texts)
    model = tasks.modelio.load_causal_lm(out_dir)     # re-applies the recorded patches
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from tasks.config import _Frozen
from tasks.errors import ConfigError, UnsupportedModelError
from tasks.modelio import (available_cores, count_parameters, load_causal_lm, read_patches, require_causal_lm,
                           save_causal_lm, torch_threads, weights_size_bytes)
from tasks.technique import Technique

log = logging.getLogger(__name__)

LOWRANK_RESULT = "trimflow_lowrank.json"
SHARING_RESULT = "trimflow_weight_sharing.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# Which projections read the same activation: their input statistics are collected once.
_INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


class _Measured(_Frozen):
    """Fields shared by both techniques: how their effect is measured.

    Args:
        eval_windows: held-out windows scored for perplexity before and after (default 4; 0 skips).
        eval_len: tokens per window (default 256).
        latency_tokens: greedy tokens timed at batch 1 in PyTorch before and after (default 16; 0 skips).
        max_ppl_ratio: the largest perplexity rise (after / before) for which the result reports that the
            technique pays; the step never fails on it, the quality gate judges the candidate
            (default 1.25).
    """

    eval_windows: int = Field(4, ge=0)
    eval_len: int = Field(256, ge=16)
    latency_tokens: int = Field(16, ge=0)
    max_ppl_ratio: float = Field(1.25, gt=1)


class LowRankConfig(_Measured):
    """Low-rank (SVD) factorization of decoder linear layers.

    Args:
        rank_rule: ``energy`` (each layer keeps the smallest rank holding ``energy`` of its spectrum's
            energy) or ``budget`` (ranks chosen jointly so the factorized layers hold ``param_ratio``
            of the targeted parameters, spending ranks where they keep the most energy per parameter)
            (default energy).
        energy: energy kept per layer for ``rank_rule=energy`` (default 0.95).
        param_ratio: share of the targeted layers' parameters kept for ``rank_rule=budget`` (default 0.8).
        targets: projection names considered (default all seven of a Llama block).
        activation_aware: whiten by the layer's input second moments on calibration text before the
            SVD, so truncation minimises the output error on that text (default True).
        calib_tokens: calibration tokens for the input statistics (default 512).
        rank_multiple: ranks are rounded up to a multiple of this, for efficient GEMM (default 8).
        min_layer_speedup: a factorization is kept only if dense/factorized latency is at least this at
            both the decode and the prefill shape, measured with onnxruntime (default 1.05; 0 keeps every
            smaller factorization without measuring).
        prefill_tokens: tokens of the prefill shape (default 128).
        bench_repeats: timed repetitions per shape, dense and factorized interleaved (default 9).
    """

    rank_rule: Literal["energy", "budget"] = "energy"
    energy: float = Field(0.95, gt=0, le=1)
    param_ratio: float = Field(0.8, gt=0, lt=1)
    targets: tuple[str, ...] = PROJECTIONS
    activation_aware: bool = True
    calib_tokens: int = Field(512, ge=16)
    rank_multiple: int = Field(8, ge=1)
    min_layer_speedup: float = Field(1.05, ge=0)
    prefill_tokens: int = Field(128, ge=2)
    bench_repeats: int = Field(9, ge=1)

    @model_validator(mode="after")
    def _known_targets(self) -> "LowRankConfig":
        _check_targets(self.targets, "lowrank.targets")
        return self


class WeightSharingConfig(_Measured):
    """K-means weight clustering: every targeted matrix becomes a codebook plus small indices.

    Args:
        clusters: codebook entries per matrix, 2..256; ≤16 stores packed 4-bit indices, more store
            uint8 (default 256).
        targets: projection names clustered (default all seven of a Llama block).
        include_embeddings: also cluster the token embedding (and the LM head tied to it) (default True).
        iterations: Lloyd iterations of 1-D k-means, started from quantiles (default 12).
    """

    clusters: int = Field(256, ge=2, le=256)
    targets: tuple[str, ...] = PROJECTIONS
    include_embeddings: bool = True
    iterations: int = Field(12, ge=1)

    @model_validator(mode="after")
    def _known_targets(self) -> "WeightSharingConfig":
        _check_targets(self.targets, "weight_sharing.targets")
        return self


def _check_targets(targets: tuple[str, ...], where: str) -> None:
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"{where}: unknown or no projections {bad}; known: {list(PROJECTIONS)}")


# -- patched modules ----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _modules() -> SimpleNamespace:
    """The torch module classes, defined on first use so importing this module stays torch-free."""
    import torch
    import torch.nn.functional as F

    class LowRankLinear(torch.nn.Module):
        """``up(down(x))``: a rank-``r`` stand-in for an ``in→out`` Linear (bias kept on ``up``)."""

        def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
            super().__init__()
            self.in_features, self.out_features, self.rank = in_features, out_features, rank
            self.down = torch.nn.Linear(in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, out_features, bias=bias)

        def forward(self, x):
            return self.up(self.down(x))

    class _Codebook(torch.nn.Module):
        """Weights stored as ``codebook[indices]``: indices are uint8, two 4-bit ones per byte when packed."""

        def _init_codebook(self, rows: int, cols: int, clusters: int) -> None:
            self.rows, self.cols, self.clusters = rows, cols, clusters
            self.packed = clusters <= 16
            width = (cols + 1) // 2 if self.packed else cols
            self.register_buffer("codebook", torch.zeros(clusters, dtype=torch.float32))
            self.register_buffer("indices", torch.zeros(rows, width, dtype=torch.uint8))

        def _unpack(self, idx):
            idx = idx.to(torch.int64)
            if not self.packed:
                return idx
            # Integer Div/Mod rather than bit ops: they export to ONNX opset 17 and fold at load time.
            lo, hi = torch.remainder(idx, 16), torch.div(idx, 16, rounding_mode="floor")
            both = torch.stack([lo, hi], dim=-1).reshape(*idx.shape[:-1], idx.shape[-1] * 2)
            return both[..., : self.cols]

        def dense(self):
            return self.codebook[self._unpack(self.indices)]

    class ClusteredLinear(_Codebook):
        """A Linear whose weight is ``codebook[indices]`` (out×in); bias, if any, stays fp32."""

        def __init__(self, in_features: int, out_features: int, clusters: int, bias: bool) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self._init_codebook(out_features, in_features, clusters)
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
            self._cache = None

        def forward(self, x):
            if torch.jit.is_tracing():  # the exported graph must hold codebook and indices, not a dense constant
                return F.linear(x, self.dense(), self.bias)
            version = (self.codebook._version, self.indices._version, self.codebook.data_ptr())
            if self._cache is None or self._cache[0] != version:
                self._cache = (version, self.dense())
            return F.linear(x, self._cache[1], self.bias)

    class ClusteredEmbedding(_Codebook):
        """An Embedding whose table is ``codebook[indices]``; lookups gather only the rows asked for."""

        def __init__(self, num_embeddings: int, embedding_dim: int, clusters: int, padding_idx=None) -> None:
            super().__init__()
            self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
            self._init_codebook(num_embeddings, embedding_dim, clusters)

        def forward(self, ids):
            return self.codebook[self._unpack(self.indices[ids])]

    return SimpleNamespace(LowRankLinear=LowRankLinear, ClusteredLinear=ClusteredLinear,
                           ClusteredEmbedding=ClusteredEmbedding)


def _set_module(model, name: str, module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def apply_lowrank_patch(model, patch: dict[str, Any]) -> None:
    """Replace ``patch["module"]`` (a Linear) by a ``LowRankLinear`` of ``patch["rank"]`` (weights unset)."""
    old = model.get_submodule(patch["module"])
    new = _modules().LowRankLinear(old.in_features, old.out_features, int(patch["rank"]), old.bias is not None)
    _set_module(model, patch["module"], new.to(dtype=_dtype_of(old)))


def apply_kmeans_patch(model, patch: dict[str, Any]) -> None:
    """Replace ``patch["module"]`` by its codebook form; ``tied_to`` makes it share that module's buffers."""
    m = _modules()
    old = model.get_submodule(patch["module"])
    k = int(patch["clusters"])
    if patch.get("embedding"):
        new = m.ClusteredEmbedding(old.num_embeddings, old.embedding_dim, k, getattr(old, "padding_idx", None))
    else:
        new = m.ClusteredLinear(old.in_features, old.out_features, k, old.bias is not None)
    if patch.get("tied_to"):
        src = model.get_submodule(patch["tied_to"])
        new.codebook, new.indices = src.codebook, src.indices  # one tensor, two modules: stored once
    _set_module(model, patch["module"], new)


def _dtype_of(module):
    return next(module.parameters()).dtype


# -- shared helpers -----------------------------------------------------------------------------
def token_stream(tokenizer_dir: Path, texts: Sequence[str], max_tokens: int) -> list[int]:
    """The texts' token ids joined by EOS, cut at ``max_tokens`` (``tokenizer.json`` of the folder)."""
    from tasks.evaluate import _FolderTokenizer

    tok = _FolderTokenizer(tokenizer_dir)
    eos = _eos_id(tokenizer_dir)
    stream: list[int] = []
    for t in texts:
        stream += tok.encode(t) + ([eos] if eos is not None else [])
        if len(stream) >= max_tokens:
            break
    return stream[:max_tokens]


def _eos_id(model_dir: Path) -> int | None:
    eos = json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


def _targets_of(model, targets: Sequence[str]) -> list[tuple[str, Any]]:
    """(qualified name, Linear) of every targeted projection in every decoder layer."""
    import torch

    found = []
    for i, layer in enumerate(model.model.layers):
        for proj in targets:
            parent = layer.self_attn if proj in _ATTN else layer.mlp
            mod = getattr(parent, proj, None)
            if mod is None:
                raise UnsupportedModelError(f"layer {i} has no {proj}; this step needs Llama-style blocks")
            if isinstance(mod, torch.nn.Linear):  # an already-compressed projection is left alone
                where = "self_attn" if proj in _ATTN else "mlp"
                found.append((f"model.layers.{i}.{where}.{proj}", mod))
    return found


def measure_effect(model, tokenizer_dir: Path, eval_texts: Sequence[str], cfg: _Measured,
                   prompt: Sequence[int]) -> dict[str, Any]:
    """Held-out perplexity and batch-1 greedy decode latency of a torch model (the same code before and after).

    Returns:
        ``perplexity`` (None when ``eval_windows`` is 0 or the texts are too short), ``ppl_tokens``,
        ``decode_ms_per_token`` (median over the timed tokens after the first; None when skipped).
    """
    import torch

    from tasks.evaluate import token_nll

    out: dict[str, Any] = {"perplexity": None, "ppl_tokens": 0, "decode_ms_per_token": None}
    with torch_threads(available_cores()), torch.inference_mode():
        if cfg.eval_windows and eval_texts:
            stream = token_stream(tokenizer_dir, eval_texts, cfg.eval_windows * cfg.eval_len)
            n = len(stream) // cfg.eval_len
            if n:
                w = np.asarray(stream[: n * cfg.eval_len], np.int64).reshape(n, cfg.eval_len)
                nll = np.concatenate([token_nll(model(input_ids=torch.from_numpy(r[None]), use_cache=False)
                                                .logits[0].float().numpy(), r) for r in w])
                out.update(perplexity=round(float(np.exp(nll.mean())), 4), ppl_tokens=int(nll.size))
        if cfg.latency_tokens and prompt:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            res = model(input_ids=ids, use_cache=True)
            cache, nxt, steps = res.cache, res.logits[:, -1].argmax(-1, keepdim=True), []
            for _ in range(cfg.latency_tokens):
                t0 = time.perf_counter()
                res = model(input_ids=nxt, cache=cache, use_cache=True)
                steps.append(time.perf_counter() - t0)
                cache, nxt = res.cache, res.logits[:, -1].argmax(-1, keepdim=True)
            out["decode_ms_per_token"] = round(float(np.median(steps)) * 1e3, 3)
    return out


def _effect(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    def ratio(k):
        a, b = before.get(k), after.get(k)
        return round(b / a, 4) if a and b else None

    return {"perplexity_ratio": ratio("perplexity"), "decode_latency_ratio": ratio("decode_ms_per_token")}


def _quality_note(effect: dict[str, Any], cfg: _Measured) -> tuple[bool, str]:
    """Whether the perplexity rise is within ``max_ppl_ratio`` (True when unmeasured), and why not."""
    r = effect["perplexity_ratio"]
    if r is None:
        return True, "perplexity not measured"
    if r > cfg.max_ppl_ratio:
        return False, f"perplexity x{r} exceeds max_ppl_ratio {cfg.max_ppl_ratio}: does not pay"
    return True, f"perplexity x{r} within max_ppl_ratio {cfg.max_ppl_ratio}"


def _prompt(model_dir: Path, texts: Sequence[str]) -> list[int]:
    return token_stream(model_dir, texts[:1] or ["The city council voted on Tuesday to"], 32)


# -- low rank -----------------------------------------------------------------------------------
def input_second_moments(model, names: Sequence[str], stream: Sequence[int], chunk: int = 256) -> dict[str, Any]:
    """``Σ x̂x̂ᵀ / n`` (float64, in×in) of each named Linear's input over the calibration tokens, x̂ = x/‖x‖.

    Every token weighs the same: LLM activations carry a few "massive" tokens (the first token,
    delimiters) whose norms are orders of magnitude above the rest, and unnormalised moments let
    those few tokens decide the truncation (SmolLM2-135M at 99% energy: perplexity x37 that way).
    Projections that read the same tensor (q/k/v, gate/up) share one matrix.
    """
    import torch

    sums: dict[str, Any] = {}
    owner: dict[str, str] = {}  # module name -> key of the matrix it uses
    seen: dict[str, int] = {}

    def hook(name):
        key = f"{name.rsplit('.', 1)[0]}:{_INPUT_GROUP[name.rsplit('.', 1)[1]]}"
        owner[name] = key

        def f(_m, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if seen.get(key) == id(inputs[0]):  # a sibling projection already counted this tensor
                return
            seen[key] = id(inputs[0])
            acc = sums.setdefault(key, [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0])
            xn = x.double() / x.double().norm(dim=1, keepdim=True).clamp(min=1e-12)
            acc[0] += xn.T @ xn
            acc[1] += x.shape[0]
        return f

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for start in range(0, len(stream), chunk):
                model(input_ids=torch.tensor([list(stream[start:start + chunk])]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[owner[n]][0] / max(1, sums[owner[n]][1]) for n in names}


def _whitened_svd(weight, moment):
    """SVD of ``W·S`` with ``SSᵀ`` the (damped) input second moment; returns U, σ, Vᵀ, S (float64)."""
    import torch

    w = weight.detach().double()
    if moment is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u, s, vh, None
    damp = 1e-5 * float(moment.diagonal().mean()) + 1e-12
    eye = torch.eye(moment.shape[0], dtype=torch.float64)
    for _ in range(6):  # a rank-deficient moment (dead channels) needs more damping to factor
        chol, info = torch.linalg.cholesky_ex(moment + damp * eye)
        if int(info) == 0:
            break
        damp *= 10
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    return u, s, vh, chol


def choose_ranks(spectra: dict[str, Any], shapes: dict[str, tuple[int, int]], cfg: LowRankConfig) -> dict[str, int]:
    """Rank per layer from its singular values (before rounding and the smaller/faster checks).

    ``energy``: smallest r with Σσ²[:r] ≥ energy·Σσ². ``budget``: singular directions of all layers
    ranked by (share of their layer's energy) / (parameters per rank, in+out), taken in that order
    until the factorized layers hold ``param_ratio`` of the targeted parameters.
    """
    import torch

    ranks = {}
    if cfg.rank_rule == "energy":
        for name, s in spectra.items():
            e = torch.cumsum(s ** 2, 0) / float((s ** 2).sum())
            ranks[name] = int(torch.searchsorted(e, torch.tensor(cfg.energy - 1e-12, dtype=e.dtype)).item()) + 1
        return ranks
    items = []
    for name, s in spectra.items():
        out_f, in_f = shapes[name]
        share = (s ** 2 / float((s ** 2).sum())).numpy()
        items.append(np.stack([share / (in_f + out_f), np.full(len(share), len(items)), np.arange(len(share))], 1))
    table = np.concatenate(items)
    table = table[np.argsort(-table[:, 0], kind="stable")]
    names = list(spectra)
    budget = cfg.param_ratio * sum(o * i for o, i in shapes.values())
    cost = np.array([sum(shapes[n]) for n in names], np.float64)[table[:, 1].astype(int)]
    taken = np.cumsum(cost) <= budget
    counts = np.bincount(table[taken, 1].astype(int), minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}


def _round_rank(r: int, multiple: int, full: int) -> int:
    return min(full, max(multiple, int(math.ceil(max(r, 1) / multiple) * multiple)))


class LatencyBench:
    """Fastest onnxruntime latency of a dense ``in→out`` MatMul and of rank-``r`` pairs, in ms.

    At one token a layer streams its weights from memory, as in a real model whose layers do not
    fit the CPU caches; so each graph holds enough independent copies of the layer that their
    weights exceed ``cache_bytes``, and the time is divided by the copies. At prefill the work is
    compute-bound and two copies suffice. Dense and factorized runs alternate and the fastest run
    of each counts: on a shared machine, other processes only ever add time. The dense graph of a
    shape is built once and reused for every rank.

    Args:
        threads: onnxruntime intra-op threads.
        repeats: timed runs per graph at prefill (three times as many at one token).
        cache_bytes: weight bytes a one-token graph must exceed (default 64 MiB).
    """

    def __init__(self, threads: int, repeats: int, cache_bytes: int = 64 << 20) -> None:
        self.threads, self.repeats, self.cache_bytes = threads, repeats, cache_bytes
        self._dense: dict[tuple[int, int, int], Any] = {}
        self._rng = np.random.default_rng(0)

    def _session(self, shapes: list[tuple[int, int]], tokens: int):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n_bytes = 4 * sum(a * b for a, b in shapes)
        copies = 2 if tokens > 1 else int(min(256, max(4, math.ceil(self.cache_bytes / n_bytes))))
        base = [self._rng.standard_normal(sh).astype(np.float32) for sh in shapes]
        nodes, inits, outs = [], [], []
        for c in range(copies):
            prev = "x"
            for j, w in enumerate(base):
                inits.append(numpy_helper.from_array(w, f"w{c}_{j}"))  # distinct tensors: no cache reuse
                nodes.append(helper.make_node("MatMul", [prev, f"w{c}_{j}"], [f"y{c}_{j}"]))
                prev = f"y{c}_{j}"
            outs.append(prev)
        nodes.append(helper.make_node("Sum", outs, ["y"]))
        g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              [1, tokens, shapes[0][0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]), copies

    def compare(self, in_f: int, out_f: int, rank: int, tokens: int) -> tuple[float, float]:
        """(dense ms, factorized ms) per layer at ``tokens`` tokens."""
        key = (in_f, out_f, tokens)
        if key not in self._dense:
            self._dense[key] = self._session([(in_f, out_f)], tokens)
        sessions = [self._dense[key], self._session([(in_f, rank), (rank, out_f)], tokens)]
        x = {"x": self._rng.standard_normal((1, tokens, in_f)).astype(np.float32)}
        times: list[list[float]] = [[], []]
        for s, _ in sessions:
            s.run(None, x)
        for _ in range(self.repeats * (3 if tokens == 1 else 1)):
            for i, (s, copies) in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, x)
                times[i].append((time.perf_counter() - t0) / copies)
        return float(min(times[0]) * 1e3), float(min(times[1]) * 1e3)


def lowrank(cfg: LowRankConfig, model_dir: Path, out_dir: Path, calib_texts: Sequence[str] | None,
            eval_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Factorize the decoder projections of ``model_dir`` where that is smaller and faster; save to ``out_dir``.

    Args:
        cfg: rank rule, targets, whitening, the speed check and the effect measurement.
        model_dir: HF folder of a Llama-style causal LM (earlier patches are kept).
        out_dir: receives the patched model (``model.safetensors``, ``trimflow_patches.json``), the
            tokenizer and ``trimflow_lowrank.json`` (config + this result).
        calib_texts: calibration texts for the input statistics (needed when ``activation_aware``).
        eval_texts: held-out texts for the perplexity effect (default None: not measured).

    Returns:
        ``factorized`` (layers kept factorized), ``candidates`` (layers that would be smaller),
        ``considered``, ``rejected_slower``, ``layers`` (per factorized layer: rank, energy kept,
        dense/factorized decode and prefill ms), ``params_before``/``params_after``,
        ``size_bytes_before``/``size_bytes_after``, ``before``/``after`` (perplexity, decode ms per
        token in PyTorch), ``effect`` (ratios), ``pays`` and ``verdict`` (one line saying whether it
        paid on this machine), ``bench_threads``, ``seconds``.

    Raises:
        UnsupportedModelError: not a Llama-style causal LM.
        ConfigError: ``activation_aware`` without calibration text.
    """
    import torch

    started = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_causal_lm(model_dir, "low-rank factorization")
    if cfg.activation_aware and not calib_texts:
        raise ConfigError("lowrank.activation_aware", True, "needs calibration texts (ctx.texts('calib'))")
    threads = available_cores()
    with torch_threads(threads):
        model = load_causal_lm(model_dir)
        prompt = _prompt(model_dir, eval_texts or [])
        before = measure_effect(model, model_dir, eval_texts or [], cfg, prompt)
        params_before = count_parameters(model)
        targets = _targets_of(model, cfg.targets)
        moments: dict[str, Any] = {}
        if cfg.activation_aware:
            stream = token_stream(model_dir, calib_texts or [], cfg.calib_tokens)
            if len(stream) < 16:
                raise ConfigError("calib_texts", len(calib_texts or []), "hold fewer than 16 tokens")
            moments = input_second_moments(model, [n for n, _ in targets], stream)
        svds = {name: _whitened_svd(mod.weight, moments.get(name)) for name, mod in targets}
        shapes = {name: tuple(mod.weight.shape) for name, mod in targets}
        raw = choose_ranks({n: s[1] for n, s in svds.items()}, shapes, cfg)

        decisions, cache, bench = [], {}, LatencyBench(threads, cfg.bench_repeats)
        for name, mod in targets:
            out_f, in_f = shapes[name]
            rank = _round_rank(raw[name], cfg.rank_multiple, min(in_f, out_f))
            s = svds[name][1]
            row = {"module": name, "rank": rank, "full_rank": min(in_f, out_f), "shape": [out_f, in_f],
                   "energy_kept": round(float((s[:rank] ** 2).sum() / (s ** 2).sum()), 5)}
            if rank * (in_f + out_f) >= in_f * out_f:
                decisions.append(row | {"kept": False, "why": "not smaller"})
                continue
            if cfg.min_layer_speedup > 0:
                # Timed at the rank rounded up to a multiple of 32: fewer distinct benchmarks, and a
                # slightly pessimistic time for the factorized layer.
                key = (in_f, out_f, min(min(in_f, out_f), int(math.ceil(rank / 32) * 32)))
                if key not in cache:
                    d1, f1 = bench.compare(*key, 1)
                    dp, fp = bench.compare(*key, cfg.prefill_tokens)
                    cache[key] = {"decode_ms": [round(d1, 4), round(f1, 4)], "prefill_ms": [round(dp, 4), round(fp, 4)]}
                row |= cache[key]
                fast = (row["decode_ms"][0] >= cfg.min_layer_speedup * row["decode_ms"][1]
                        and row["prefill_ms"][0] >= cfg.min_layer_speedup * row["prefill_ms"][1])
                if not fast:
                    decisions.append(row | {"kept": False, "why": "not faster"})
                    continue
            decisions.append(row | {"kept": True})

        patches = list(read_patches(model_dir))
        for row in decisions:
            if not row["kept"]:
                continue
            name, rank = row["module"], row["rank"]
            u, s, vh, chol = svds[name]
            root = s[:rank].sqrt()
            down = root[:, None] * vh[:rank]
            if chol is not None:  # V' = √σ Vᵀ S⁻¹ with S lower triangular: solved, not inverted
                down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)
            old = model.get_submodule(name)
            patch = {"kind": "lowrank", "module": name, "rank": rank}
            apply_lowrank_patch(model, patch)
            new = model.get_submodule(name)
            with torch.no_grad():
                new.down.weight.copy_(down.float())
                new.up.weight.copy_((u[:, :rank] * root[None]).float())
                if old.bias is not None:
                    new.up.bias.copy_(old.bias)
            patches.append(patch)
        del svds, moments
        save_causal_lm(model, out_dir, patches, source_dir=model_dir)
        model = load_causal_lm(out_dir)  # measure what was saved, through the same loader export uses
        after = measure_effect(model, model_dir, eval_texts or [], cfg, prompt)
        params_after = count_parameters(model)

    kept = [r for r in decisions if r["kept"]]
    candidates = [r for r in decisions if r.get("why") != "not smaller"]
    effect = _effect(before, after)
    if not kept:
        verdict = (f"no layer factorized: {len(decisions) - len(candidates)} of {len(decisions)} would not be smaller "
                   f"at rank_rule={cfg.rank_rule}, {sum(r.get('why') == 'not faster' for r in decisions)} smaller ones "
                   f"were not {cfg.min_layer_speedup}x faster in onnxruntime")
    quality_ok, note = _quality_note(effect, cfg)
    if kept:
        verdict = (f"{len(kept)} of {len(decisions)} layers factorized: parameters x{params_after / params_before:.3f}, "
                   f"PyTorch decode latency x{effect['decode_latency_ratio']}, {note}")
    result = {
        "considered": len(decisions),
        "candidates": len(candidates),
        "factorized": len(kept),
        "rejected_slower": sum(r.get("why") == "not faster" for r in decisions),
        "layers": kept,
        "rejected": [{k: r[k] for k in ("module", "rank", "full_rank", "energy_kept", "why")} for r in decisions
                     if not r["kept"]][:64],
        "params_before": params_before,
        "params_after": params_after,
        "size_bytes_before": weights_size_bytes(model_dir),
        "size_bytes_after": weights_size_bytes(out_dir),
        "before": before,
        "after": after,
        "effect": effect,
        "pays": bool(kept) and params_after < params_before and quality_ok,
        "verdict": verdict,
        "bench_threads": threads,
        "seconds": round(time.time() - started, 2),
    }
    (out_dir / LOWRANK_RESULT).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
    log.info("lowrank: %s", verdict)
    return result


# -- k-means weight sharing ---------------------------------------------------------------------
def kmeans_1d(values, clusters: int, iterations: int, sample: int = 1 << 20):
    """1-D k-means of a tensor's values: ``(codebook [k] float32, labels int64 like values)``.

    Half the centroids start evenly spaced over [min, max], half at evenly spaced quantiles (of a
    fixed random sample for big tensors). Quantiles alone put every centroid in the bulk and Lloyd
    steps never reach the few large weights, which matter most (SmolLM2-135M, 256 clusters: a 9.25
    weight came back as 1.1 and perplexity went 31 -> 20,000; with the mixed start the largest error
    is ~0.1). Each Lloyd step assigns by the midpoints between sorted centroids, exact in 1-D.
    """
    import torch

    flat = values.detach().reshape(-1).float()
    g = torch.Generator().manual_seed(0)
    probe = flat if flat.numel() <= sample else flat[torch.randint(0, flat.numel(), (sample,), generator=g)]
    n_lin = clusters // 2
    q = torch.linspace(0, 1, clusters - n_lin + 2, dtype=torch.float64)[1:-1]
    centers = torch.cat([torch.linspace(float(flat.min()), float(flat.max()), n_lin),
                         torch.quantile(probe.double(), q).float()])
    for _ in range(iterations):
        centers, _ = torch.sort(centers)
        labels = torch.bucketize(flat, (centers[1:] + centers[:-1]) / 2)
        sums = torch.zeros(clusters, dtype=torch.float64).index_add_(0, labels, flat.double())
        counts = torch.bincount(labels, minlength=clusters)
        centers = torch.where(counts > 0, (sums / counts.clamp(min=1)).float(), centers)
    centers, _ = torch.sort(centers)
    labels = torch.bucketize(flat, (centers[1:] + centers[:-1]) / 2)
    return centers, labels.reshape(values.shape)


def _pack(labels, packed: bool):
    import torch

    lab = labels.to(torch.uint8)
    if not packed:
        return lab.contiguous()
    if lab.shape[-1] % 2:
        lab = torch.nn.functional.pad(lab, (0, 1))
    return (lab[..., 0::2] + 16 * lab[..., 1::2]).to(torch.uint8).contiguous()


def weight_sharing(cfg: WeightSharingConfig, model_dir: Path, out_dir: Path,
                   eval_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Cluster the weights of ``model_dir`` into per-matrix codebooks and save the compact form to ``out_dir``.

    Args:
        cfg: clusters, targets, embeddings, k-means iterations and the effect measurement.
        model_dir: HF folder of a Llama-style causal LM.
        out_dir: receives the patched model (codebooks + uint8/4-bit indices in ``model.safetensors``,
            ``trimflow_patches.json``), the tokenizer and ``trimflow_weight_sharing.json``.
        eval_texts: held-out texts for the perplexity effect (default None: not measured).

    Returns:
        ``clustered`` (matrices), ``clusters``, ``index_bits``, ``embeddings_clustered``,
        ``size_bytes_before``/``size_bytes_after``/``size_ratio``, ``mean_rel_error`` (‖W−Ŵ‖/‖W‖ averaged
        over matrices), ``before``/``after`` (perplexity, PyTorch decode ms per token), ``effect``,
        ``pays`` and ``verdict``, ``seconds``.

    Raises:
        UnsupportedModelError: not a Llama-style causal LM.
    """
    import torch

    started = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_causal_lm(model_dir, "weight sharing")
    k, packed = cfg.clusters, cfg.clusters <= 16
    with torch_threads(available_cores()):
        model = load_causal_lm(model_dir)
        prompt = _prompt(model_dir, eval_texts or [])
        before = measure_effect(model, model_dir, eval_texts or [], cfg, prompt)
        patches = list(read_patches(model_dir))
        jobs: list[tuple[str, Any, dict[str, Any]]] = []
        for name, mod in _targets_of(model, cfg.targets):
            jobs.append((name, mod.weight, {"kind": "kmeans", "module": name, "clusters": k}))
        embed = model.get_input_embeddings()
        tied_head = None
        if cfg.include_embeddings and isinstance(embed, torch.nn.Embedding):
            jobs.append(("model.embed_tokens", embed.weight,
                         {"kind": "kmeans", "module": "model.embed_tokens", "clusters": k, "embedding": True}))
            head = model.get_output_embeddings()
            if head is not None and head.weight is embed.weight:
                tied_head = {"kind": "kmeans", "module": "lm_head", "clusters": k, "tied_to": "model.embed_tokens"}
        errors = []
        for name, weight, patch in jobs:
            w = weight.detach().float()
            centers, labels = kmeans_1d(w, k, cfg.iterations)
            errors.append(float((centers[labels] - w).norm() / w.norm().clamp(min=1e-12)))
            old = model.get_submodule(name)
            bias = getattr(old, "bias", None)
            apply_kmeans_patch(model, patch)
            new = model.get_submodule(name)
            with torch.no_grad():
                new.codebook.copy_(centers)
                new.indices.copy_(_pack(labels, packed))
                if bias is not None:
                    new.bias.copy_(bias)
            patches.append(patch)
        if tied_head is not None:
            apply_kmeans_patch(model, tied_head)
            patches.append(tied_head)
        save_causal_lm(model, out_dir, patches, source_dir=model_dir)
        model = load_causal_lm(out_dir)
        after = measure_effect(model, model_dir, eval_texts or [], cfg, prompt)

    size_before, size_after = weights_size_bytes(model_dir), weights_size_bytes(out_dir)
    effect = _effect(before, after)
    quality_ok, note = _quality_note(effect, cfg)
    verdict = (f"{len(jobs)} matrices as {k}-entry codebooks with {4 if packed else 8}-bit indices: files "
               f"x{size_after / size_before:.3f}, {note}; decode speed is unchanged by design (the runtime "
               f"expands codebooks to fp32 weights at load), so it can pay in storage and transfer only")
    result = {
        "clustered": len(jobs),
        "clusters": k,
        "index_bits": 4 if packed else 8,
        "embeddings_clustered": any(p.get("embedding") for _, _, p in jobs),
        "lm_head_tied": tied_head is not None,
        "size_bytes_before": size_before,
        "size_bytes_after": size_after,
        "size_ratio": round(size_after / size_before, 4),
        "mean_rel_error": round(float(np.mean(errors)), 5) if errors else None,
        "before": before,
        "after": after,
        "effect": effect,
        "pays": size_after < size_before and quality_ok,
        "verdict": verdict,
        "seconds": round(time.time() - started, 2),
    }
    (out_dir / SHARING_RESULT).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
    log.info("weight_sharing: %s", verdict)
    return result


def _run_lowrank(cfg: LowRankConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    return lowrank(cfg, src, out, ctx.texts("calib"), ctx.texts("eval"))


def _run_sharing(cfg: WeightSharingConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    return weight_sharing(cfg, src, out, ctx.texts("eval"))


TECHNIQUES = [
    Technique("lowrank", stage="compress", config=LowRankConfig, run=_run_lowrank, kinds=("causal_lm",),
              description="activation-aware SVD factorization of linear layers, kept where smaller and faster"),
    Technique("weight_sharing", stage="compress", config=WeightSharingConfig, run=_run_sharing, kinds=("causal_lm",),
              description="k-means weight clustering: per-matrix codebooks with 8- or 4-bit indices"),
]
