"""`make demo`: the optimize DAG on the default model with embedded defaults.

Starts (or reuses) a local MLflow server on SQLite, migrates a SQLite Airflow home, runs
``airflow dags test optimize_model`` in the quick profile (its deploy task starts or reuses
the local Triton server), sends one generation request to the served champion through
tritonclient and writes ``<state>/reports/summary.json``.

    python -m devstack.demo                     # or: make demo
    python -m devstack.demo --param distill_steps=20 --profile ci
    python -m devstack.demo --stop              # stop MLflow and Triton
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devstack.airflow_env import airflow_bin, airflow_env
from devstack.mlflow_server import MlflowServer
from tasks.settings import Settings

DAG_ID = "optimize_model"
MLFLOW_PORT = int(os.environ.get("TRIMFLOW_MLFLOW_PORT", "5000"))


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param needs key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def mlflow_for(settings: Settings) -> MlflowServer:
    root = settings.home / "mlflow"
    return MlflowServer(backend_uri=f"sqlite:///{root / 'mlflow.db'}", artifacts=str(root / "artifacts"),
                        state_dir=root, port=MLFLOW_PORT)


def run_dag(settings: Settings, conf: dict[str, Any], env_extra: dict[str, str], log_file: Path,
            echo: bool = True) -> dict[str, Any]:
    """``airflow dags test`` with ``conf``; returns the run id and the final state of the DAG run."""
    env = airflow_env(settings.home / "airflow", extra=env_extra)
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run_id, state, failed = None, None, []
    with log_file.open("w") as log:
        proc = subprocess.Popen([airflow_bin(), "dags", "test", DAG_ID, "-c", json.dumps(conf)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = re.search(r"\[DAG TEST\] (starting|end task) task_id=(\w+)", line)
            if m and echo:
                print(f"  [{time.time() - started:6.0f}s] {m.group(1):>8} {m.group(2)}", flush=True)
            m = re.search(r"DagRun Finished: dag_id=\w+, .*?run_id=([^,]+), .*?state=(\w+)", line)
            if m:
                run_id, state = m.group(1), m.group(2)
            m = re.search(r"Task failed with exception|task_id=(\w+).*?state=failed", line)
            if m and m.group(1):
                failed.append(m.group(1))
        proc.wait()
    return {"run_id": run_id, "state": state or ("failed" if proc.returncode else "unknown"),
            "returncode": proc.returncode, "seconds": round(time.time() - started, 1), "log": str(log_file)}


def summarize(settings: Settings, dag: dict[str, Any], model_name: str) -> dict[str, Any]:
    """summary.json: the DAG run, the registered and served version, a live request, teacher vs student."""
    from serving.client import generate
    from serving.rollout import smoke_test
    from tasks.steps import safe_run_id

    summary: dict[str, Any] = {"dag_run": {"dag_id": DAG_ID, **dag}}
    report_path = settings.reports_dir / safe_run_id(dag["run_id"]) / "report.json" if dag.get("run_id") else None
    if report_path and report_path.is_file():
        rep = json.loads(report_path.read_text())
        keys = ("perplexity", "size_bytes", "latency_ms_p50", "latency_ms_p95", "tokens_per_s", "runtime")
        summary["teacher"] = {k: rep["teacher"].get(k) for k in keys}
        summary["student"] = {k: rep["student"].get(k) for k in keys}
        summary["ratios"] = rep.get("gates", {}).get("ratios")
        summary["cost"] = rep.get("cost")
        summary["registered_model"] = rep["registered_model"]
        summary["triton"] = {k: rep["triton"].get(k) for k in
                             ("model_name", "stream_model_name", "version", "dynamic_batching", "response_cache",
                              "continuous_batching", "http_url", "grpc_url", "repository")}
        summary["report"] = {"json": str(report_path), "markdown": str(report_path.with_suffix(".md"))}
    # A fresh request to whatever Triton serves now, through tritonclient.
    prompt = "The city council voted on Tuesday to"
    t0 = time.time()
    try:
        text = generate(settings.triton_grpc_url, model_name, prompt, max_tokens=24, protocol="grpc")
        summary["smoke_test"] = {"ok": bool(text.strip()), "prompt": prompt, "text": text,
                                 "latency_ms": round((time.time() - t0) * 1000, 1), "via": "tritonclient grpc"}
    except Exception as e:  # report the failure in the summary; the exit code says it too
        summary["smoke_test"] = {"ok": False, "prompt": prompt, "text": "", "error": str(e)}
    stream = (summary.get("triton") or {}).get("stream_model_name")
    if stream:
        try:
            streamed = smoke_test(settings.triton_grpc_url, stream, endpoint="stream", prompt=prompt, max_tokens=24)
            summary["stream_test"] = {k: streamed.get(k) for k in ("ok", "model", "text", "ttft_ms", "latency_ms",
                                                                   "responses")}
        except Exception as e:  # reported, and it fails the demo's exit code below
            summary["stream_test"] = {"ok": False, "model": stream, "error": str(e)}
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--param", action="append", default=[], help="extra DAG Param key=value (JSON values)")
    ap.add_argument("--stop", action="store_true", help="stop the demo's MLflow and Triton servers")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    mlflow_server = mlflow_for(settings)
    if args.stop:
        from serving.server import stop_recorded

        mlflow_server.stop()
        stop_recorded(settings)
        print("stopped MLflow and Triton")
        return 0
    t0 = time.time()
    print(f"trimflow demo — state folder {settings.home}")
    mlflow_server.start()
    print(f"MLflow tracking server {mlflow_server.url}")
    conf = {"profile": args.profile, **_parse_params(args.param)}
    env_extra = {"TRIMFLOW_HOME": str(settings.home), "MLFLOW_TRACKING_URI": mlflow_server.url}
    os.environ.update(env_extra)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"airflow dags test {DAG_ID} -c '{json.dumps(conf)}'")
    dag = run_dag(settings, conf, env_extra, settings.home / "logs" / f"demo-{stamp}.log")
    summary = summarize(Settings.from_env(), dag, conf.get("model_name", "trimflow_llm"))
    summary["demo_seconds"] = round(time.time() - t0, 1)
    out = settings.reports_dir / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    _print(summary, mlflow_server.url, settings)
    print(f"\nsummary: {out}")
    ok = dag["state"] == "success" and summary["smoke_test"]["ok"] and summary.get("stream_test", {}).get("ok", True)
    return 0 if ok else 1


def _print(s: dict[str, Any], mlflow_url: str, settings: Settings) -> None:
    print(f"\nDAG run {s['dag_run'].get('run_id')}: {s['dag_run']['state']} in {s['dag_run']['seconds']}s "
          f"(log {s['dag_run']['log']})")
    if "teacher" in s:
        t, c = s["teacher"], s["student"]
        print(f"{'':22}{'teacher':>14}{'optimized':>14}{'ratio':>9}")
        for key, label in (("perplexity", "perplexity"), ("size_bytes", "size (MB)"),
                           ("latency_ms_p50", "latency p50 (ms)"), ("tokens_per_s", "tokens/s (b=1)")):
            tv, cv = t.get(key), c.get(key)
            if key == "size_bytes":
                tv, cv = tv / 1e6, cv / 1e6
            print(f"{label:22}{tv:14.2f}{cv:14.2f}{cv / tv:8.2f}×")
        if s.get("cost"):
            print(f"cost / 1M tokens: ${s['cost']['teacher_usd_per_1m_tokens']:.3f} → "
                  f"${s['cost']['student_usd_per_1m_tokens']:.3f} ({s['cost']['basis']})")
        rm, tr = s["registered_model"], s["triton"]
        print(f"registered: {rm['name']} v{rm['version']} aliases {rm['aliases']}  (MLflow UI {mlflow_url})")
        print(f"served: Triton model {tr['model_name']} v{tr['version']} dynamic_batching={tr['dynamic_batching']} "
              f"response_cache={tr['response_cache']}")
        print(f"report: {s['report']['markdown']}")
    st = s["smoke_test"]
    print(f"request via tritonclient: ok={st['ok']} {st['prompt']!r} → {st.get('text') or st.get('error')!r}")
    if "stream_test" in s:
        sst = s["stream_test"]
        print(f"streamed from {sst.get('model')}: ok={sst['ok']} ttft {sst.get('ttft_ms')} ms, "
              f"{sst.get('responses')} chunks → {sst.get('text') or sst.get('error')!r}")
    print("Airflow UI: make airflow-ui  ·  MLflow UI: make mlflow-ui  ·  stop servers: make stop")


if __name__ == "__main__":
    sys.exit(main())
