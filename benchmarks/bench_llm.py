"""The LLM section of ``make bench``: teacher (PyTorch fp32, ORT fp32), each technique alone, students.

Every artifact is produced by the same code the optimize DAG runs (``tasks.pipeline.run_stage``
over a recipe), then measured here by one function: held-out perplexity on news text, batch-1
generation latency and decode tokens/s, batch-16 generation throughput, size on disk, and decode
speed as a fraction of the memory-bandwidth bound. Nothing is asserted; numbers are reported.

    section = run(work_dir, quick=True)      # the "llm" section of reports/bench.json
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("bench.llm")
RECIPES = Path(__file__).with_name("recipes")


def _prompts(texts: Sequence[str], n: int) -> list[str]:
    from tasks.pipeline import prompts_from

    return prompts_from(list(texts), n)


def throughput_b16(runner, prompts: Sequence[str], new_tokens: int, batch: int = 16) -> dict[str, float]:
    """Generated tokens per second for a batch of ``batch`` prompts, ``new_tokens`` each (EOS ignored)."""
    ids = [runner.encode(p) for p in (list(prompts) * batch)[:batch]]
    if hasattr(runner, "lm"):  # onnxruntime: the serving generator itself
        gen = lambda: runner.lm.generate_ids(ids, new_tokens, stop_at_eos=False)  # noqa: E731
    elif hasattr(runner, "generate_batch"):
        gen = lambda: runner.generate_batch(ids, new_tokens)  # noqa: E731
    else:
        gen = lambda: _torch_generate_batch(runner, ids, new_tokens)  # noqa: E731
    gen()  # warm-up
    t0 = time.perf_counter()
    out = gen()
    seconds = time.perf_counter() - t0
    produced = sum(len(o) for o in out)
    return {"tokens_per_s": round(produced / seconds, 2), "batch": batch, "new_tokens": new_tokens,
            "seconds": round(seconds, 3)}


def _torch_generate_batch(runner, ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    from tasks.modelio import torch_threads

    model = runner.model
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    longest = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad] * (longest - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids])
    with torch_threads(runner.threads), torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return [row[longest:].tolist() for row in out]


def measure_artifact(folder: Path, form: str, eval_cfg, texts: Sequence[str], prompts: Sequence[str],
                     bandwidth_gbs: float | None) -> dict[str, Any]:
    """The bench fields for one model folder (``hf``: PyTorch fp32, ``onnx``: onnxruntime)."""
    from tasks import evaluate

    runner = evaluate.TorchRunner(folder, threads=eval_cfg.threads) if form == "hf" else \
        _ort_runner(folder, eval_cfg.threads)
    m = evaluate.measure(runner, eval_cfg, texts, prompts)
    b16 = throughput_b16(runner, prompts, eval_cfg.new_tokens)
    entry = {
        "runtime": m["runtime"],
        "size_bytes": m["size_bytes"],
        "latency_ms_p50_b1": m["latency_ms_p50"],
        "latency_ms_p95_b1": m["latency_ms_p95"],
        "tokens_per_s_b1": m["tokens_per_s"],
        "ttft_ms_p50_b1": m["ttft_ms_p50"],
        "throughput_b16": b16["tokens_per_s"],
        "quality": m["perplexity"],
        "quality_metric": f"held-out perplexity, {m['ppl_windows']}x{eval_cfg.window_len} news tokens",
    }
    weight_bytes = _weight_bytes_per_token(folder, form, m["size_bytes"])
    if bandwidth_gbs and weight_bytes:
        bound = bandwidth_gbs * 1e9 / weight_bytes
        entry["bandwidth_bound_tokens_per_s"] = round(bound, 1)
        entry["fraction_of_bandwidth_bound"] = round(m["tokens_per_s"] / bound, 3)
        entry["weight_bytes_per_token"] = int(weight_bytes)
    del runner
    return entry


def _ort_runner(folder: Path, threads: int):
    from tasks import evaluate

    early_exit = getattr(__import__("tasks.early_exit", fromlist=["*"]), "runner_for", None) \
        if (folder / "trimflow_early_exit.json").is_file() else None
    return early_exit(folder, threads=threads) if early_exit else evaluate.OrtRunner(folder, threads=threads)


def _weight_bytes_per_token(folder: Path, form: str, size_bytes: int) -> int | None:
    """Bytes of weights a decode step reads (a token table read only by row costs one row)."""
    if form == "hf":
        return _hf_weight_bytes_per_token(folder)
    from tasks.hardware import weight_bytes_per_token

    try:
        return int(weight_bytes_per_token(folder)["bytes"])
    except Exception as e:  # a segmented early-exit export has no single graph to read
        log.info("no weight-bytes figure for %s: %s", folder, e)
        return None


def _hf_weight_bytes_per_token(folder: Path) -> int | None:
    """The same figure for a Hugging Face folder: every tensor once, except an untied input embedding
    (one row per token); a tied embedding is read in full by the LM head."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    config = json.loads((Path(folder) / "config.json").read_text())
    tied = config.get("tie_word_embeddings", True)
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                shape = sl.get_shape()
                n = int(np.prod(shape)) if shape else 1
                nbytes = n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
                if name.endswith("embed_tokens.weight") and not tied and shape:
                    nbytes //= shape[0]
                total += nbytes
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F64": 8, "I16": 2}


