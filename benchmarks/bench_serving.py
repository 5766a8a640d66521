"""`make bench-serving`: serving figures on one real tritonserver (127.0.0.1), all measured in one run.

Prepares the models itself (SmolLM2 and all-MiniLM-L6-v2 through ``tasks.ingest``, exported with
``tasks.export`` / ``tasks.encoder`` and cached under ``<cache>/bench-serving/``), starts one
server and runs the sections on it, then writes ``reports/bench_serving.json``. It asserts
nothing; a section whose module is not in this checkout is reported as missing, one that fails
is reported with its error, and the other sections still run:

    python -m benchmarks.bench_serving                         # quick profile
    python -m benchmarks.bench_serving --full --slo-ms 3000
    python -m benchmarks.bench_serving --sections rollout search

Sections and the keys they give the report:
    caches      (benchmarks/serving_caches.py)      dynamic.unbatched, dynamic.batched_cached, dynamic.ratio, cache.*
    generation  (benchmarks/serving_generation.py)  generation.request_level, generation.continuous,
                                                    generation.ratio, prefix_cache.ttft_ratio, prompt.tokens_saved_ratio
    rollout     (here, serving.rollout)             rollout.failed_requests, rollout.rollback_ok, rollout.*
    search      (here, serving.config_search)       search.chosen, search.table, search.*
Their ``run`` functions get the keyword arguments they declare among: server, quick, model_dir
(the SmolLM2 export), encoder_dir (the MiniLM export), work_dir.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from tasks.settings import REPO_ROOT, Settings

log = logging.getLogger("bench_serving")

LLM_MODEL = "bench_llm"
# Keys each section must give the report; "x.*" means at least one key under x.
EXPECTED: dict[str, tuple[str, ...]] = {
    "caches": ("dynamic.unbatched", "dynamic.batched_cached", "dynamic.ratio", "cache.*"),
    "generation": ("generation.request_level", "generation.continuous", "generation.ratio",
                   "prefix_cache.ttft_ratio", "prompt.tokens_saved_ratio"),
    "rollout": ("rollout.failed_requests", "rollout.rollback_ok"),
    "search": ("search.chosen",),
}
EXTERNAL = {"caches": "benchmarks.serving_caches", "generation": "benchmarks.serving_generation"}


class Incompatible(Exception):
    """A section's ``run`` needs an argument the harness does not have."""


# -- report assembly ---------------------------------------------------------------------------------
def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """One level of nesting as dotted keys: ``{"dynamic": {"ratio": 2}}`` → ``{"dynamic.ratio": 2}``.

    Keys that are already dotted and values that are not dicts stay as they are.
    """
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict) and "." not in key:
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def _matches(key: str, pattern: str) -> bool:
    return key.startswith(pattern[:-1]) if pattern.endswith(".*") else key == pattern


def headline(section: str, result: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The report's top-level keys from one section's result, and the expected keys it lacks."""
    flat = flatten(result)
    patterns = EXPECTED.get(section, ())
    if section in ("rollout", "search"):  # the harness's own sections: everything they return is headline
        patterns = patterns + (f"{section}.*",)
    top = {k: v for k, v in flat.items() if any(_matches(k, p) for p in patterns)}
    missing = [p for p in EXPECTED.get(section, ()) if not any(_matches(k, p) for k in flat)]
    return top, missing


def call_with(fn: Callable[..., dict], ctx: dict[str, Any]) -> dict:
    """Call ``fn`` with the arguments it declares among ``ctx``; ``Incompatible`` if it needs others."""
    params = inspect.signature(fn).parameters
    needed = [n for n, p in params.items() if p.default is inspect.Parameter.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in ctx]
    if needed:
        raise Incompatible(f"run() needs {needed}; the harness offers {sorted(ctx)}")
    return fn(**{n: ctx[n] for n in params if n in ctx})


def external_runner(section: str) -> tuple[Callable[..., dict] | None, str]:
    """The ``run`` of another engineer's benchmark module, or None and why not."""
    module = EXTERNAL[section]
    if importlib.util.find_spec(module) is None:
        return None, f"{module.replace('.', '/')}.py is not in this checkout"
    fn = getattr(importlib.import_module(module), "run", None)
    if not callable(fn):
        return None, f"{module} has no run() function"
    return fn, ""


def run_section(section: str, fn: Callable[..., dict] | None, reason: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """One section's outcome: status ok / missing / incompatible / failed, seconds, result or reason."""
    if fn is None:
        return {"status": "missing", "reason": reason, "missing_keys": list(EXPECTED.get(section, ()))}
    t0 = time.perf_counter()
    try:
        result = call_with(fn, ctx)
    except Incompatible as e:
        return {"status": "incompatible", "reason": str(e), "missing_keys": list(EXPECTED.get(section, ()))}
    except Exception as e:  # a broken section is reported, the others still run
        log.error("section %s failed: %s", section, e)
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:],
                "seconds": round(time.perf_counter() - t0, 1), "missing_keys": list(EXPECTED.get(section, ()))}
    top, missing = headline(section, result)
    return {"status": "ok", "seconds": round(time.perf_counter() - t0, 1), "headline": top, "missing_keys": missing,
            "result": result}


