"""`make bench`: model-side figures for the default LLM and encoder, measured in one run.

Writes ``reports/bench.json`` (keys ``llm`` and ``encoder``, each with ``teacher``, ``student``,
``ratios`` and ``techniques``) and prints a table per model. It asserts nothing: it reports.

    python -m benchmarks.bench              # quick profile (CPU, bounded)
    python -m benchmarks.bench --full       # longer distillation and more eval windows
    python -m benchmarks.bench --only llm --recipes teacher-onnx student-quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tasks.settings import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the full profile (slow on CPU)")
    ap.add_argument("--only", choices=["llm", "encoder"], help="one model kind")
    ap.add_argument("--recipes", nargs="*", help="LLM recipe files (stems) to run; default all")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quick = not args.full
    started = time.time()
    report: dict = {"profile": "quick" if quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.out.is_file():  # keep the other kind's section when only one is re-run
        previous = json.loads(args.out.read_text())
        report |= {k: v for k, v in previous.items() if k in ("llm", "encoder")}
    if args.only in (None, "llm"):
        from benchmarks import bench_llm

        report["llm"] = bench_llm.run(quick=quick, recipes=args.recipes)
        gpu = _gpu_runs(Path(__file__).with_name("measured"))
        if gpu:  # measured on a GPU machine by benchmarks/gpu_distill.py: kept apart from this run's ratios
            report["llm"]["gpu_full_profile"] = gpu
        print("\nLLM (SmolLM2-135M-Instruct)\n" + bench_llm.table(report["llm"]))
        _write(args.out, report)
    if args.only in (None, "encoder"):
        try:
            from benchmarks import bench_encoder
        except ImportError as e:
            report["encoder"] = {"error": f"encoder benchmark unavailable: {e}"}
        else:
            report["encoder"] = bench_encoder.run(REPO_ROOT / ".trimflow" / "cache" / "bench-encoder", quick=quick)
            table = getattr(bench_encoder, "table", None)
            if table:
                print("\nEncoder (all-MiniLM-L6-v2)\n" + table(report["encoder"]))
    report["seconds"] = round(time.time() - started, 1)
    _write(args.out, report)
    print(f"\nwrote {args.out}")
    return 0


def _gpu_runs(folder: Path) -> dict:
    """The committed reports of ``benchmarks.gpu_distill`` runs (``measured/gpu_distill*.json``)."""
    return {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("gpu_distill*.json"))}


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