def _ratios(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    return {
        "speedup_b1": round(student["tokens_per_s_b1"] / teacher["tokens_per_s_b1"], 3),
        "latency_ratio_b1": round(teacher["latency_ms_p50_b1"] / student["latency_ms_p50_b1"], 3),
        "throughput_ratio_b16": round(student["throughput_b16"] / teacher["throughput_b16"], 3),
        "size_ratio": round(teacher["size_bytes"] / student["size_bytes"], 3),
        # Perplexity: lower is better, so the ratio is student / teacher (target <= 1.25).
        "quality_ratio": round(student["quality"] / teacher["quality"], 4),
    }


def run_recipe(recipe_path: Path, run_id: str, model: dict, data: dict) -> dict[str, Any]:
    """Apply a recipe with the DAG's own stage code; returns the final chain (uri, form, steps)."""
    from tasks import pipeline
    from tasks.technique import STAGES

    conf = pipeline.resolve_config({"profile": "quick", "recipe": str(recipe_path)})
    chain = pipeline.start_point(model)
    for stage in STAGES:
        chain = pipeline.run_stage(conf, run_id, stage, chain, model, data)
    return chain


def _step_results(store, chain: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    from tasks.steps import RESULT, step_dir

    return [(st["technique"], json.loads((step_dir(store, st["uri"]) / RESULT).read_text()))
            for st in chain.get("steps", [])]


def distill_tokens(store, chain: dict[str, Any]) -> int:
    """Tokens the recipe's distillation steps trained on, recovery runs of pruning included (0 when none)."""
    total = 0
    for technique, res in _step_results(store, chain):
        total += int(res.get("tokens_seen", 0)) + int((res.get("recovery") or {}).get("tokens_seen", 0))
    return total


def step_verdicts(store, chain: dict[str, Any]) -> dict[str, str]:
    """Each step's own verdict on whether it pays (techniques that measure their effect write one)."""
    return {technique: res["verdict"] for technique, res in _step_results(store, chain) if res.get("verdict")}


def run(quick: bool = True, recipes: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure the LLM side; ``recipes`` limits which recipe files run (default: all in recipes/llm)."""
    from tasks import pipeline
    from tasks.config import EvalConfig
    from tasks.pipeline import model_path
    from tasks.steps import store_from_settings

    started = time.time()
    run_tag = "bench-quick" if quick else "bench-full"
    conf = pipeline.resolve_config({"profile": "quick"})
    model = pipeline.ingest_model(conf, run_tag)
    data = pipeline.validate_data(conf, run_tag)
    store = store_from_settings()
    texts = pipeline._texts(store, data, "eval")
    eval_cfg = EvalConfig(ppl_windows=16 if quick else 48, window_len=256, latency_prompts=4,
                          new_tokens=32, repeats=2 if quick else 3)
    prompts = _prompts(texts, eval_cfg.latency_prompts)
    bw = _bandwidth()
    bandwidth = bw["read_gb_s"]
    teacher_dir = model_path(store, model)
    section: dict[str, Any] = {"machine": _machine(), "eval": eval_cfg.model_dump(), "memory_bandwidth_gbs": bandwidth,
                               "memory_bandwidth": bw}
    log.info("teacher (PyTorch fp32)")
    section["teacher"] = measure_artifact(teacher_dir, "hf", eval_cfg, texts, prompts, bandwidth)
    files = sorted((RECIPES / "llm").glob("*.yaml"))
    if recipes:
        files = [f for f in files if f.stem in set(recipes)]
    section["techniques"], students = {}, {}
    for f in files:
        spec = _recipe_role(f)
        log.info("recipe %s (%s)", f.stem, spec["role"])
        t0 = time.time()
        try:
            chain = run_recipe(f, f"{run_tag}-{f.stem}", model, data)
        except Exception as e:  # one failing technique must not hide the others' numbers
            log.exception("recipe %s failed", f.stem)
            section["techniques" if spec["role"] != "student" else "failed_students"] = \
                {**section.get("techniques", {}), f.stem: {"error": f"{type(e).__name__}: {e}"}}
            continue
        folder = model_path(store, chain)
        entry = measure_artifact(folder, chain["form"], eval_cfg, texts, prompts, bandwidth)
        entry |= {"recipe": f.stem, "steps": [s["technique"] for s in chain["steps"]],
                  "build_seconds": round(time.time() - t0, 1), "distill_tokens": distill_tokens(store, chain),
                  "note": spec.get("note", ""), "verdicts": step_verdicts(store, chain)}
        entry["vs_teacher"] = _ratios(entry, section["teacher"])
        if spec["role"] == "teacher_onnx":
            section["teacher_onnx"] = entry
        elif spec["role"] == "student":
            students[f.stem] = entry
        else:
            section["techniques"][spec.get("technique", f.stem)] = entry
    if "teacher_onnx" in section:
        for entry in section["techniques"].values():
            if "error" not in entry and entry["runtime"].startswith("onnxruntime"):
                entry["vs_teacher_onnx"] = _ratios(entry, section["teacher_onnx"])
    section["students"] = students
    if students:
        best_name, best = max(students.items(), key=lambda kv: _score(kv[1]))
        section["student"] = best
        section["profile"] = best_name
        section["distill_tokens"] = best["distill_tokens"]
        section["ratios"] = _ratios(best, section["teacher"])
    section["seconds"] = round(time.time() - started, 1)
    return section


def _score(entry: dict[str, Any]) -> tuple:
    """Best student: meets the most targets, then the best quality, then the fastest."""
    r = entry["vs_teacher"]
    met = sum([r["speedup_b1"] >= 3, r["size_ratio"] >= 4, r["quality_ratio"] <= 1.25])
    return (met, -r["quality_ratio"], r["speedup_b1"])


def _recipe_role(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text())
    return data.get("bench", {"role": "technique"})


def _bandwidth() -> dict[str, Any]:
    """Measured read bandwidth (the decode bound's denominator), with its samples to show the noise."""
    from tasks.hardware import measure_memory_bandwidth

    return measure_memory_bandwidth()


def _machine() -> dict[str, Any]:
    import platform

    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def table(section: dict[str, Any]) -> str:
    rows = [("teacher (torch fp32)", section.get("teacher"))]
    if "teacher_onnx" in section:
        rows.append(("teacher (ORT fp32)", section["teacher_onnx"]))
    rows += [(f"alone: {k}", v) for k, v in section.get("techniques", {}).items()]
    rows += [(f"student: {k}", v) for k, v in section.get("students", {}).items()]
    head = f"{'':34}{'size MB':>9}{'p50 b1 ms':>11}{'tok/s b1':>10}{'tok/s b16':>11}{'ppl':>9}{'bw frac':>9}"
    lines = [head]
    for name, e in rows:
        if not e:
            continue
        if "error" in e:
            lines.append(f"{name:34}  FAILED: {e['error'][:80]}")
            continue
        lines.append(f"{name:34}{e['size_bytes'] / 1e6:9.1f}{e['latency_ms_p50_b1']:11.1f}{e['tokens_per_s_b1']:10.1f}"
                     f"{e['throughput_b16']:11.1f}{e['quality']:9.2f}{e.get('fraction_of_bandwidth_bound', float('nan')):9.3f}")
    if "ratios" in section:
        r = section["ratios"]
        lines.append(f"student = {section['profile']} ({section['distill_tokens']} distillation tokens): "
                     f"speedup_b1 {r['speedup_b1']:.2f}x, throughput_b16 {r['throughput_ratio_b16']:.2f}x, "
                     f"size {r['size_ratio']:.2f}x smaller, perplexity ratio {r['quality_ratio']:.3f}")
    return "\n".join(lines)


__all__ = ["run", "table", "measure_artifact", "throughput_b16", "np"]