# -- model preparation ---------------------------------------------------------------------------------
def _publish(out: Path, make: Callable[[Path], Any]) -> Path:
    """Build into a temporary sibling and rename: an interrupted export is never taken for a finished one."""
    if out.is_dir():
        return out
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        make(tmp)
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():  # another run published the same export meanwhile
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_llm(cache: Path) -> Path:
    """SmolLM2-135M-Instruct exported to ONNX with KV cache (cached by source hash and export config)."""
    from tasks.config import ExportConfig
    from tasks.export import export_causal_lm
    from tasks.ingest import materialize

    hf, info = materialize("smollm2", Settings.from_env().cache_dir)
    cfg = ExportConfig()
    return _publish(cache / f"smollm2-onnx-{info['content_hash'][:12]}-{cfg.digest()}",
                    lambda tmp: export_causal_lm(hf, tmp, cfg))


def prepare_encoder(cache: Path) -> Path:
    """all-MiniLM-L6-v2 exported with ``tasks.encoder`` (cached like the LLM)."""
    from tasks.encoder import EncoderExportConfig, export_encoder
    from tasks.ingest import materialize

    hf, info = materialize("minilm", Settings.from_env().cache_dir)
    cfg = EncoderExportConfig()
    return _publish(cache / f"minilm-encoder-{info['content_hash'][:12]}-{cfg.digest()}",
                    lambda tmp: export_encoder(hf, tmp, cfg))


