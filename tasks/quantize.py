"""Dynamic INT8 quantization of a trimflow ONNX export, checked against the fp32 export.

Weights of MatMuls (and, optionally, the embedding table) become int8; activations are
quantized per tensor at run time. MatMuls whose input activations carry outliers far above
their bulk (the "massive activations" of LLM MLPs) stay fp32, because a per-tensor scale set
by one outlier rounds every other value to zero. Afterwards next-token top-1 agreement with
the fp32 export on probe windows must reach ``min_top1_agreement``, else ``ExportMismatch``.

    result = quantize_dynamic_int8(QuantizeConfig(), onnx_dir, out_dir)
    result["top1_agreement"], result["size_bytes"]        # out_dir/model.int8.onnx + tokenizer + meta
    lm = OnnxCausalLM(out_dir)                             # the meta points at the int8 file
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.technique import Technique
from tasks.config import QuantizeConfig
from tasks.errors import ConfigError, ExportMismatch, SourceError
from tasks.builtin_texts import BUILTIN_TEXTS
from tasks.modelio import available_cores

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
META = "trimflow_model.json"
_REPORTED_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear", "MatMul", "Gather")


def quantize_dynamic_int8(cfg: QuantizeConfig, onnx_dir: Path, out_dir: Path,
                          probe_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Quantize ``onnx_dir``'s export to ``out_dir/model.int8.onnx`` and prove it still agrees.

    Args:
        cfg: weight type, per-channel scales, reduce-range, embedding quantization, outlier limit,
            probe size and the agreement threshold.
        onnx_dir: a ``tasks.export`` folder (ONNX file, ``trimflow_model.json``, tokenizer).
        out_dir: receives ``model.int8.onnx``, the tokenizer and config files and a
            ``trimflow_model.json`` whose ``onnx_file`` names the int8 file.
        probe_texts: texts cut into probe windows for the outlier scan and the agreement check
            (default ``None``: ``tasks.builtin_texts.BUILTIN_TEXTS``; pass the calibration split when available).

    Returns:
        ``onnx_file``, ``size_bytes``, ``size_bytes_before``, ``size_ratio``, ``op_counts`` (of the
        int8 graph), ``quantized_matmuls``, ``fp32_matmuls``, ``outlier_nodes`` (kept fp32, with
        their max/p99.9 ratio), ``embeddings_quantized``, ``top1_agreement``,
        ``mean_abs_logit_diff``, ``max_abs_logit_diff``, ``probe_ppl_fp32`` and ``probe_ppl_int8``
        (perplexity on the probe windows), ``probe_tokens``, ``probe_source`` (``caller`` or
        ``builtin``), ``weight_type``, ``per_channel``, ``reduce_range``, ``quantize_seconds``,
        ``seconds``.

    Raises:
        SourceError: ``onnx_dir`` is not a trimflow export.
        ConfigError: the probe texts are too short for ``probe_windows`` × ``probe_len`` tokens.
        ExportMismatch: top-1 agreement with the fp32 export is below ``cfg.min_top1_agreement``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from serving.runtime.generator import OnnxCausalLM

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    started = time.time()
    meta_path = onnx_dir / META
    if not meta_path.is_file():
        raise SourceError(f"{onnx_dir} is not a trimflow ONNX export (no {META})")
    meta = json.loads(meta_path.read_text())
    src = onnx_dir / meta.get("onnx_file", "model.onnx")
    if not src.is_file():
        raise SourceError(f"{src} named in {meta_path} does not exist")
    threads = available_cores()
    ref = OnnxCausalLM(onnx_dir, threads=threads)
    windows = probe_windows(ref, probe_texts or BUILTIN_TEXTS, cfg.probe_windows, cfg.probe_len)

    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    del model
    outliers = {}
    if cfg.max_activation_outlier > 0:
        ratios = activation_outlier_ratios(src, windows, matmuls, ref.empty_past(1), threads)
        outliers = {name: round(r, 1) for name, r in ratios.items() if r > cfg.max_activation_outlier}
        log.info("quantize: %d of %d MatMuls stay fp32 (input max/p99.9 > %g): %s", len(outliers), len(matmuls),
                 cfg.max_activation_outlier, outliers)

    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / INT8_FILE
    t0 = time.time()
    quantize_dynamic(src, dst,
                     op_types_to_quantize=["MatMul"] + (["Gather"] if cfg.quantize_embeddings else []),
                     per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                     weight_type=QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8,
                     nodes_to_exclude=sorted(outliers),
                     use_external_data_format=src.stat().st_size > 1_800_000_000)
    quantize_seconds = time.time() - t0
    for f in onnx_dir.iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".data")) and f.name != META:
            shutil.copy2(f, out_dir / f.name)
    (out_dir / META).write_text(json.dumps(meta | {"onnx_file": INT8_FILE}, indent=2))

    q = OnnxCausalLM(out_dir, threads=threads)
    cmp = compare_logits(ref, q, windows)
    agreement, mean_diff, max_diff = cmp["top1_agreement"], cmp["mean_abs_logit_diff"], cmp["max_abs_logit_diff"]
    counts = op_counts(dst)
    size_before, size_after = _onnx_bytes(src), _onnx_bytes(dst)
    result = {
        "onnx_file": INT8_FILE,
        "size_bytes": size_after,
        "size_bytes_before": size_before,
        "size_ratio": round(size_after / size_before, 4),
        "op_counts": counts,
        "quantized_matmuls": counts.get("MatMulInteger", 0),
        "fp32_matmuls": len(matmuls) - counts.get("MatMulInteger", 0),
        "outlier_nodes": outliers,
        "embeddings_quantized": counts.get("DequantizeLinear", 0) > 0,
        "top1_agreement": round(agreement, 4),
        "mean_abs_logit_diff": round(mean_diff, 4),
        "max_abs_logit_diff": round(max_diff, 4),
        "probe_ppl_fp32": round(cmp["probe_ppl_ref"], 3),
        "probe_ppl_int8": round(cmp["probe_ppl_cand"], 3),
        "probe_tokens": int(windows.size),
        "probe_source": "caller" if probe_texts else "builtin",
        "weight_type": cfg.weight_type,
        "per_channel": cfg.per_channel,
        "reduce_range": cfg.reduce_range,
        "quantize_seconds": round(quantize_seconds, 2),
        "seconds": round(time.time() - started, 2),
    }
    if agreement < cfg.min_top1_agreement:
        raise ExportMismatch(
            f"INT8 model {dst} agrees with the fp32 export {src} on only {agreement:.1%} of next-token argmaxes "
            f"over {windows.size} probe tokens (required {cfg.min_top1_agreement:.1%}); mean |logit diff| "
            f"{mean_diff:.3g}, max {max_diff:.3g}; probe perplexity {cmp['probe_ppl_ref']:.4g} -> "
            f"{cmp['probe_ppl_cand']:.4g}; {len(outliers)} outlier MatMuls kept fp32, "
            f"weight_type={cfg.weight_type} per_channel={cfg.per_channel} reduce_range={cfg.reduce_range}. "
            "Lower quantize.max_activation_outlier to keep more MatMuls fp32, or set reduce_range on CPUs "
            "without VNNI")
    log.info("quantize: %.1f MB -> %.1f MB, top-1 agreement %.3f, mean |diff| %.3f", size_before / 1e6,
             size_after / 1e6, agreement, mean_diff)
    return result


def probe_windows(lm, texts: Sequence[str], n: int, length: int) -> np.ndarray:
    """``[n, length]`` int64 token windows cut from ``texts`` joined by EOS (tokenizer of ``lm``).

    Raises:
        ConfigError: the texts hold fewer than ``n * length`` tokens.
    """
    eos = lm.meta.eos_token_ids[:1]
    stream: list[int] = []
    for t in texts:
        stream += lm.encode(t) + list(eos)
        if len(stream) >= n * length:
            break
    if len(stream) < n * length:
        raise ConfigError("quantize.probe_windows", n,
                          f"probe texts hold {len(stream)} tokens, fewer than {n} windows of {length}")
    return np.asarray(stream[: n * length], np.int64).reshape(n, length)


def activation_outlier_ratios(onnx_path: Path, windows: np.ndarray, matmuls: Sequence[Any],
                              empty_past: Sequence[np.ndarray], threads: int) -> dict[str, float]:
    """``max|x| / p99.9(|x|)`` of each MatMul's input activation over the probe windows, by node name.

    The max is over all windows, the 99.9th percentile is the median of the per-window ones. The
    graph is run once per window with those activations added as outputs; ``empty_past`` is the
    batch-1 empty KV cache of the export (``OnnxCausalLM.empty_past(1)``).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    by_input: dict[str, list[str]] = collections.defaultdict(list)
    for node in matmuls:
        by_input[node.input[0]].append(node.name)
    known = {o.name for o in model.graph.output}
    for name in by_input:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Fusions could remove the tensors asked for; only basic rewrites keep every name.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model
    wanted = list(by_input)
    maxes = {k: 0.0 for k in wanted}
    bulk: dict[str, list[float]] = {k: [] for k in wanted}
    for row in windows:
        s = len(row)
        feed = {"input_ids": row[None], "attention_mask": np.ones((1, s), np.int64),
                "position_ids": np.arange(s, dtype=np.int64)[None]}
        for i in range(len(empty_past) // 2):
            feed[f"past_key_values.{i}.key"] = empty_past[2 * i]
            feed[f"past_key_values.{i}.value"] = empty_past[2 * i + 1]
        for name, value in zip(wanted, sess.run(wanted, feed)):
            a = np.abs(value.astype(np.float32)).ravel()
            maxes[name] = max(maxes[name], float(a.max()))
            bulk[name].append(float(np.quantile(a, 0.999)))
    out = {}
    for name, nodes in by_input.items():
        ratio = maxes[name] / max(float(np.median(bulk[name])), 1e-12)
        for node in nodes:
            out[node] = ratio
    return out


def compare_logits(ref, cand, windows: np.ndarray) -> dict[str, float]:
    """How two ``OnnxCausalLM`` differ on the probe windows.

    Returns:
        ``top1_agreement`` (share of positions with the same argmax), ``mean_abs_logit_diff``,
        ``max_abs_logit_diff``, and ``probe_ppl_ref`` / ``probe_ppl_cand`` (perplexity of each on the
        windows' own next tokens, to show what the disagreement costs).
    """
    from tasks.evaluate import token_nll

    agree, diffs, worst, nll_ref, nll_cand = [], [], 0.0, [], []
    for row in windows:
        a, b = ref.logits(row[None])[0], cand.logits(row[None])[0]
        agree.append(a.argmax(-1) == b.argmax(-1))
        d = np.abs(a - b)
        diffs.append(float(d.mean()))
        worst = max(worst, float(d.max()))
        nll_ref.append(token_nll(a, row))
        nll_cand.append(token_nll(b, row))
    return {
        "top1_agreement": float(np.concatenate(agree).mean()),
        "mean_abs_logit_diff": float(np.mean(diffs)),
        "max_abs_logit_diff": worst,
        "probe_ppl_ref": float(np.exp(np.concatenate(nll_ref).mean())),
        "probe_ppl_cand": float(np.exp(np.concatenate(nll_cand).mean())),
    }


def op_counts(onnx_path: Path) -> dict[str, int]:
    """Node counts of the op types that show what quantization did."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    c = collections.Counter(n.op_type for n in model.graph.node)
    return {op: int(c.get(op, 0)) for op in _REPORTED_OPS}


def _onnx_bytes(path: Path) -> int:
    """The ONNX file plus any external-data file beside it that shares its name."""
    extra = [p for p in path.parent.glob(path.name + "*") if p != path and p.is_file()]
    return path.stat().st_size + sum(p.stat().st_size for p in extra)


def _run(cfg: QuantizeConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    return quantize_dynamic_int8(cfg, src, out, probe_texts=ctx.texts("calib"))


TECHNIQUES = [Technique("quantize_dynamic_int8", stage="quantize", config=QuantizeConfig, run=_run,
                        kinds=("causal_lm",), consumes="onnx", produces="onnx",
                        description="ONNX Runtime dynamic INT8 with outlier-aware exclusions")]
