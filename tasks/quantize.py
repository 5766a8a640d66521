"""Quantization of a trimflow ONNX export, each variant checked loudly against the fp32 export.

Techniques (all consume and produce a trimflow ONNX folder; ``OnnxCausalLM`` drives every output):
``quantize_dynamic_int8`` (MatMulInteger, activations quantized at run time), ``quantize_static_int8``
(QDQ with activation ranges calibrated on the calibration split), ``quantize_int4`` (weight-only
MatMulNBits, token table as GatherBlockQuantized shared with a tied output projection) and
``convert_fp16`` (for GPU targets). After each, next-token top-1 agreement with the fp32 export on
probe windows must reach ``min_top1_agreement``, else ``ExportMismatch``. Optionally a sensitivity
pass keeps the MatMuls whose quantization hurts most in fp32 until ``max_ppl_increase`` holds.

    result = quantize_dynamic_int8(DynamicInt8Config(), onnx_dir, out_dir, probe_texts=calib)
    result = quantize_int4(Int4Config(), onnx_dir, out_dir, probe_texts=calib)
    rows = sweep_dynamic_int8(onnx_dir, work_dir, calib)      # weight type x per-channel x reduce-range
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator

from tasks.builtin_texts import BUILTIN_TEXTS
from tasks.config import QuantizeConfig, _Frozen
from tasks.errors import ConfigError, ExportMismatch, SourceError
from tasks.modelio import available_cores
from tasks.technique import Technique

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
QDQ_FILE = "model.qdq.onnx"
INT4_FILE = "model.int4.onnx"
FP16_FILE = "model.fp16.onnx"
META = "trimflow_model.json"
RECORD = "trimflow_quantize.json"
_REPORTED_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulNBits",
                 "GatherBlockQuantized", "MatMul", "Gather", "Cast", "Split")
# protobuf refuses to serialize a single message above 2 GiB; larger graphs keep weights beside them.
_EXTERNAL_DATA_BYTES = 1_800_000_000
_MASK_INPUT = "trimflow_quantized_mask"


# -- configs ----------------------------------------------------------------------------------------
class SensitivityFields(_Frozen):
    """Per-layer sensitivity pass, shared by the INT8 and INT4 configs.

    Args:
        max_ppl_increase: largest allowed relative increase of probe perplexity over the fp32 export
            (``0.05`` = +5%). When set, MatMuls are ranked by the damage quantizing each alone does
            (KL divergence from fp32 on the first ``sensitivity_windows`` probe windows) and the most
            sensitive are kept fp32 until the target holds on the real quantized model (default None:
            no pass).
        sensitivity_windows: probe windows the ranking runs on; the target is checked on all
            ``probe_windows`` (default 2: one ranking evaluation per MatMul, 211 on SmolLM2-135M).
        sensitivity_granularity: rank single MatMuls (``matmul``) or whole decoder layers (``layer``,
            fewer evaluations, more kept weights) (default matmul).
        sensitivity_rank: keep groups in order of their damage (``damage``) or of damage per fp32
            weight kept (``damage_per_weight``) (default damage_per_weight: on SmolLM2-135M dynamic
            INT8 the second most damaging MatMul is the 28M-weight output projection, whose fp32 copy
            alone is 113 MB, while a 0.9M-weight MLP projection buys more perplexity back per MB).
    """

    max_ppl_increase: float | None = Field(None, gt=0)
    sensitivity_windows: int = Field(2, ge=1)
    sensitivity_granularity: Literal["matmul", "layer"] = "matmul"
    sensitivity_rank: Literal["damage", "damage_per_weight"] = "damage_per_weight"


class DynamicInt8Config(QuantizeConfig, SensitivityFields):
    """``QuantizeConfig`` (weight type, per-channel, reduce-range, outliers, probe) plus the sensitivity pass."""


class StaticInt8Config(SensitivityFields):
    """Static QDQ INT8: weights and activations int8, activation ranges calibrated once.

    Args:
        calibrate_method: how activation ranges are set from the calibration windows: ``minmax``,
            ``entropy`` (KL-optimal threshold over a 2048-bin histogram) or ``percentile`` (default
            percentile). Ranges are computed once and reused when the sensitivity pass re-quantizes.
            SmolLM2-135M, 2048 calibration tokens, 512 probe tokens: percentile +14.0% probe
            perplexity (0.73 top-1 agreement), minmax +16.0% (0.75), entropy +1876% (0.21: it clips
            the large activations the model relies on, and its threshold search took 17 min).
        percentile: the percentile kept by ``percentile`` calibration (default 99.999).
        calib_windows / calib_len: calibration windows and tokens per window, cut from the
            calibration split after the probe windows (defaults 16 / 128).
        per_channel: per-output-channel weight scales (default True).
        reduce_range: 7-bit weights, needed on x86 without VNNI (see ``QuantizeConfig``) (default True).
        activation_type / weight_type: ``quint8`` or ``qint8`` (defaults quint8 / qint8).
        quantize_embeddings: also store the token table as int8 in blocks of 32 along the hidden size
            (GatherBlockQuantized, one row dequantized per token; QDQ's own DequantizeLinear before
            the Gather would dequantize the whole table every step) (default True).
        max_activation_outlier: MatMuls whose input max/p99.9 exceeds this stay fp32, as in dynamic
            INT8; a static per-tensor scale suffers from outliers at least as much (default 8; 0 = none).
        min_top1_agreement: required next-token agreement with the fp32 export (default 0.7).
        probe_windows / probe_len: probe windows for the outlier scan and the check (defaults 8 / 64).
    """

    calibrate_method: Literal["minmax", "entropy", "percentile"] = "percentile"
    percentile: float = Field(99.999, gt=50, le=100)
    calib_windows: int = Field(16, ge=1)
    calib_len: int = Field(128, ge=2)
    per_channel: bool = True
    reduce_range: bool = True
    activation_type: Literal["quint8", "qint8"] = "quint8"
    weight_type: Literal["qint8", "quint8"] = "qint8"
    quantize_embeddings: bool = True
    max_activation_outlier: float = Field(8.0, ge=0)
    min_top1_agreement: float = Field(0.7, ge=0, le=1)
    probe_windows: int = Field(8, ge=1)
    probe_len: int = Field(64, ge=2)


class Int4Config(SensitivityFields):
    """Weight-only 4-bit MatMuls (``com.microsoft.MatMulNBits``), activations stay fp32.

    Args:
        block_size: weights per scale along the input dimension K; a power of two >= 16 (default 32,
            the GGUF block).
        scheme: how blocks map to 4-bit codes (default minmax_corrected):
            ``asym``: uint4 with an integer zero point, the range widened to include 0 (ORT's
            MatMulNBitsQuantizer rule); ``sym``: int4 around 0 (ORT's rule); ``minmax_float_zp``: each
            block's exact min and max with a float zero point, which is the GGUF Q4_1 grid and so
            reproduces a Q4_1-derived model bit for bit, but onnxruntime's CPU kernel has no fast
            path for float zero points (~20x slower than fp32 MatMul; for GPU targets);
            ``minmax_corrected``: the same min/max grid run on the fast kernel path, the codes
            with the kernel's default zero point 8 and the remainder ``(8 - zp) * scale`` as one fp32
            value per block applied to the input's block sums (a small MatMul + Add): the same
            weights as ``minmax_float_zp`` and the same size, at INT4 kernel speed.
            SmolLM2-135M (a Q4_1 GGUF dequantized to fp32), 512 calibration-split probe tokens:
            minmax_corrected +0.6% probe perplexity (0.94 top-1 agreement, every weight reproduced),
            sym +16.6% (0.65), asym +24.5% (0.67): requantizing a Q4_1 grid with an integer zero
            point moves every block.
        accuracy_level: MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
            per block (default 4: the only fast path on AVX2 without VNNI; there level 0 runs 4-bit
            ~3x and 8-bit ~80x slower than an fp32 MatMul, and level 4 costs SmolLM2 +0.6% probe
            perplexity against level 0's exact +0.0%).
        fuse_projections: MatMulNBits nodes that read the same input (q/k/v, gate/up) become one node
            and a Split, the same weights concatenated along N; per-node overhead dominates CPU decode
            of a 135M model, so fewer, wider kernels decode faster (default True).
        embedding_bits: bits of the token table (GatherBlockQuantized, blocks along the hidden size)
            and of the output projection; a tied projection shares the table's tensors instead of a
            second copy. 8 is symmetric (GGUF Q8_0, so SmolLM2's table is reproduced exactly), 4
            follows ``scheme`` with an integer zero point, 0 keeps both fp32 (default 8). A hidden
            size that is not a multiple of ``block_size`` keeps both fp32 and the result says so.
        min_top1_agreement: required next-token agreement with the fp32 export (default 0.7).
        probe_windows / probe_len: probe windows for the check and the sensitivity pass (defaults 8 / 64).
    """

    block_size: int = 32
    scheme: Literal["asym", "sym", "minmax_float_zp", "minmax_corrected"] = "minmax_corrected"
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    fuse_projections: bool = True
    embedding_bits: Literal[0, 4, 8] = 8
    min_top1_agreement: float = Field(0.7, ge=0, le=1)
    probe_windows: int = Field(8, ge=1)
    probe_len: int = Field(64, ge=2)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("must be a power of two >= 16 (MatMulNBits and GatherBlockQuantized)")
        return v


class Fp16Config(_Frozen):
    """FP16 weights, activations and KV cache, for GPU targets.

    Args:
        keep_logits_fp32: the ``logits`` output stays float32 (a Cast at the end) so sampling and
            perplexity see the same dtype as every other export (default True).
        fp32_ops: op types left in fp32 with Casts around them (default: none besides the
            converter's own block list).
        min_top1_agreement: required next-token agreement with the fp32 export (default 0.9; fp16
            rounding flips few argmaxes).
        require_cpu_run: when onnxruntime's CPU provider cannot run the fp16 graph, fail instead of
            validating the graph only (default False: fp16 is meant for GPUs).
        probe_windows / probe_len: probe windows for the check (defaults 4 / 64).
    """

    keep_logits_fp32: bool = True
    fp32_ops: tuple[str, ...] = ()
    min_top1_agreement: float = Field(0.9, ge=0, le=1)
    require_cpu_run: bool = False
    probe_windows: int = Field(4, ge=1)
    probe_len: int = Field(64, ge=2)


# -- shared pieces ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Export:
    folder: Path
    meta: dict[str, Any]
    path: Path


def _read_export(onnx_dir: Path) -> _Export:
    """The ONNX file and metadata of a trimflow export; raises ``SourceError`` when it is not one."""
    onnx_dir = Path(onnx_dir)
    meta_path = onnx_dir / META
    if not meta_path.is_file():
        raise SourceError(f"{onnx_dir} is not a trimflow ONNX export (no {META})")
    meta = json.loads(meta_path.read_text())
    src = onnx_dir / meta.get("onnx_file", "model.onnx")
    if not src.is_file():
        raise SourceError(f"{src} named in {meta_path} does not exist")
    return _Export(onnx_dir, meta, src)


def _publish(src: _Export, out_dir: Path, onnx_file: str, **meta: Any) -> None:
    """Copy the tokenizer/config files beside the new graph and point the metadata at it."""
    for f in src.folder.iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".data")) and f.name not in (META, RECORD):
            shutil.copy2(f, out_dir / f.name)
    (out_dir / META).write_text(json.dumps(src.meta | {"onnx_file": onnx_file} | meta, indent=2))


def _record(out_dir: Path, technique: str, cfg: _Frozen, result: dict[str, Any]) -> None:
    """The config that made the artifact, beside it, with the result."""
    (out_dir / RECORD).write_text(json.dumps({"technique": technique, "config": cfg.model_dump(mode="json"),
                                              "result": result}, indent=2))


def _save(model, path: Path) -> None:
    import onnx

    if model.ByteSize() > _EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def weight_matmuls(model) -> list[Any]:
    """MatMul nodes whose second input is a 2-D initializer (the layers' weights, not attention)."""
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and dims.get(n.input[1]) == 2]


def token_windows(lm, texts: Sequence[str], n: int, length: int, skip: int = 0,
                  where: str = "quantize.probe_windows") -> np.ndarray:
    """``[n, length]`` int64 windows of ``texts`` joined by EOS (tokenizer of ``lm``), after ``skip`` tokens.

    Raises:
        ConfigError: the texts hold fewer than ``skip + n * length`` tokens (``where`` names the field).
    """
    eos = lm.meta.eos_token_ids[:1]
    need = skip + n * length
    stream: list[int] = []
    for t in texts:
        stream += lm.encode(t) + list(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ConfigError(where, n, f"the texts hold {len(stream)} tokens, fewer than {n} windows of {length}"
                                    + (f" after {skip} probe tokens" if skip else ""))
    return np.asarray(stream[skip:need], np.int64).reshape(n, length)


def probe_windows(lm, texts: Sequence[str], n: int, length: int) -> np.ndarray:
    """``[n, length]`` int64 token windows cut from ``texts`` joined by EOS (tokenizer of ``lm``).

    Raises:
        ConfigError: the texts hold fewer than ``n * length`` tokens.
    """
    return token_windows(lm, texts, n, length)


def _prefill_feed(row: np.ndarray, empty_past: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs of a batch-1 prefill of ``row`` with an empty KV cache (the export's contract)."""
    s = len(row)
    feed = {"input_ids": row[None].astype(np.int64), "attention_mask": np.ones((1, s), np.int64),
            "position_ids": np.arange(s, dtype=np.int64)[None]}
    for i in range(len(empty_past) // 2):
        feed[f"past_key_values.{i}.key"] = empty_past[2 * i]
        feed[f"past_key_values.{i}.value"] = empty_past[2 * i + 1]
    return feed


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
    sess = _session(model, opts)
    del model
    wanted = list(by_input)
    maxes = {k: 0.0 for k in wanted}
    bulk: dict[str, list[float]] = {k: [] for k in wanted}
    for row in windows:
        for name, value in zip(wanted, sess.run(wanted, _prefill_feed(row, empty_past))):
            a = np.abs(value.astype(np.float32)).ravel()
            maxes[name] = max(maxes[name], float(a.max()))
            bulk[name].append(float(np.quantile(a, 0.999)))
    out = {}
    for name, nodes in by_input.items():
        ratio = maxes[name] / max(float(np.median(bulk[name])), 1e-12)
        for node in nodes:
            out[node] = ratio
    return out


def _session(model, opts):
    """An onnxruntime CPU session of an in-memory model, through a temp file when it is too big to serialize."""
    import onnxruntime as ort

    if model.ByteSize() <= _EXTERNAL_DATA_BYTES:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="trimflow-q-") as tmp:
        path = Path(tmp) / "model.onnx"
        _save(model, path)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


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
        a = ref.logits(row[None])[0].astype(np.float32)
        b = cand.logits(row[None])[0].astype(np.float32)
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


def _check(cmp: dict[str, float], windows: np.ndarray, min_agreement: float, what: str, dst: Path, src: Path,
           hint: str) -> None:
    """Raise ``ExportMismatch`` with the evidence when the candidate disagrees too often with fp32."""
    if cmp["top1_agreement"] < min_agreement:
        raise ExportMismatch(
            f"{what} model {dst} agrees with the fp32 export {src} on only {cmp['top1_agreement']:.1%} of "
            f"next-token argmaxes over {windows.size} probe tokens (required {min_agreement:.1%}); mean |logit "
            f"diff| {cmp['mean_abs_logit_diff']:.3g}, max {cmp['max_abs_logit_diff']:.3g}; probe perplexity "
            f"{cmp['probe_ppl_ref']:.4g} -> {cmp['probe_ppl_cand']:.4g}. {hint}")


def _quality(cmp: dict[str, float], windows: np.ndarray) -> dict[str, Any]:
    return {
        "top1_agreement": round(cmp["top1_agreement"], 4),
        "mean_abs_logit_diff": round(cmp["mean_abs_logit_diff"], 4),
        "max_abs_logit_diff": round(cmp["max_abs_logit_diff"], 4),
        "probe_ppl_fp32": round(cmp["probe_ppl_ref"], 3),
        "probe_ppl_quant": round(cmp["probe_ppl_cand"], 3),
        "probe_ppl_increase": round(cmp["probe_ppl_cand"] / cmp["probe_ppl_ref"] - 1, 4),
        "probe_tokens": int(windows.size),
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


def _outliers(limit: float, src: Path, windows: np.ndarray, matmuls: Sequence[Any], ref, threads: int) -> dict:
    if limit <= 0:
        return {}
    ratios = activation_outlier_ratios(src, windows, matmuls, ref.empty_past(1), threads)
    found = {name: round(r, 1) for name, r in ratios.items() if r > limit}
    log.info("quantize: %d of %d MatMuls stay fp32 (input max/p99.9 > %g): %s", len(found), len(matmuls), limit,
             found)
    return found


# -- sensitivity ------------------------------------------------------------------------------------
class _Hybrid:
    """One session over the fp32 and the quantized graph at once: a mask input picks, per MatMul,
    whether its quantized or its fp32 result flows on.

    Every chosen MatMul of the quantized graph gets an fp32 twin reading the same (mixed) input, and
    a ``Where`` on ``mask[i]`` selects between them, so any subset of quantized MatMuls is one run of
    one session: the ranking needs no re-quantization and no new session per candidate.
    """

    def __init__(self, fp32_path: Path, quant_path: Path, names: Sequence[str], threads: int) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        fp32 = onnx.load(str(fp32_path))
        f_nodes = {n.name: n for n in fp32.graph.node}
        f_inits = {i.name: i for i in fp32.graph.initializer}
        quant = onnx.load(str(quant_path))
        wanted = {f_nodes[name].output[0]: i for i, name in enumerate(names)}
        nodes = []
        for node in quant.graph.node:
            hits = [(k, o) for k, o in enumerate(node.output) if o in wanted]
            nodes.append(node)
            for k, y in hits:  # several when merged projections end in one Split
                i = wanted[y]
                twin = f_nodes[names[i]]
                node.output[k] = y + "/quantized"
                weight = f"{twin.input[1]}/fp32"
                w = onnx.TensorProto()
                w.CopyFrom(f_inits[twin.input[1]])
                w.name = weight
                quant.graph.initializer.extend([w, numpy_helper.from_array(np.asarray(i, np.int64),
                                                                           f"{y}/mask_index")])
                nodes += [helper.make_node("MatMul", [twin.input[0], weight], [y + "/fp32"], name=f"{twin.name}/fp32"),
                          helper.make_node("Gather", [_MASK_INPUT, f"{y}/mask_index"], [y + "/flag"],
                                           name=f"{y}/flag"),
                          helper.make_node("Where", [y + "/flag", y + "/quantized", y + "/fp32"], [y],
                                           name=f"{y}/pick")]
        missing = set(wanted) - {n.output[0] for n in nodes if n.op_type == "Where"}
        if missing:
            raise ExportMismatch(f"sensitivity: no quantized node produces {sorted(missing)[:3]} in {quant_path}")
        del quant.graph.node[:]
        quant.graph.node.extend(nodes)
        quant.graph.input.append(helper.make_tensor_value_info(_MASK_INPUT, TensorProto.BOOL, [len(names)]))
        del fp32
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = _session(quant, opts)
        self.names = list(names)
        self.weights = [int(np.prod(f_inits[f_nodes[name].input[1]].dims)) for name in names]

    def logprobs(self, windows: np.ndarray, mask: np.ndarray, empty_past: Sequence[np.ndarray]) -> np.ndarray:
        """Log-softmax of the logits [W, S, V] with MatMul ``i`` quantized where ``mask[i]``."""
        out = []
        for row in windows:
            feed = _prefill_feed(row, empty_past) | {_MASK_INPUT: mask}
            z = self.session.run(["logits"], feed)[0][0].astype(np.float64)
            z -= z.max(-1, keepdims=True)
            out.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
        return np.stack(out)


def _ppl(logprobs: np.ndarray, windows: np.ndarray) -> float:
    nll = [-lp[np.arange(len(row) - 1), row[1:]] for lp, row in zip(logprobs, windows)]
    return float(np.exp(np.concatenate(nll).mean()))


def _why(r: dict[str, Any], rank: int, of: int) -> str:
    return (f"rank {rank} of {of}: quantized alone it adds KL {r['kl']:.3g} ({r['ppl_increase']:+.2%} probe "
            f"perplexity) for {r['weights'] / 1e6:.2f}M weights")


def _groups(names: Sequence[str], granularity: str) -> dict[str, list[int]]:
    if granularity == "matmul":
        return {n: [i] for i, n in enumerate(names)}
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, n in enumerate(names):
        m = re.search(r"layers\.(\d+)[./]", n)
        groups[f"layer {m.group(1)}" if m else n].append(i)
    return dict(groups)


def sensitivity_pass(fp32_path: Path, quant_path: Path, names: Sequence[str], windows: np.ndarray,
                     empty_past: Sequence[np.ndarray], max_ppl_increase: float, rank_windows: int = 2,
                     granularity: str = "matmul", threads: int = 2, ppl_fp32: float | None = None,
                     rank: str = "damage_per_weight") -> dict[str, Any]:
    """Rank quantized MatMuls by the damage each does alone, then keep the worst fp32 until the target holds.

    Args:
        fp32_path / quant_path: the fp32 export and the same graph with ``names`` quantized.
        names: MatMul node names (of the fp32 graph) that are quantized in ``quant_path``.
        windows: probe windows; the first ``rank_windows`` rank, all of them check the target.
        empty_past: batch-1 empty KV cache of the export.
        max_ppl_increase: allowed relative probe-perplexity increase over fp32 (e.g. 0.05).
        rank_windows: windows used for the ranking (default 2).
        granularity: ``matmul`` or ``layer`` (all MatMuls of one decoder layer together) (default matmul).
        threads: onnxruntime intra-op threads (default 2).
        ppl_fp32: probe perplexity of the true fp32 export, the base of every increase (default None:
            the mixed graph with every candidate fp32, which still holds quantized non-candidates
            such as an int8 token table).
        rank: order in which groups are kept: ``damage`` (KL alone) or ``damage_per_weight`` (KL per
            fp32 weight the group keeps) (default damage_per_weight).

    Returns:
        ``ranking`` (every group, worst first, with ``kl`` and ``ppl_increase`` when quantized alone),
        ``keep_fp32`` (MatMul names to exclude), ``kept_groups``, ``trace`` (``kept``/``ppl_increase``
        for each count tried), ``ppl_fp32``, ``ppl_increase_all_quantized``, ``predicted_ppl_increase``,
        ``target_met`` (as predicted by the mixed graph), ``evaluations``, ``seconds``.
    """
    started = time.time()
    hybrid = _Hybrid(fp32_path, quant_path, names, threads)
    n = len(names)
    evaluations = 0

    def run(mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        return hybrid.logprobs(rows, mask, empty_past)

    rank_rows = windows[:rank_windows]
    ref_all = run(np.zeros(n, bool), windows)
    ref_rank = ref_all[:rank_windows]
    ppl_fp32 = ppl_fp32 or _ppl(ref_all, windows)
    p_ref = np.exp(ref_rank)
    groups = _groups(names, granularity)
    ranking = []
    for done, (group, idx) in enumerate(groups.items()):
        if done % 50 == 0:
            log.info("sensitivity: ranking %d/%d groups (%.0f s)", done, len(groups), time.time() - started)
        mask = np.zeros(n, bool)
        mask[idx] = True
        lp = run(mask, rank_rows)
        kl = float((p_ref * (ref_rank - lp)).sum(-1).mean())
        ranking.append({"group": group, "matmuls": [names[i] for i in idx], "kl": round(kl, 6),
                        "weights": int(sum(hybrid.weights[i] for i in idx)),
                        "ppl_increase": round(_ppl(lp, rank_rows) / _ppl(ref_rank, rank_rows) - 1, 5)})
    if rank == "damage":
        ranking.sort(key=lambda r: -r["kl"])
    else:
        ranking.sort(key=lambda r: -r["kl"] / max(r["weights"], 1))

    cache: dict[int, float] = {}

    def increase(k: int) -> float:
        if k not in cache:
            mask = np.ones(n, bool)
            for r in ranking[:k]:
                mask[[names.index(m) for m in r["matmuls"]]] = False
            cache[k] = _ppl(run(mask, windows), windows) / ppl_fp32 - 1
        return cache[k]

    # Exponential then binary search for the fewest kept groups; damage is close to monotone in k.
    lo, hi = 0, 1
    if increase(0) > max_ppl_increase:
        while hi < len(ranking) and increase(hi) > max_ppl_increase:
            lo, hi = hi, min(2 * hi, len(ranking))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if increase(mid) <= max_ppl_increase else (mid, hi)
        k = hi
    else:
        k = 0
    kept = ranking[:k]
    for i, r in enumerate(kept, 1):
        r["why"] = _why(r, i, len(ranking))
    return {
        "ranking": ranking,
        "keep_fp32": [m for r in kept for m in r["matmuls"]],
        "kept_groups": [{"group": r["group"], "why": r["why"]} for r in kept],
        "trace": [{"kept": kk, "ppl_increase": round(v, 5)} for kk, v in sorted(cache.items())],
        "ppl_fp32": round(ppl_fp32, 4),
        "ppl_increase_all_quantized": round(cache[0], 5),
        "predicted_ppl_increase": round(increase(k), 5),
        "target_met": increase(k) <= max_ppl_increase,
        "max_ppl_increase": max_ppl_increase,
        "granularity": granularity,
        "evaluations": evaluations,
        "seconds": round(time.time() - started, 2),
    }


def _with_sensitivity(cfg: SensitivityFields, quantize: Callable[[set[str]], list[str]], src: Path, dst: Path,
                      windows: np.ndarray, ref, threads: int, excluded: set[str]) -> dict[str, Any] | None:
    """Run the sensitivity pass after a first quantization and re-quantize with the kept MatMuls fp32.

    ``quantize(excluded) -> quantized MatMul names`` writes ``dst``. The prediction of the mixed graph
    is then checked on the real graph; while it misses, the next-ranked groups are kept too (at most
    three more rounds), so ``target_met`` is a measurement, not a prediction.
    """
    if cfg.max_ppl_increase is None:
        return None
    from serving.runtime.generator import OnnxCausalLM

    from tasks.evaluate import token_nll

    names = quantize(excluded)
    ppl_fp32 = float(np.exp(np.concatenate([token_nll(ref.logits(row[None])[0], row) for row in windows]).mean()))
    sens = sensitivity_pass(src, dst, names, windows, ref.empty_past(1), cfg.max_ppl_increase,
                            cfg.sensitivity_windows, cfg.sensitivity_granularity, threads, ppl_fp32,
                            cfg.sensitivity_rank)
    ranking = sens.pop("ranking")
    k = len(sens["kept_groups"])
    rounds = []
    while True:
        keep = [m for r in ranking[:k] for m in r["matmuls"]]
        if keep:
            quantize(excluded | set(keep))
        cand = OnnxCausalLM(dst.parent, threads=threads, onnx_file=dst.name)
        cmp = compare_logits(ref, cand, windows)
        measured = cmp["probe_ppl_cand"] / cmp["probe_ppl_ref"] - 1
        rounds.append({"kept_groups": k, "kept_matmuls": len(keep), "measured_ppl_increase": round(measured, 5)})
        if measured <= cfg.max_ppl_increase or k >= len(ranking) or len(rounds) > 3:
            break
        k = min(len(ranking), max(k + 1, k + k // 2))
    kept = ranking[:k]
    for i, r in enumerate(kept, 1):
        r.setdefault("why", _why(r, i, len(ranking)))
    return sens | {
        "keep_fp32": [m for r in kept for m in r["matmuls"]],
        "kept_groups": [{"group": r["group"], "why": r["why"]} for r in kept],
        "rounds": rounds,
        "measured_ppl_increase": rounds[-1]["measured_ppl_increase"],
        "target_met": rounds[-1]["measured_ppl_increase"] <= cfg.max_ppl_increase,
        "ranking_top": ranking[:10],
    }


def _sensitivity_failure(sens: dict[str, Any] | None, what: str, dst: Path) -> None:
    if sens is not None and not sens["target_met"]:
        raise ExportMismatch(
            f"{what} model {dst}: probe perplexity rises {sens['measured_ppl_increase']:+.2%} over fp32 even with "
            f"{len(sens['keep_fp32'])} MatMuls kept fp32 (max_ppl_increase {sens['max_ppl_increase']:+.2%}); "
            f"tries: {sens['rounds']}. Raise max_ppl_increase or use a wider format")


# -- dynamic INT8 ------------------------------------------------------------------------------------
def quantize_dynamic_int8(cfg: QuantizeConfig, onnx_dir: Path, out_dir: Path,
                          probe_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Quantize ``onnx_dir``'s export to ``out_dir/model.int8.onnx`` and prove it still agrees.

    Args:
        cfg: weight type, per-channel scales, reduce-range, embedding quantization, outlier limit,
            probe size and the agreement threshold; a ``DynamicInt8Config`` adds the sensitivity pass.
        onnx_dir: a ``tasks.export`` folder (ONNX file, ``trimflow_model.json``, tokenizer).
        out_dir: receives ``model.int8.onnx``, the tokenizer and config files, a ``trimflow_model.json``
            whose ``onnx_file`` names the int8 file, and ``trimflow_quantize.json`` (config + result).
        probe_texts: texts cut into probe windows for the outlier scan and the agreement check
            (default ``None``: ``tasks.builtin_texts.BUILTIN_TEXTS``; pass the calibration split when available).

    Returns:
        ``onnx_file``, ``size_bytes``, ``size_bytes_before``, ``size_ratio``, ``op_counts`` (of the
        int8 graph), ``quantized_matmuls``, ``fp32_matmuls``, ``outlier_nodes`` (kept fp32, with
        their max/p99.9 ratio), ``embeddings_quantized``, ``top1_agreement``,
        ``mean_abs_logit_diff``, ``max_abs_logit_diff``, ``probe_ppl_fp32``, ``probe_ppl_int8`` (=
        ``probe_ppl_quant``), ``probe_ppl_increase``, ``probe_tokens``, ``probe_source`` (``caller``
        or ``builtin``), ``weight_type``, ``per_channel``, ``reduce_range``, ``sensitivity`` (None, or
        what the pass kept and why), ``quantize_seconds``, ``seconds``.

    Raises:
        SourceError: ``onnx_dir`` is not a trimflow export.
        ConfigError: the probe texts are too short for ``probe_windows`` × ``probe_len`` tokens.
        ExportMismatch: top-1 agreement with the fp32 export is below ``cfg.min_top1_agreement``, or
            the sensitivity pass could not meet ``max_ppl_increase``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from serving.runtime.generator import OnnxCausalLM

    started = time.time()
    src = _read_export(onnx_dir)
    out_dir = Path(out_dir)
    threads = available_cores()
    ref = OnnxCausalLM(src.folder, threads=threads)
    windows = probe_windows(ref, probe_texts or BUILTIN_TEXTS, cfg.probe_windows, cfg.probe_len)

    model = onnx.load(str(src.path), load_external_data=False)
    matmuls = weight_matmuls(model)
    del model
    outliers = _outliers(cfg.max_activation_outlier, src.path, windows, matmuls, ref, threads)

    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / INT8_FILE
    _publish(src, out_dir, INT8_FILE)
    seconds = {"quantize": 0.0}

    def quantize(excluded: set[str]) -> list[str]:
        t0 = time.time()
        quantize_dynamic(src.path, dst,
                         op_types_to_quantize=["MatMul"] + (["Gather"] if cfg.quantize_embeddings else []),
                         per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                         weight_type=QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8,
                         nodes_to_exclude=sorted(excluded),
                         use_external_data_format=src.path.stat().st_size > _EXTERNAL_DATA_BYTES)
        seconds["quantize"] += time.time() - t0
        return [n.name for n in matmuls if n.name not in excluded]

    sens = None
    if isinstance(cfg, SensitivityFields):
        sens = _with_sensitivity(cfg, quantize, src.path, dst, windows, ref, threads, set(outliers))
    if sens is None:
        quantize(set(outliers))

    cmp = compare_logits(ref, OnnxCausalLM(out_dir, threads=threads), windows)
    counts = op_counts(dst)
    size_before, size_after = _onnx_bytes(src.path), _onnx_bytes(dst)
    result = {
        "onnx_file": INT8_FILE,
        "size_bytes": size_after,
        "size_bytes_before": size_before,
        "size_ratio": round(size_after / size_before, 4),
        "op_counts": counts,
        "quantized_matmuls": counts["MatMulInteger"],
        "fp32_matmuls": len(matmuls) - counts["MatMulInteger"],
        "outlier_nodes": outliers,
        "embeddings_quantized": counts["DequantizeLinear"] > 0,
        **_quality(cmp, windows),
        "probe_ppl_int8": round(cmp["probe_ppl_cand"], 3),
        "probe_source": "caller" if probe_texts else "builtin",
        "weight_type": cfg.weight_type,
        "per_channel": cfg.per_channel,
        "reduce_range": cfg.reduce_range,
        "sensitivity": sens,
        "quantize_seconds": round(seconds["quantize"], 2),
        "seconds": round(time.time() - started, 2),
    }
    _record(out_dir, "quantize_dynamic_int8", cfg, result)
    _check(cmp, windows, cfg.min_top1_agreement, "INT8", dst, src.path,
           f"{len(outliers)} outlier MatMuls kept fp32, weight_type={cfg.weight_type} per_channel={cfg.per_channel} "
           f"reduce_range={cfg.reduce_range}. Lower quantize.max_activation_outlier to keep more MatMuls fp32, "
           "or set reduce_range on CPUs without VNNI")
    _sensitivity_failure(sens, "INT8", dst)
    log.info("quantize: %.1f MB -> %.1f MB, top-1 agreement %.3f, mean |diff| %.3f", size_before / 1e6,
             size_after / 1e6, cmp["top1_agreement"], cmp["mean_abs_logit_diff"])
    return result


def sweep_dynamic_int8(onnx_dir: Path, work_dir: Path, probe_texts: Sequence[str] | None = None,
                       base: QuantizeConfig | None = None,
                       grid: dict[str, Sequence[Any]] | None = None, speed_tokens: int = 16) -> list[dict[str, Any]]:
    """Measure every weight_type × per_channel × reduce_range combination of dynamic INT8.

    Each combination is quantized into its own folder under ``work_dir`` (no agreement threshold:
    failures are rows, not exceptions) and timed with a batch-1 greedy decode of ``speed_tokens``.

    Args:
        onnx_dir: the fp32 trimflow export.
        work_dir: scratch folder for the variants (kept, so a pick can be reused).
        probe_texts: probe texts (default ``None``: the built-in texts).
        base: settings other than the swept ones (default ``QuantizeConfig()``).
        grid: the swept values (default ``weight_type`` qint8/quint8, ``per_channel`` and
            ``reduce_range`` True/False).
        speed_tokens: tokens decoded for the speed column (default 16).

    Returns:
        One row per combination: the three settings, ``top1_agreement``, ``probe_ppl_fp32``,
        ``probe_ppl_quant``, ``probe_ppl_increase``, ``size_bytes``, ``decode_tokens_per_s``,
        ``quantize_seconds``, ``best`` (True on the row ``pick_dynamic_int8`` chooses).
    """
    from tasks.evaluate import OrtRunner

    base = base or QuantizeConfig()
    grid = grid or {"weight_type": ("qint8", "quint8"), "per_channel": (True, False), "reduce_range": (True, False)}
    keys = list(grid)
    rows = []
    prompt: list[int] | None = None
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = dict(zip(keys, values))
        cfg = base.model_copy(update=settings | {"min_top1_agreement": 0.0})
        out = Path(work_dir) / "-".join(f"{k}={v}" for k, v in settings.items())
        shutil.rmtree(out, ignore_errors=True)
        r = quantize_dynamic_int8(cfg, onnx_dir, out, probe_texts)
        runner = OrtRunner(out, threads=available_cores())
        prompt = prompt or runner.encode((probe_texts or BUILTIN_TEXTS)[0])[:32]
        runner.generate(prompt, 4)
        _, first, total = runner.generate(prompt, speed_tokens)
        rows.append(settings | {k: r[k] for k in ("top1_agreement", "probe_ppl_fp32", "probe_ppl_quant",
                                                  "probe_ppl_increase", "size_bytes", "quantize_seconds")}
                    | {"fp32_matmuls": r["fp32_matmuls"],
                       "decode_tokens_per_s": round((speed_tokens - 1) / max(total - first, 1e-9), 2)})
    best = pick_dynamic_int8(rows, base.min_top1_agreement)
    for row in rows:
        row["best"] = row is best
    return rows


def pick_dynamic_int8(rows: Sequence[dict[str, Any]], min_top1_agreement: float = 0.7) -> dict[str, Any]:
    """The sweep row to use: lowest probe-perplexity increase among rows that pass the agreement
    threshold; within 1% of it, the faster decode wins (perplexity first, because size is equal)."""
    ok = [r for r in rows if r["top1_agreement"] >= min_top1_agreement] or list(rows)
    floor = min(r["probe_ppl_increase"] for r in ok)
    close = [r for r in ok if r["probe_ppl_increase"] <= floor + 0.01]
    return max(close, key=lambda r: r["decode_tokens_per_s"])


# -- static QDQ INT8 ------------------------------------------------------------------------------------
def _calibration_reader(windows: np.ndarray, empty_past: Sequence[np.ndarray]):
    """A ``CalibrationDataReader`` yielding one batch-1 prefill (empty past) per calibration window."""
    from onnxruntime.quantization import CalibrationDataReader

    class WindowReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._i >= len(windows):
                return None
            self._i += 1
            return _prefill_feed(windows[self._i - 1], empty_past)

        def rewind(self) -> None:
            self._i = 0

        def __len__(self) -> int:
            return len(windows)

    return WindowReader()


# Entropy needs many more histogram bins than quantized levels to have thresholds to choose from;
# quantize_static's own calibrator uses 128 and 128, which makes entropy the same as minmax.
_ENTROPY_BINS = {"num_bins": 2048, "num_quantized_bins": 128}


def _calibrate(model_path: Path, windows: np.ndarray, empty_past: Sequence[np.ndarray], method, percentile: float,
               path: Path) -> None:
    """Activation ranges of every MatMul tensor over the calibration windows, saved at ``path`` as ORT's
    calibration cache (``quantize_static(calibration_cache_path=...)`` reads it back)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    extra = {CalibrationMethod.Entropy: dict(_ENTROPY_BINS),
             CalibrationMethod.Percentile: {"num_bins": 2048, "percentile": percentile}}.get(method, {})
    calibrator = create_calibrator(model_path, ["MatMul"], augmented_model_path=str(path.with_name("augmented.onnx")),
                                   calibrate_method=method,
                                   use_external_data_format=model_path.stat().st_size > _EXTERNAL_DATA_BYTES,
                                   extra_options=extra)
    calibrator.collect_data(_calibration_reader(windows, empty_past))
    save_tensors_data(calibrator.compute_data(), path)


def quantize_static_int8(cfg: StaticInt8Config, onnx_dir: Path, out_dir: Path,
                         calib_texts: Sequence[str]) -> dict[str, Any]:
    """Static QDQ INT8 of ``onnx_dir`` into ``out_dir/model.qdq.onnx``, calibrated on ``calib_texts``.

    The first ``probe_windows`` × ``probe_len`` tokens of the calibration texts are the probe (outlier
    scan, agreement check, sensitivity pass); the next ``calib_windows`` × ``calib_len`` tokens
    calibrate the activation ranges, each window one prefill with an empty KV cache.

    Args:
        cfg: calibration method, per-channel, reduce-range, types, outlier limit, probe, threshold.
        onnx_dir: the fp32 trimflow export.
        out_dir: receives the QDQ graph, tokenizer, metadata and ``trimflow_quantize.json``.
        calib_texts: the calibration split.

    Returns:
        ``onnx_file``, ``size_bytes``, ``size_bytes_before``, ``size_ratio``, ``op_counts``,
        ``quantized_matmuls``, ``fp32_matmuls``, ``outlier_nodes``, ``calibrate_method``,
        ``calib_tokens``, ``top1_agreement``, ``mean_abs_logit_diff``, ``max_abs_logit_diff``,
        ``probe_ppl_fp32``, ``probe_ppl_quant``, ``probe_ppl_increase``, ``probe_tokens``,
        ``sensitivity``, ``quantize_seconds``, ``seconds``.

    Raises:
        SourceError: ``onnx_dir`` is not a trimflow export, or the calibration split is empty.
        ConfigError: the calibration texts hold fewer tokens than the probe and calibration windows.
        ExportMismatch: agreement below ``min_top1_agreement`` or ``max_ppl_increase`` not met.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from serving.runtime.generator import OnnxCausalLM

    started = time.time()
    src = _read_export(onnx_dir)
    if not calib_texts or not any(t.strip() for t in calib_texts):
        raise SourceError(f"static INT8 of {src.path}: the calibration split is empty; prepare data with a "
                          "calib split (DataConfig.calib_fraction) or use quantize_dynamic_int8")
    out_dir = Path(out_dir)
    threads = available_cores()
    ref = OnnxCausalLM(src.folder, threads=threads)
    windows = token_windows(ref, calib_texts, cfg.probe_windows, cfg.probe_len)
    calib = token_windows(ref, calib_texts, cfg.calib_windows, cfg.calib_len, skip=windows.size,
                          where="quantize_static_int8.calib_windows")

    model = onnx.load(str(src.path), load_external_data=False)
    matmuls = weight_matmuls(model)
    del model
    outliers = _outliers(cfg.max_activation_outlier, src.path, windows, matmuls, ref, threads)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibrate_method]
    qtype = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}

    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / QDQ_FILE
    _publish(src, out_dir, QDQ_FILE)
    seconds = {"quantize": 0.0}

    work = Path(tempfile.mkdtemp(prefix="trimflow-calib-"))
    ranges = work / "ranges.json"

    def quantize(excluded: set[str]) -> list[str]:
        t0 = time.time()
        names = [n.name for n in matmuls if n.name not in excluded]
        # Only weight MatMuls: attention's activation x activation MatMuls would need two calibrated
        # scales each for little size or speed. The ranges come from the one calibration above.
        quantize_static(src.path, dst, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=names, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                        activation_type=qtype[cfg.activation_type], weight_type=qtype[cfg.weight_type],
                        calibrate_method=method, use_external_data_format=src.path.stat().st_size > _EXTERNAL_DATA_BYTES,
                        calibration_cache_path=ranges)
        if cfg.quantize_embeddings:
            table.update(_table_to_block_int8(dst))
        seconds["quantize"] += time.time() - t0
        return names

    table: dict[str, Any] = {}
    try:
        t0 = time.time()
        _calibrate(src.path, calib, ref.empty_past(1), method, cfg.percentile, ranges)
        calibrate_seconds = time.time() - t0
        sens = _with_sensitivity(cfg, quantize, src.path, dst, windows, ref, threads, set(outliers))
        if sens is None:
            quantize(set(outliers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cmp = compare_logits(ref, OnnxCausalLM(out_dir, threads=threads), windows)
    counts = op_counts(dst)
    quantized = _qdq_matmuls(dst)
    size_before, size_after = _onnx_bytes(src.path), _onnx_bytes(dst)
    result = {
        "onnx_file": QDQ_FILE,
        "size_bytes": size_after,
        "size_bytes_before": size_before,
        "size_ratio": round(size_after / size_before, 4),
        "op_counts": counts,
        "quantized_matmuls": quantized,
        "fp32_matmuls": len(matmuls) - quantized,
        "outlier_nodes": outliers,
        "embeddings_quantized": bool(table.get("bits")),
        "embedding": table or None,
        "calibrate_method": cfg.calibrate_method,
        "calib_tokens": int(calib.size),
        **_quality(cmp, windows),
        "sensitivity": sens,
        "calibrate_seconds": round(calibrate_seconds, 2),
        "quantize_seconds": round(seconds["quantize"], 2),
        "seconds": round(time.time() - started, 2),
    }
    _record(out_dir, "quantize_static_int8", cfg, result)
    _check(cmp, windows, cfg.min_top1_agreement, "static INT8", dst, src.path,
           f"calibrate_method={cfg.calibrate_method}, {len(outliers)} outlier MatMuls kept fp32. Try another "
           "calibrate_method, lower max_activation_outlier, or set max_ppl_increase")
    _sensitivity_failure(sens, "static INT8", dst)
    return result


def _table_to_block_int8(path: Path, block: int = 32) -> dict[str, Any]:
    """Rewrite the token table of the graph at ``path`` as symmetric int8 blocks (GatherBlockQuantized)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    node = next((n for n in g.node if n.op_type == "Gather" and n.input[0] in inits and n.input[1] == "input_ids"
                 and len(inits[n.input[0]].dims) == 2), None)
    if node is None:
        return {"bits": 0, "kept_fp32": "no token-table Gather on input_ids"}
    table = numpy_helper.to_array(inits[node.input[0]])
    if table.shape[1] % block:
        return {"bits": 0, "kept_fp32": f"hidden size {table.shape[1]} is not a multiple of {block}"}
    q = block_quantize(np.ascontiguousarray(table.T), 8, block, "sym")
    base = node.input[0]
    gbq = helper.make_node("GatherBlockQuantized", [base + "_Q8", node.input[1], base + "_scales"], list(node.output),
                           name=node.name + "_Q8", domain="com.microsoft", bits=8, block_size=block, gather_axis=0,
                           quantize_axis=1)
    nodes = [gbq if n is node else n for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    keep = [i for i in g.initializer if i.name != base]
    del g.initializer[:]
    g.initializer.extend(keep + [numpy_helper.from_array(q["packed"].reshape(table.shape[0], -1), base + "_Q8"),
                                 numpy_helper.from_array(q["scales"], base + "_scales")])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save(model, path)
    return {"bits": 8, "block_size": block, "op": "GatherBlockQuantized"}


def _qdq_matmuls(path: Path) -> int:
    """MatMuls whose weight input comes out of a DequantizeLinear."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq)


# -- INT4 -------------------------------------------------------------------------------------------------
def block_quantize(w: np.ndarray, bits: int, block: int, scheme: str) -> dict[str, np.ndarray]:
    """Blockwise quantization of a [K, N] MatMul weight along K, in MatMulNBits' layout.

    Args:
        w: float32 [K, N]; a K that is not a multiple of ``block`` is padded with copies of the last
            row, which leave the last block's range unchanged (the kernel never reads the padding).
        bits: 4 or 8.
        block: weights per scale along K.
        scheme: ``minmax_float_zp`` (exact block min/max, float zero point: GGUF Q4_1), ``asym``
            (range widened to include 0, integer zero point: ORT's rule), ``sym`` (4 bits: ORT's
            signed absmax/-8; 8 bits: absmax/127, GGUF Q8_0).

    Returns:
        ``packed`` uint8 [N, ceil(K/block), block*bits/8], ``scales`` float32 [N, ceil(K/block)],
        ``zero_points`` (uint8 packed [N, ceil(K/block*bits/8)] or float32 [N, ceil(K/block)]; absent for
        ``sym``, whose zero point is the kernel's default 2^(bits-1)) and ``dequantized`` float32 [K, N].
    """
    k, n = w.shape
    padded = -(-k // block) * block
    if padded != k:
        w = np.pad(w, ((0, padded - k), (0, 0)), mode="edge")
    qmax = (1 << bits) - 1
    wb = w.T.reshape(n, padded // block, block).astype(np.float32)
    out: dict[str, np.ndarray] = {}
    if scheme == "sym":
        if bits == 8:
            scale = np.abs(wb).max(-1) / 127.0
        else:
            lo, hi = wb.min(-1), wb.max(-1)
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8.0
        safe = np.where(scale == 0, 1.0, scale)
        mid = 1 << (bits - 1)
        q = np.clip(np.round(wb / safe[..., None]), -mid, mid - 1) + mid
        deq = (q - mid) * scale[..., None]
    else:
        lo, hi = wb.min(-1), wb.max(-1)
        if scheme == "asym":
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = (hi - lo) / qmax
        safe = np.where(scale == 0, 1.0, scale)
        if scheme == "minmax_float_zp":
            zp = (-lo / safe).astype(np.float32)
            q = np.clip(np.round((wb - lo[..., None]) / safe[..., None]), 0, qmax)
            out["zero_points"] = zp
        else:
            zpi = np.clip(np.round(-lo / safe), 0, qmax)
            q = np.clip(np.round(wb / safe[..., None] + zpi[..., None]), 0, qmax)
            zp = zpi
            out["zero_points"] = _pack(zpi.astype(np.uint8), bits)
        deq = (q - zp[..., None]) * scale[..., None]
    q = q.astype(np.uint8)
    out["packed"] = _pack(q, bits)
    out["scales"] = scale.astype(np.float32)
    out["dequantized"] = deq.reshape(n, padded)[:, :k].T.astype(np.float32)
    return out


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, low nibble first (MatMulNBits/GatherBlockQuantized)."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def quantize_int4(cfg: Int4Config, onnx_dir: Path, out_dir: Path,
                  probe_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Weight-only 4-bit MatMuls (MatMulNBits) and an 8/4-bit token table into ``out_dir/model.int4.onnx``.

    Args:
        cfg: block size, scheme, accuracy level, embedding bits, probe, threshold, sensitivity.
        onnx_dir: the fp32 trimflow export.
        out_dir: receives the INT4 graph, tokenizer, metadata and ``trimflow_quantize.json``.
        probe_texts: probe texts (default ``None``: the built-in texts; pass the calibration split).

    Returns:
        ``onnx_file``, ``size_bytes``, ``size_bytes_before``, ``size_ratio``, ``op_counts``,
        ``quantized_matmuls``, ``fp32_matmuls``, ``embedding`` (``bits``, ``tied`` and ``shared``:
        whether the output projection reads the table's own tensors), ``fused_groups`` (merged
        projections, see ``fuse_projections``), ``weight_error`` (``rel_rmse``
        of all quantized weights and ``exact_share``: share of weights the quantized grid reproduces
        to within 1e-4 of their block scale, 1.0 when the fp32 weights already lie on that grid),
        ``top1_agreement``, ``mean_abs_logit_diff``, ``max_abs_logit_diff``, ``probe_ppl_fp32``,
        ``probe_ppl_quant``, ``probe_ppl_increase``, ``probe_tokens``, ``block_size``, ``scheme``,
        ``accuracy_level``, ``sensitivity``, ``quantize_seconds``, ``seconds``.

    Raises:
        SourceError: ``onnx_dir`` is not a trimflow export.
        ConfigError: the probe texts are shorter than ``probe_windows`` × ``probe_len`` tokens.
        ExportMismatch: agreement below ``min_top1_agreement`` or ``max_ppl_increase`` not met.
    """
    from serving.runtime.generator import OnnxCausalLM

    started = time.time()
    src = _read_export(onnx_dir)
    out_dir = Path(out_dir)
    threads = available_cores()
    ref = OnnxCausalLM(src.folder, threads=threads)
    windows = probe_windows(ref, probe_texts or BUILTIN_TEXTS, cfg.probe_windows, cfg.probe_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / INT4_FILE
    _publish(src, out_dir, INT4_FILE)
    info: dict[str, Any] = {}
    seconds = {"quantize": 0.0}

    def quantize(excluded: set[str]) -> list[str]:
        t0 = time.time()
        names, stats = _write_int4(cfg, src.path, dst, excluded)
        info.update(stats, quantized=names)
        seconds["quantize"] += time.time() - t0
        return names

    sens = _with_sensitivity(cfg, quantize, src.path, dst, windows, ref, threads, set())
    if sens is None:
        quantize(set())
    cmp = compare_logits(ref, OnnxCausalLM(out_dir, threads=threads), windows)
    counts = op_counts(dst)
    size_before, size_after = _onnx_bytes(src.path), _onnx_bytes(dst)
    result = {
        "onnx_file": INT4_FILE,
        "size_bytes": size_after,
        "size_bytes_before": size_before,
        "size_ratio": round(size_after / size_before, 4),
        "op_counts": counts,
        "quantized_matmuls": len(info["quantized"]),
        "fp32_matmuls": info["weight_matmuls"] - len(info["quantized"]),
        "embedding": info["embedding"],
        "fused_groups": info["fused_groups"],
        "weight_error": info["weight_error"],
        **_quality(cmp, windows),
        "block_size": cfg.block_size,
        "scheme": cfg.scheme,
        "accuracy_level": cfg.accuracy_level,
        "sensitivity": sens,
        "quantize_seconds": round(seconds["quantize"], 2),
        "seconds": round(time.time() - started, 2),
    }
    _record(out_dir, "quantize_int4", cfg, result)
    _check(cmp, windows, cfg.min_top1_agreement, "INT4", dst, src.path,
           f"scheme={cfg.scheme} block_size={cfg.block_size} accuracy_level={cfg.accuracy_level} "
           f"embedding_bits={cfg.embedding_bits}. Try a smaller block_size, or set max_ppl_increase")
    _sensitivity_failure(sens, "INT4", dst)
    log.info("quantize_int4: %.1f MB -> %.1f MB, top-1 agreement %.3f, probe perplexity %+.2f%%", size_before / 1e6,
             size_after / 1e6, cmp["top1_agreement"], 100 * result["probe_ppl_increase"])
    return result


def _write_int4(cfg: Int4Config, src: Path, dst: Path, excluded: set[str]) -> tuple[list[str], dict[str, Any]]:
    """Build the INT4 graph of ``src`` into ``dst``; returns the quantized MatMul names and statistics."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    matmuls = weight_matmuls(model)
    originals = {n.output[0]: numpy_helper.to_array(inits[n.input[1]]) for n in matmuls if n.name not in excluded}
    producer = {o: n for n in g.node for o in n.output}
    head = producer.get("logits")
    head = head if head is not None and head in matmuls else None
    table_node = next((n for n in g.node if n.op_type == "Gather" and n.input[0] in inits
                       and n.input[1] == "input_ids" and len(inits[n.input[0]].dims) == 2), None)
    table = numpy_helper.to_array(inits[table_node.input[0]]) if table_node is not None else None
    head_w = originals.get(head.output[0]) if head is not None else None
    tied = bool(table is not None and head_w is not None and head_w.shape == table.shape[::-1]
                and np.array_equal(head_w.T, table))
    body = [n for n in matmuls if n is not head and n.name not in excluded]

    new_inits: list[Any] = []
    replace: dict[str, list[Any]] = {}
    drop: set[str] = set()
    corrections: dict[str, np.ndarray] = {}
    if cfg.scheme.startswith("minmax"):  # onnxruntime's quantizer has no min/max (Q4_1) rule
        block_sums: dict[str, str] = {}
        for n in body:
            w = originals[n.output[0]]
            q = block_quantize(w, 4, cfg.block_size, "minmax_float_zp")
            base, y = n.input[1], n.output[0]
            new_inits += [numpy_helper.from_array(q["packed"], base + "_Q4"),
                          numpy_helper.from_array(q["scales"], base + "_scales")]
            drop.add(base)
            if cfg.scheme == "minmax_float_zp":
                new_inits.append(numpy_helper.from_array(q["zero_points"], base + "_zero_points"))
                replace[n.name] = [_nbits_node(n, base + "_Q4", base + "_scales", base + "_zero_points", w.shape, 4,
                                               cfg.block_size, cfg.accuracy_level)]
                continue
            # w = (q - zp) * s = (q - 8) * s + (8 - zp) * s: the kernel's default zero point 8, and the
            # per-block remainder times the sum of the input over that block.
            corr = ((8.0 - q["zero_points"]) * q["scales"]).T.astype(np.float32)  # [K/block, N]
            corrections[y] = corr
            new_inits.append(numpy_helper.from_array(corr, base + "_correction"))
            x = n.input[0]
            extra = []
            if x not in block_sums:
                shape = f"{x}/block_shape"
                new_inits += [numpy_helper.from_array(np.array([0, 0, -1, cfg.block_size], np.int64), shape),
                              numpy_helper.from_array(np.array([-1], np.int64), f"{x}/block_axis")]
                block_sums[x] = f"{x}/block_sums"
                blocks_in = x
                pad = -w.shape[0] % cfg.block_size
                if pad:  # zeros in the padded tail add nothing to the last block's sum
                    new_inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, pad], np.int64), f"{x}/pads"))
                    blocks_in = f"{x}/padded"
                    extra.append(helper.make_node("Pad", [x, f"{x}/pads"], [blocks_in], name=f"{x}/pad"))
                extra += [helper.make_node("Reshape", [blocks_in, shape], [f"{x}/blocks"], name=f"{x}/blocks"),
                          helper.make_node("ReduceSum", [f"{x}/blocks", f"{x}/block_axis"], [block_sums[x]],
                                           name=f"{x}/block_sums", keepdims=0)]
            nbits = _nbits_node(n, base + "_Q4", base + "_scales", None, w.shape, 4, cfg.block_size,
                                cfg.accuracy_level)
            nbits.output[0] = y + "/nbits"
            replace[n.name] = extra + [
                nbits,
                helper.make_node("MatMul", [block_sums[x], base + "_correction"], [y + "/correction"],
                                 name=n.name + "_correction"),
                helper.make_node("Add", [y + "/nbits", y + "/correction"], [y], name=n.name + "_corrected")]

    embedding: dict[str, Any] = {"bits": cfg.embedding_bits, "tied": tied, "shared": False}
    if cfg.embedding_bits and table is not None and table.shape[1] % cfg.block_size:
        # GatherBlockQuantized needs whole blocks along the hidden size (a pruned hidden size may not be).
        embedding |= {"bits": 0, "kept_fp32": f"hidden size {table.shape[1]} is not a multiple of block_size "
                                              f"{cfg.block_size}"}
        log.warning("quantize_int4: token table and head stay fp32: %s", embedding["kept_fp32"])
    elif cfg.embedding_bits and table is not None:
        bits = cfg.embedding_bits
        scheme = "sym" if bits == 8 or cfg.scheme == "sym" else "asym"  # GatherBlockQuantized: integer zero points
        vocab, hidden = table.shape
        q = block_quantize(np.ascontiguousarray(table.T), bits, cfg.block_size, scheme)  # blocks along hidden
        base = table_node.input[0]
        codes, scales = base + f"_Q{bits}", base + "_scales"
        zp = base + "_zero_points" if "zero_points" in q else None
        new_inits += [numpy_helper.from_array(q["packed"].reshape(vocab, -1), codes),
                      numpy_helper.from_array(q["scales"], scales)]
        if zp:
            new_inits.append(numpy_helper.from_array(q["zero_points"], zp))
        replace[table_node.name] = [helper.make_node(
            "GatherBlockQuantized", [codes, table_node.input[1], scales] + ([zp] if zp else []),
            list(table_node.output), name=table_node.name + f"_Q{bits}", domain="com.microsoft",
            bits=bits, block_size=cfg.block_size, gather_axis=0, quantize_axis=1)]
        drop.add(base)
        if head is not None and head.name not in excluded:
            if tied:
                shape = base + "_nbits_shape"
                new_inits.append(numpy_helper.from_array(
                    np.array([vocab, hidden // cfg.block_size, cfg.block_size * bits // 8], np.int64), shape))
                # One copy on disk: the output projection reads the table's codes through a Reshape to
                # MatMulNBits' [N, blocks, bytes] layout (constant-folded when the session loads).
                replace[head.name] = [
                    helper.make_node("Reshape", [codes, shape], [base + "_nbits"], name=head.name + "_codes"),
                    _nbits_node(head, base + "_nbits", scales, zp, head_w.shape, bits, cfg.block_size,
                                cfg.accuracy_level)]
                embedding["shared"] = True
            else:
                hq = block_quantize(head_w, bits, cfg.block_size, scheme)
                hb = head.input[1]
                new_inits += [numpy_helper.from_array(hq["packed"], hb + f"_Q{bits}"),
                              numpy_helper.from_array(hq["scales"], hb + "_scales")]
                hzp = hb + "_zero_points" if "zero_points" in hq else None
                if hzp:
                    new_inits.append(numpy_helper.from_array(hq["zero_points"], hzp))
                replace[head.name] = [_nbits_node(head, hb + f"_Q{bits}", hb + "_scales", hzp, head_w.shape, bits,
                                                  cfg.block_size, cfg.accuracy_level)]
            drop.add(head.input[1])

    nodes = []
    for n in g.node:
        nodes += replace.get(n.name, [n])
    del g.node[:]
    g.node.extend(nodes)
    keep = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    if cfg.scheme in ("asym", "sym") and body:
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                      MatMulNBitsQuantizer)

        algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.scheme == "sym",
                                            accuracy_level=cfg.accuracy_level or None, op_types_to_quantize=("MatMul",))
        todo = {n.name for n in body}
        skip = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in todo]
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=skip, algo_config=algo)
        # It logs one INFO line per node it skips: thousands of lines in a task log.
        nbits_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = nbits_log.level
        nbits_log.setLevel(logging.WARNING)
        try:
            quantizer.process()
        finally:
            nbits_log.setLevel(level)
        model = quantizer.model.model
    nbits_out = {m.output[0].removesuffix("/nbits") for m in model.graph.node if m.op_type == "MatMulNBits"}
    quantized = [n.name for n in matmuls if n.output[0] in nbits_out]
    weight_error = nbits_weight_error(model, originals, corrections)
    fused = fuse_shared_input_nbits(model) if cfg.fuse_projections else []
    _save(model, dst)
    return quantized, {"embedding": embedding, "weight_matmuls": len(matmuls), "weight_error": weight_error,
                       "fused_groups": len(fused)}


def fuse_shared_input_nbits(model) -> list[list[str]]:
    """Merge MatMulNBits nodes that read the same input (q/k/v, gate/up) into one node and a ``Split``.

    Decode on a CPU pays a fixed cost per node, so three small kernels cost more than one wide one;
    the weights are concatenated along N, which changes no output value. A ``minmax_corrected``
    remainder (MatMul on the input's block sums, then Add) is merged the same way. Nodes whose
    weights are not plain initializers (the head that reads the token table) are left alone.

    Returns:
        The output names of each merged group, in graph order.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list[Any]] = collections.defaultdict(list)
    for n in g.node:
        for name in n.input:
            users[name].append(n)

    def correction_of(node) -> tuple[Any, Any] | None:
        """The (Add, MatMul) pair that adds this node's block-sum remainder, if any."""
        outs = users.get(node.output[0], [])
        if len(outs) != 1 or outs[0].op_type != "Add":
            return None
        other = [producer.get(i) for i in outs[0].input if i != node.output[0]]
        if len(other) != 1 or other[0] is None or other[0].op_type != "MatMul" or other[0].input[1] not in inits:
            return None
        return outs[0], other[0]

    groups: dict[tuple, list[Any]] = collections.defaultdict(list)
    for n in g.node:
        if n.op_type != "MatMulNBits" or not all(i in inits for i in n.input[1:] if i):
            continue
        attrs = tuple(sorted((a.name, a.i) for a in n.attribute if a.name != "N"))
        zp = inits[n.input[3]].data_type if len(n.input) > 3 and n.input[3] else None
        corr = correction_of(n)
        groups[(n.input[0], attrs, zp, corr is not None and corr[1].input[0])].append((n, corr))
    merged: list[list[str]] = []
    replace: dict[int, list[Any]] = {}
    remove: set[int] = set()
    drop: set[str] = set()
    new_inits = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        x, tag = members[0][0].input[0], f"{members[0][0].name}/fused"
        widths = [next(a.i for a in n.attribute if a.name == "N") for n, _ in members]
        arrays = [[numpy_helper.to_array(inits[i]) for i in n.input[1:] if i] for n, _ in members]
        names = [f"{tag}/weight", f"{tag}/scales", f"{tag}/zero_points"][: len(arrays[0])]
        for j, name in enumerate(names):
            new_inits.append(numpy_helper.from_array(np.concatenate([a[j] for a in arrays], 0), name))
        attrs = {a.name: a.i for a in members[0][0].attribute} | {"N": int(sum(widths))}
        block = [helper.make_node("MatMulNBits", [x, *names], [f"{tag}/nbits"], name=tag, domain="com.microsoft",
                                  **attrs)]
        whole = f"{tag}/nbits"
        corrected = members[0][1] is not None
        if corrected:
            block_sums = members[0][1][1].input[0]
            c = np.concatenate([numpy_helper.to_array(inits[corr[1].input[1]]) for _, corr in members], 1)
            new_inits.append(numpy_helper.from_array(c, f"{tag}/correction_weight"))
            block += [helper.make_node("MatMul", [block_sums, f"{tag}/correction_weight"], [f"{tag}/correction"],
                                       name=f"{tag}/correction"),
                      helper.make_node("Add", [whole, f"{tag}/correction"], [f"{tag}/sum"], name=f"{tag}/sum")]
            whole = f"{tag}/sum"
        outputs = [corr[0].output[0] if corrected else n.output[0] for n, corr in members]
        new_inits.append(numpy_helper.from_array(np.array(widths, np.int64), f"{tag}/widths"))
        block.append(helper.make_node("Split", [whole, f"{tag}/widths"], outputs, name=f"{tag}/split", axis=-1))
        first = min(i for i, n in enumerate(g.node) if any(n is m for m, _ in members))
        replace[first] = block
        for n, corr in members:
            remove.update(i for i, m in enumerate(g.node) if m is n or (corr and (m is corr[0] or m is corr[1])))
            drop.update(i for i in n.input[1:] if i)
            if corr:
                drop.add(corr[1].input[1])
        merged.append(outputs)
    if not merged:
        return merged
    nodes = []
    for i, n in enumerate(g.node):
        nodes += replace.get(i, [])
        if i not in remove:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    keep = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    return merged


def dequantize_nbits(node, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The [K, N] float32 weight a ``MatMulNBits`` node computes with (``tensors``: its constant inputs)."""
    attr = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attr["K"], attr["N"], attr["bits"], attr["block_size"]
    blocks = -(-k // block)
    packed = tensors[node.input[1]].reshape(n, blocks, -1)
    if bits == 4:
        q = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, blocks, -1)[..., :block]
    else:
        q = packed[..., :block]
    scales = tensors[node.input[2]].reshape(n, blocks).astype(np.float32)
    zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if zp_name is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    else:
        raw = tensors[zp_name]
        if raw.dtype == np.uint8 and bits == 4:
            zp = np.stack([raw & 0xF, raw >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.float32)
        else:
            zp = raw.reshape(n, blocks).astype(np.float32)
    w = (q.astype(np.float32) - zp[..., None]) * scales[..., None]
    return w.reshape(n, blocks * block)[:, :k].T


def nbits_weight_error(model, originals: dict[str, np.ndarray],
                       corrections: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """How far the MatMulNBits weights of ``model`` are from the fp32 ``originals`` (by output name).

    ``corrections`` (by output name, [K/block, N]) are the per-block remainders that
    ``minmax_corrected`` adds outside the kernel; they count as part of the weight. ``exact_share``
    counts weights reproduced to within 1e-4 of their block scale (one quantization step): 1.0 means
    the fp32 weights already lay on the quantized grid (a GGUF-derived model requantized on its own
    grid); float rounding of the recovered scale stays far below 1e-4.
    """
    from onnx import numpy_helper

    corrections = corrections or {}
    inits = {i.name: i for i in model.graph.initializer}
    reshaped = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape"}
    err_sq = ref_sq = 0.0
    exact = total = 0
    for node in model.graph.node:
        y = node.output[0].removesuffix("/nbits")
        if node.op_type != "MatMulNBits" or y not in originals:
            continue
        tensors = {}
        for name in node.input[1:]:
            if name:
                tensors[name] = numpy_helper.to_array(inits[reshaped.get(name, name)])
        w = originals[y]
        attr = {a.name: a.i for a in node.attribute}
        deq = dequantize_nbits(node, tensors)
        if y in corrections:
            deq = deq + np.repeat(corrections[y], attr["block_size"], 0)[: w.shape[0]]
        d = np.abs(deq - w).astype(np.float64)
        scale = np.repeat(np.abs(tensors[node.input[2]].reshape(attr["N"], -1)).T, attr["block_size"], 0)
        exact += int((d <= 1e-4 * np.maximum(scale[: w.shape[0]], 1e-30)).sum())
        err_sq += float((d ** 2).sum())
        ref_sq += float((w.astype(np.float64) ** 2).sum())
        total += w.size
    return {"rel_rmse": round(float(np.sqrt(err_sq / max(ref_sq, 1e-30))), 6),
            "exact_share": round(exact / max(total, 1), 6), "weights": int(total)}


def _nbits_node(node, packed: str, scales: str, zero_points: str | None, shape: tuple[int, int], bits: int,
                block: int, accuracy_level: int):
    from onnx import helper

    kw: dict[str, Any] = {"K": int(shape[0]), "N": int(shape[1]), "bits": bits, "block_size": block}
    if accuracy_level:
        kw["accuracy_level"] = accuracy_level
    ins = [node.input[0], packed, scales] + ([zero_points] if zero_points else [])
    return helper.make_node("MatMulNBits", ins, list(node.output), name=f"{node.name}_Q{bits}",
                            domain="com.microsoft", **kw)


# -- FP16 -------------------------------------------------------------------------------------------------
def convert_fp16(cfg: Fp16Config, onnx_dir: Path, out_dir: Path,
                 probe_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """FP16 weights, activations and KV cache into ``out_dir/model.fp16.onnx`` (``past_dtype: float16``).

    The KV-cache inputs and outputs become float16 and the metadata says so, so
    ``OnnxCausalLM`` allocates a float16 empty past; ``logits`` stay float32 unless
    ``keep_logits_fp32`` is off. When onnxruntime's CPU provider runs the graph, the usual agreement
    check runs on CPU; when it cannot, the graph is validated (checker, IO dtypes) and the result
    says it is GPU-only.

    Returns:
        ``onnx_file``, ``size_bytes``, ``size_bytes_before``, ``size_ratio``, ``op_counts``,
        ``past_dtype``, ``logits_dtype``, ``cpu_runnable``, ``validation`` (``cpu-run`` or
        ``graph-only: <why>``), and when it ran: ``top1_agreement``, ``mean_abs_logit_diff``,
        ``max_abs_logit_diff``, ``probe_ppl_fp32``, ``probe_ppl_quant``, ``probe_ppl_increase``,
        ``probe_tokens``; ``seconds``.

    Raises:
        SourceError: ``onnx_dir`` is not a trimflow export.
        ExportMismatch: agreement below ``min_top1_agreement``, a graph that fails validation, or
            (with ``require_cpu_run``) a graph the CPU provider cannot run.
    """
    import onnx
    from onnx import TensorProto
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from serving.runtime.generator import OnnxCausalLM

    started = time.time()
    src = _read_export(onnx_dir)
    out_dir = Path(out_dir)
    model = onnx.load(str(src.path))
    keep = ["logits"] if cfg.keep_logits_fp32 else False
    model = convert_float_to_float16(model, keep_io_types=keep, op_block_list=list(DEFAULT_OP_BLOCK_LIST) +
                                     list(cfg.fp32_ops))
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / FP16_FILE
    _save(model, dst)
    _publish(src, out_dir, FP16_FILE, past_dtype="float16")
    past_types = {i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past_key_values.")}
    present_types = {o.type.tensor_type.elem_type for o in model.graph.output if o.name.startswith("present.")}
    logits_type = next(o.type.tensor_type.elem_type for o in model.graph.output if o.name == "logits")
    del model
    problems = []
    if past_types | present_types != {TensorProto.FLOAT16}:
        problems.append(f"KV cache dtypes {sorted(past_types | present_types)} are not all float16")
    try:
        onnx.checker.check_model(str(dst))
    except onnx.checker.ValidationError as e:
        problems.append(f"onnx checker: {e}")
    if problems:
        raise ExportMismatch(f"FP16 graph {dst} is not valid: {'; '.join(problems)}")
    result: dict[str, Any] = {
        "onnx_file": FP16_FILE,
        "size_bytes": _onnx_bytes(dst),
        "size_bytes_before": _onnx_bytes(src.path),
        "op_counts": op_counts(dst),
        "past_dtype": "float16",
        "logits_dtype": "float32" if logits_type == TensorProto.FLOAT else "float16",
    }
    result["size_ratio"] = round(result["size_bytes"] / result["size_bytes_before"], 4)
    threads = available_cores()
    try:
        cand = OnnxCausalLM(out_dir, threads=threads)
        cand.logits(np.zeros((1, 2), np.int64))
    except (ort_state.NotImplemented, ort_state.Fail, ort_state.InvalidGraph, ort_state.RuntimeException) as e:
        if cfg.require_cpu_run:
            raise ExportMismatch(f"FP16 graph {dst} does not run on onnxruntime's CPU provider: {e}") from e
        result |= {"cpu_runnable": False, "validation": f"graph-only: the CPU provider cannot run it ({e})"[:500]}
        cmp = None
    else:
        ref = OnnxCausalLM(src.folder, threads=threads)
        windows = probe_windows(ref, probe_texts or BUILTIN_TEXTS, cfg.probe_windows, cfg.probe_len)
        cmp = compare_logits(ref, cand, windows)
        result |= {"cpu_runnable": True, "validation": "cpu-run", **_quality(cmp, windows)}
    result["seconds"] = round(time.time() - started, 2)
    _record(out_dir, "convert_fp16", cfg, result)
    if cmp is not None:
        _check(cmp, windows, cfg.min_top1_agreement, "FP16", dst, src.path,
               "An fp16 overflow (activations above 65504) shows as NaN logits: keep the op types that overflow "
               "in fp32 with fp32_ops")
    return result


# -- recipe techniques -------------------------------------------------------------------------------
def _run_dynamic(cfg: DynamicInt8Config, src: Path, out: Path, ctx) -> dict[str, Any]:
    return quantize_dynamic_int8(cfg, src, out, probe_texts=ctx.texts("calib"))


def _run_static(cfg: StaticInt8Config, src: Path, out: Path, ctx) -> dict[str, Any]:
    return quantize_static_int8(cfg, src, out, calib_texts=ctx.texts("calib"))


def _run_int4(cfg: Int4Config, src: Path, out: Path, ctx) -> dict[str, Any]:
    return quantize_int4(cfg, src, out, probe_texts=ctx.texts("calib"))


def _run_fp16(cfg: Fp16Config, src: Path, out: Path, ctx) -> dict[str, Any]:
    return convert_fp16(cfg, src, out, probe_texts=ctx.texts("calib"))


TECHNIQUES = [
    Technique("quantize_dynamic_int8", stage="quantize", config=DynamicInt8Config, run=_run_dynamic,
              kinds=("causal_lm",), consumes="onnx", produces="onnx",
              description="ONNX Runtime dynamic INT8 with outlier-aware exclusions and an optional sensitivity pass"),
    Technique("quantize_static_int8", stage="quantize", config=StaticInt8Config, run=_run_static,
              kinds=("causal_lm",), consumes="onnx", produces="onnx",
              description="ONNX Runtime static QDQ INT8 calibrated on the calibration split"),
    Technique("quantize_int4", stage="quantize", config=Int4Config, run=_run_int4, kinds=("causal_lm",),
              consumes="onnx", produces="onnx",
              description="weight-only 4-bit MatMulNBits with a block-quantized token table shared by the head"),
    Technique("convert_fp16", stage="quantize", config=Fp16Config, run=_run_fp16, kinds=("causal_lm",),
              consumes="onnx", produces="onnx", description="FP16 weights and KV cache for GPU targets"),
]
