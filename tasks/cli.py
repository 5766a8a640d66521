"""Command line: run the optimize pipeline (or show its config) without Airflow.

    trimflow config --profile quick --param prune_ratio=0.3
    trimflow run --profile ci --run-id cli-1 --param deploy_target=none
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from tasks.errors import TrimflowError
from tasks.technique import STAGES


def _params(profile: str, items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"profile": profile}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param needs key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_pipeline(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The DAG's tasks in its order, in this process."""
    from tasks import pipeline as p

    conf = p.resolve_config(params)
    model = p.ingest_model(conf, run_id)
    data = p.validate_data(conf, run_id)
    teacher = p.baseline(conf, run_id, model, data)
    chain = p.start_point(model)
    for stage in STAGES:
        chain = p.run_stage(conf, run_id, stage, chain, model, data)
    measured = p.evaluate_candidate(conf, run_id, chain, data)
    verdict = p.quality_gate(conf, run_id, teacher, measured)
    registered = p.register(conf, run_id, model, data, chain, teacher, measured, verdict)
    deployed = p.deploy(conf, run_id, registered, chain)
    smoke = p.smoke_test(conf, run_id, registered, deployed)
    return p.report(conf, run_id, model=model, data=data, teacher=teacher, candidate=measured, verdict=verdict,
                    registered=registered, deployed=deployed, smoke=smoke, chain=chain)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trimflow", description="Make language models cheaper to serve.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("config", "run"):
        sp = sub.add_parser(name)
        sp.add_argument("--profile", default="quick")
        sp.add_argument("--param", action="append", default=[], help="key=value (JSON values)")
        if name == "run":
            sp.add_argument("--run-id", default=f"cli-{time.strftime('%Y%m%dT%H%M%S')}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        params = _params(args.profile, args.param)
        if args.cmd == "config":
            from tasks.pipeline import resolve_config

            print(json.dumps(resolve_config(params), indent=2))
            return 0
        print(json.dumps(run_pipeline(params, args.run_id), indent=2, default=str))
        return 0
    except TrimflowError as e:
        print(f"trimflow: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
