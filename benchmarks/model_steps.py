"""Time the model-side steps of a profile on a real model: baseline, distill, prune, export, quantize, evaluate.

Reports numbers (one JSON line per step, then a summary); asserts nothing. Used to size the
``quick`` profile so a whole DAG run fits its time budget on a 2-core CPU machine.

    python benchmarks/model_steps.py --model /path/to/fp32-hf-folder --work /tmp/bench --profile quick
    (the data split is prepared once under --work/data; step folders there are recreated each run)
    python benchmarks/model_steps.py --model DIR --work DIR --set distill.steps=10 --set distill.student_layers=24
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="fp32 Hugging Face folder of the teacher")
    p.add_argument("--work", type=Path, required=True, help="empty or reusable scratch folder")
    p.add_argument("--profile", default="quick")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. distill.steps=10 (JSON values)")
    p.add_argument("--skip", action="append", default=[], choices=["baseline", "distill", "prune", "quantize"])
    args = p.parse_args(argv)

    from tasks.config import OptimizeConfig
    from tasks.data import prepare, read_split

    conf = json.loads(OptimizeConfig.preset(args.profile).model_dump_json())
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        try:
            conf[section][field] = json.loads(value)
        except ValueError:  # a bare string such as a weight type
            conf[section][field] = value
    cfg = OptimizeConfig.model_validate(conf)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("distill", "resume", "prune", "onnx", "int8"):  # a rerun must not resume or reuse
        shutil.rmtree(work / stale, ignore_errors=True)
    data_dir = work / "data"
    if not (data_dir / "eval.jsonl").is_file():
        prepare(cfg.data, data_dir)
    train, eval_texts, calib = (read_split(data_dir, s) for s in ("train", "eval", "calib"))
    prompts = [t[:160].rsplit(" ", 1)[0] for t in eval_texts[: cfg.eval.latency_prompts]]
    summary: dict[str, float] = {}

    def step(name, fn):
        t0 = time.time()
        result = fn()
        summary[name] = round(time.time() - t0, 1)
        print(json.dumps({"step": name, "wall_s": summary[name], **result}, default=str), flush=True)
        return result

    from tasks import distill, evaluate, export, prune, quantize

    if "baseline" not in args.skip:
        step("baseline", lambda: evaluate.measure(evaluate.TorchRunner(args.model, threads=cfg.eval.threads),
                                                  cfg.eval, eval_texts, prompts))
    src = args.model
    if "distill" not in args.skip:
        step("distill", lambda: distill.distill(cfg.distill, args.model, train, work / "distill", work / "resume"))
        src = work / "distill"
    if "prune" not in args.skip and cfg.prune.mlp_ratio > 0:
        step("prune", lambda: prune.prune_mlp(cfg.prune, src, work / "prune", calib_texts=calib))
        src = work / "prune"
    step("export", lambda: export.export_causal_lm(src, work / "onnx", cfg.export))
    cand = work / "onnx"
    if "quantize" not in args.skip:
        step("quantize", lambda: quantize.quantize_dynamic_int8(cfg.quantize, work / "onnx", work / "int8",
                                                                probe_texts=calib))
        cand = work / "int8"
    step("evaluate", lambda: evaluate.measure(evaluate.OrtRunner(cand, threads=cfg.eval.threads), cfg.eval,
                                              eval_texts, prompts))
    print(json.dumps({"summary_wall_s": summary, "total_s": round(sum(summary.values()), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