def _broken_copy(model_dir: Path, dest: Path) -> Path:
    """The export with its ONNX file cut to 1 MB (cannot load); the rest hard-linked."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    meta = json.loads((model_dir / "trimflow_model.json").read_text())
    onnx = meta.get("onnx_file", "model.onnx")
    for p in model_dir.iterdir():
        if p.is_file() and p.name != onnx and not p.name.startswith(onnx + "."):
            os.link(p, dest / p.name)
    with open(model_dir / onnx, "rb") as f:
        (dest / onnx).write_bytes(f.read(1 << 20))
    return dest


# -- the harness's own sections -------------------------------------------------------------------------
def _traffic(quick: bool):
    from serving.loadgen import LoadConfig

    return LoadConfig(concurrency=2, rate_rps=2.0 if quick else 4.0, max_requests=100_000, max_duration_s=1800,
                      prompt_words=(8, 16, 32), max_tokens=(4, 8), request_timeout_s=180)


def _llm_spec():
    from serving.model_config import ModelConfigSpec

    return ModelConfigSpec.llm_generate(LLM_MODEL, max_batch_size=8, max_queue_delay_microseconds=5000)


def rollout_section(server, model_dir: Path, work_dir: Path, quick: bool = True) -> dict[str, Any]:
    """v1 → v2 under continuous routed and unversioned load, then a broken v3 under the same load.

    Returns ``rollout``: failed_requests (both loads during the v1→v2 rollout), rollback_ok (v3
    rolled back and v2 answers), swap {routed, direct, stages, canary}, broken {stage, rollback,
    failed_requests, ...}.
    """
    from serving.loadgen import LoadGenerator, Target
    from serving.rollout import CanaryRouter, RolloutConfig, rollout, smoke_test
    from tasks.errors import RolloutFailed

    spec, traffic = _llm_spec(), _traffic(quick)
    rollout(model_dir, LLM_MODEL, 1, None, server, spec=spec)
    cfg = RolloutConfig(canary_share=0.25, min_canary_requests=4 if quick else 12, probe=None,
                        canary_timeout_s=600)

    def under_load(fn):
        router = CanaryRouter(Target(LLM_MODEL))
        direct = LoadGenerator(server.grpc_url, traffic.model_copy(update={"seed": 11}), model=LLM_MODEL)
        routed = LoadGenerator(server.grpc_url, traffic, router=router)
        with direct, routed:
            time.sleep(3.0)  # traffic flowing before the rollout starts, and after it ends
            outcome = fn(router)
            time.sleep(3.0)
        return outcome, routed.result, direct.result

    def brief(load: dict) -> dict:
        return {k: load[k] for k in ("requests", "ok", "failed", "errors", "duration_s", "latency_ms", "by_target")}

    swap, routed, direct = under_load(lambda router: rollout(model_dir, LLM_MODEL, 2, 1, server, spec=spec,
                                                             cfg=cfg, router=router))

    def broken_rollout(router):
        try:
            rollout(_broken_copy(model_dir, work_dir / "broken-export"), LLM_MODEL, 3, 2, server, spec=spec, cfg=cfg,
                    router=router)
        except RolloutFailed as e:
            return e.report
        return {"stage": None, "rollback_ok": False, "rollback": ["the broken version was promoted"]}

    broken, b_routed, b_direct = under_load(broken_rollout)
    answers = True
    try:
        smoke_test(server.grpc_url, LLM_MODEL)
    except Exception as e:  # the report says the champion did not answer; the harness carries on
        answers = False
        broken.setdefault("rollback", []).append(f"post-check failed: {e}")
    return {"rollout": {
        "failed_requests": routed["failed"] + direct["failed"],
        "rollback_ok": bool(broken.get("rollback_ok")) and answers and server.ready_versions(LLM_MODEL) == [2],
        "swap": {"routed": brief(routed), "direct": brief(direct), "stages_s": swap["rollout"]["stages"],
                 "canary": swap["rollout"]["canary"], "served_versions": swap["served_versions"]},
        "broken": {"stage": broken.get("stage"), "rollback": broken.get("rollback"),
                   "served_versions": server.ready_versions(LLM_MODEL),
                   "failed_requests": b_routed["failed"] + b_direct["failed"],
                   "requests": b_routed["requests"] + b_direct["requests"], "stages_s": broken.get("stages")},
        "traffic": traffic.model_dump(mode="json"),
    }}


def search_section(server, model_dir: Path, quick: bool = True, slo_ms: float = 5000.0) -> dict[str, Any]:
    """Config search on the SmolLM2 model (deployed here if the rollout section did not run)."""
    from serving.config_search import SearchConfig, SearchSpace, search_config
    from serving.loadgen import LoadConfig
    from serving.repository import ModelRepository
    from serving.rollout import rollout
    from tasks.errors import SloNotMet

    if not server.ready_versions(LLM_MODEL):
        rollout(model_dir, LLM_MODEL, 1, None, server, spec=_llm_spec())
    if quick:
        space = SearchSpace(max_batch_sizes=(1, 8), queue_delays_us=(0, 20000), instance_counts=(1, 2))
        load = LoadConfig(concurrency=8, max_requests=24, max_duration_s=40, warmup_requests=1,
                          prompt_words=(8, 32), max_tokens=(8, 16), request_timeout_s=180)
    else:
        space = SearchSpace(max_batch_sizes=(1, 4, 8), queue_delays_us=(0, 5000, 20000), instance_counts=(1, 2))
        load = LoadConfig(concurrency=8, max_requests=64, max_duration_s=90, warmup_requests=2,
                          prompt_words=(8, 32, 96), max_tokens=(8, 16, 32), request_timeout_s=300)
    cfg = SearchConfig(p95_slo_ms=slo_ms, space=space, load=load, max_total_s=1800)
    try:
        r = search_config(server, LLM_MODEL, cfg)
    except SloNotMet as e:
        r = json.loads(ModelRepository(server.config.model_repository).read_text(LLM_MODEL, "search.json"))
        r["note"] = str(e)
    keep = ("instances", "max_batch_size", "queue_delay_us", "parameters", "ok_rps", "p50_ms", "p95_ms", "avg_batch",
            "failed", "meets_slo", "load_s", "error")
    table = [{k: row.get(k) for k in keep if k in row} for row in r["table"]]
    chosen = {k: r["chosen"].get(k) for k in keep if k in r["chosen"]} if r.get("chosen") else None
    return {"search": {"chosen": chosen, "p95_slo_ms": r["p95_slo_ms"], "table": table, "skipped": r["skipped"],
                       "applied": r.get("applied"), "search_uri": r["search_uri"], "duration_s": r.get("duration_s"),
                       "note": r.get("note"), "load": load.model_dump(mode="json")}}


# -- main ------------------------------------------------------------------------------------------------------
def _summary_line(key: str, value: Any) -> str:
    if isinstance(value, dict):
        picks = {k: value[k] for k in ("throughput_rps", "tokens_per_s", "p50_ms", "p95_ms", "ok_rps", "max_batch_size",
                                       "queue_delay_us", "instances") if k in value}
        value = picks or f"{{{len(value)} keys}}"
    elif isinstance(value, list):
        value = f"[{len(value)} items]"
    return f"  {key:32s} {value}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="longer loads and a larger search (slow on CPU)")
    ap.add_argument("--sections", nargs="*", choices=list(EXPECTED), default=list(EXPECTED))
    ap.add_argument("--slo-ms", type=float, default=5000.0, help="p95 latency SLO of the config search (default 5000)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench_serving.json")
    ap.add_argument("--cache", type=Path, default=None, help="default <TRIMFLOW_HOME>/cache/bench-serving")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a section is missing or failed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "urllib3", "botocore", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from serving.server import LocalTriton, TritonConfig

    quick = not args.full
    cache = args.cache or Settings.from_env().cache_dir / "bench-serving"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: dict[str, Any] = {"profile": "quick" if quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "sections_requested": args.sections}
    ctx: dict[str, Any] = {"quick": quick}
    models: dict[str, Any] = {}
    for name, prepare, key in (("llm", prepare_llm, "model_dir"), ("encoder", prepare_encoder, "encoder_dir")):
        t0 = time.perf_counter()
        try:
            ctx[key] = prepare(cache)
            models[name] = {"path": str(ctx[key]), "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # sections that need this model become incompatible; the rest run
            log.error("preparing the %s failed: %s", name, e)
            models[name] = {"error": f"{type(e).__name__}: {e}"}
    report["models"] = models
    run_dir = cache / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # this harness's own scratch: one server's repository per run
    (run_dir / "models").mkdir(parents=True)
    ctx["work_dir"] = run_dir / "work"
    ctx["work_dir"].mkdir()
    server = LocalTriton(TritonConfig.on_free_ports(run_dir / "models", run_dir / "state"))
    sections: dict[str, Any] = {}
    with server:
        report["server"] = {**server.urls(), "log": str(server.log_file)}
        for section in args.sections:
            log.info("section %s", section)
            if section in EXTERNAL:
                fn, reason = external_runner(section)
            elif section == "rollout":
                fn, reason = rollout_section, ""
            else:
                fn, reason = (lambda server, model_dir, quick: search_section(server, model_dir, quick, args.slo_ms)), ""
            sections[section] = run_section(section, fn, reason, {**ctx, "server": server})
            _write(args.out, _assemble(report, sections, started))
    final = _assemble(report, sections, started)
    _write(args.out, final)
    print(f"\nserving benchmark ({final['profile']}, {final['seconds']} s) -> {args.out}")
    for s in sections.values():
        for key, value in s.get("headline", {}).items():
            print(_summary_line(key, value))
    for section, s in sections.items():
        if s["status"] != "ok" or s["missing_keys"]:
            print(f"  MISSING {section}: {s['status']}: {s.get('reason', '')} (keys {s['missing_keys']})")
    bad = any(s["status"] != "ok" or s["missing_keys"] for s in sections.values())
    return 1 if args.strict and bad else 0


def _assemble(report: dict[str, Any], sections: dict[str, Any], started: float) -> dict[str, Any]:
    """Metadata, then every section's headline keys at the top level, then ``missing`` and ``sections``."""
    results: dict[str, Any] = {}
    for s in sections.values():
        results.update(s.get("headline", {}))
    missing = {name: {"status": s["status"], "reason": s.get("reason", ""), "keys": s["missing_keys"]}
               for name, s in sections.items() if s["missing_keys"]}
    return {**report, "seconds": round(time.time() - started, 1), **results, "missing": missing,
            "sections": {name: {k: v for k, v in s.items() if k != "headline"} for name, s in sections.items()}}


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
