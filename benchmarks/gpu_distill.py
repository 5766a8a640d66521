"""GPU figures for the LLM's full profile: KD students of the teacher distilled on CUDA (bf16 autocast).

The CPU quick profile distills on a few thousand tokens, far too few for a student to reach the
teacher's perplexity. This script runs ``tasks.distill`` unchanged on a GPU (it picks CUDA and bf16
autocast by itself) for millions of tokens, and scores teacher and students on the same held-out
windows ``make bench`` uses (first 16 windows of 256 tokens of the eval split), in fp32, so the
perplexity ratios are comparable with reports/bench.json. It also records the teacher's perplexity
and batch-1 decode speed in fp32 and fp16 on that GPU. Nothing is asserted; numbers are reported,
and the report is rewritten after every part so a run cut short still returns what it measured.

    python -m benchmarks.gpu_distill --source model.gguf --data DIR --out gpu.json \\
        --student 24:1200 --student 20:1200 --batch 32 --budget-s 420

``DIR`` holds ``train.jsonl`` and ``eval.jsonl`` (tasks.data's split files).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.gpu")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try the script on a tiny model


def _free() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _windows(model_dir: Path, texts: list[str], n: int, length: int):
    from tasks.evaluate import _FolderTokenizer, perplexity_windows

    conf = json.loads((model_dir / "config.json").read_text())
    eos = conf.get("eos_token_id")
    tok = _FolderTokenizer(model_dir)
    runner = type("R", (), {"encode": staticmethod(tok.encode), "eos_token_id": eos[0] if isinstance(eos, list) else eos})
    return perplexity_windows(runner, texts, n, length)


def perplexity(model_dir: Path, windows, dtype: str = "float32") -> float:
    """Held-out perplexity of a HF folder on ``windows`` [n, length], on the GPU, in ``dtype``."""
    import torch

    from tasks.modelio import load_causal_lm

    model = load_causal_lm(model_dir).to(_device(), dtype=getattr(torch, dtype)).eval()
    ids = torch.as_tensor(windows, device=_device())
    nll = []
    with torch.inference_mode():
        for row in ids:
            logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, row[1:], reduction="none"))
    del model
    _free()
    return float(torch.exp(torch.cat(nll).mean()))


def decode_tokens_per_s(model_dir: Path, prompt_ids, dtype: str, new_tokens: int = 64) -> float:
    """Batch-1 greedy decode speed (tokens after the first / time after the first) with HF generate."""
    import torch

    from tasks.modelio import load_causal_lm

    model = load_causal_lm(model_dir).to(_device(), dtype=getattr(torch, dtype)).eval()
    x = torch.as_tensor([prompt_ids], device=_device())
    sync = torch.cuda.synchronize if _device() == "cuda" else (lambda: None)

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    with torch.inference_mode():
        run(8)  # warm-up
        first, full = min(run(1) for _ in range(3)), min(run(new_tokens) for _ in range(3))
    del model
    _free()
    return round((new_tokens - 1) / (full - first), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="teacher: .gguf file or HF folder (tasks.ingest converts it)")
    ap.add_argument("--data", type=Path, required=True, help="folder with train.jsonl and eval.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--student", action="append", default=[], help="LAYERS:STEPS, in priority order")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip a student that would end past this")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from tasks.data import read_split
    from tasks.distill import KDConfig, distill
    from tasks.ingest import materialize

    started = time.time()
    device = torch.cuda.get_device_name(0) if _device() == "cuda" else "cpu"
    report: dict[str, Any] = {"device": device, "torch": torch.__version__,
                              "batch": args.batch, "seq_len": args.seq_len,
                              "quality_metric": f"held-out perplexity, {args.windows}x{args.window_len} news tokens, fp32",
                              "students": {}}

    def write() -> None:
        report["seconds"] = round(time.time() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    work = Path(tempfile.mkdtemp(prefix="trimflow-gpu-"))
    teacher, info = materialize(args.source, work / "cache")
    train, evals = read_split(args.data, "train"), read_split(args.data, "eval")
    windows = _windows(teacher, evals, args.windows, args.window_len)
    prompt = [int(t) for t in windows[0][:32]]
    t_ppl = perplexity(teacher, windows)
    report["teacher"] = {"content_hash": info["content_hash"], "quality": round(t_ppl, 3),
                         "quality_fp16": round(perplexity(teacher, windows, "float16"), 3),
                         "decode_tokens_per_s_b1_fp32": decode_tokens_per_s(teacher, prompt, "float32"),
                         "decode_tokens_per_s_b1_fp16": decode_tokens_per_s(teacher, prompt, "float16")}
    write()
    for spec in args.student:
        layers, steps = (int(x) for x in spec.split(":"))
        spent = time.time() - started
        # Whole seconds per step of the students so far (model build included): never rounds to 0.
        per_step = max((s["seconds"] / s["steps"] for s in report["students"].values() if "steps" in s),
                       default=0.0)
        if per_step and spent + per_step * steps * 1.3 > args.budget_s:
            report["students"][spec] = {"skipped": f"{spent:.0f} s spent; about {per_step * steps:.0f} s more "
                                                   f"would pass the {args.budget_s:.0f} s budget"}
            write()
            continue
        cfg = KDConfig(student_layers=layers, steps=steps, batch_size=args.batch, seq_len=args.seq_len,
                       checkpoint_every=steps, progress=False)
        out = work / f"student-{layers}-{steps}"
        res = distill(cfg, teacher, train, out, work / f"resume-{layers}-{steps}")
        s_ppl = perplexity(out, windows)
        report["students"][spec] = {
            "student_layers": layers, "steps": steps, "tokens_seen": res["tokens_seen"],
            "num_parameters": res["num_parameters"], "seconds": res["seconds"],
            "seconds_per_step": res["seconds_per_step"], "device": res["device"], "dtype": res["dtype"],
            "final_loss": res["final_loss"], "quality": round(s_ppl, 3),
            "quality_ratio": round(s_ppl / t_ppl, 4),
            "decode_tokens_per_s_b1_fp32": decode_tokens_per_s(out, prompt, "float32"),
        }
        write()
    ok = [s for s in report["students"].values() if "quality_ratio" in s]
    if ok:
        best = min(ok, key=lambda s: s["quality_ratio"])
        report["best"] = {k: best[k] for k in ("student_layers", "steps", "tokens_seen", "quality_ratio")}
    write()
    print(json.dumps(report, indent=2))
    return 0 if math.isfinite(t_ppl) else 1


if __name__ == "__main__":
    sys.exit(main())
