"""The optimize pipeline as plain functions, one per DAG task.

Each function takes the validated config (as the JSON dict passed between tasks), the
pipeline run id and the small result dicts of its upstream tasks; it does its work through
``run_step`` (idempotent, atomically published) and returns a small JSON-able dict. The
Airflow DAG only wires these together; ``tasks.cli`` runs them in order without Airflow.

    conf = resolve_config({"profile": "quick"})
    model = ingest_model(conf, "run-1"); data = validate_data(conf, "run-1")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.config import OptimizeConfig
from tasks.errors import ConfigError
from tasks.settings import Settings
from tasks.steps import RESULT, run_step, safe_run_id, step_dir, store_from_settings

log = logging.getLogger(__name__)


def _cfg(conf: dict[str, Any]) -> OptimizeConfig:
    return OptimizeConfig.model_validate(conf)


def _ctx(run_id: str):
    settings = Settings.from_env()
    return settings, store_from_settings(settings), safe_run_id(run_id)


def prompts_from(texts: list[str], n: int, chars: int = 160) -> list[str]:
    """Latency prompts: the opening of the first ``n`` held-out documents, cut at a word boundary."""
    out = []
    for t in texts[:n]:
        cut = t[:chars]
        out.append(cut[: cut.rfind(" ")] if " " in cut else cut)
    return out


# -- 0. config --------------------------------------------------------------------------------
def resolve_config(params: dict[str, Any]) -> dict[str, Any]:
    """Validate the trigger's Params and the recipe they name (fails before any work)."""
    cfg = OptimizeConfig.from_params(params)
    cfg.build_recipe().plan()  # unknown technique, bad field, wrong order: a ConfigError now, not mid-run
    return cfg.model_dump(mode="json")


# -- 1. ingest ----------------------------------------------------------------------------------
def ingest_model(conf: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Resolve the source, convert it to an fp32 HF folder (cached) and publish it by content hash."""
    from tasks import ingest

    cfg = _cfg(conf)
    settings, store, rid = _ctx(run_id)

    def work(out: Path) -> dict[str, Any]:
        folder, info = ingest.materialize(cfg.source, settings.cache_dir, settings.s3_endpoint_url)
        kind = cfg.kind()
        if info["kind"] != kind:
            raise ConfigError("source", cfg.source, f"is a {info['kind']} model but recipe "
                                                    f"{cfg.build_recipe().name!r} optimizes {kind} models")
        key = f"models/{info['content_hash'][:24]}"
        if not store.exists(key):
            tmp = settings.scratch_dir / f".publish-{info['content_hash'][:12]}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _link_tree(folder, tmp)
            store.publish(tmp, key)
        return info | {"model_uri": store.uri(key)}

    return run_step(store, rid, "ingest", {"source": cfg.source}, work)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a folder (a copy where links are impossible): converted models are hundreds of MB."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


# -- 2. data --------------------------------------------------------------------------------------
def validate_data(conf: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Prepare the splits, then run the Great Expectations suite; bad data stops the run here."""
    from tasks import data, data_checks

    cfg = _cfg(conf)
    settings, store, rid = _ctx(run_id)

    def work(out: Path) -> dict[str, Any]:
        info = data.prepare(cfg.data, out)
        report = settings.reports_dir / rid / "data_validation.json"
        checks = data_checks.validate(out, cfg.data, report)
        return info | {"validation": checks}

    return run_step(store, rid, "data", cfg.data, work)


def model_path(store, result: dict[str, Any]) -> Path:
    """Local folder of the model a step result points at (``uri`` plus optional ``subdir``)."""
    base = step_dir(store, result.get("model_uri") or result["uri"])
    return base / result["subdir"] if result.get("subdir") else base


def _texts(store, data_result: dict[str, Any], split: str) -> list[str]:
    from tasks.data import read_split

    return read_split(step_dir(store, data_result["uri"]), split)


# -- 3. baseline & 7. evaluate ----------------------------------------------------------------
def baseline(conf: dict[str, Any], run_id: str, model: dict[str, Any], data_result: dict[str, Any]) -> dict[str, Any]:
    """Teacher quality and cost, measured by the same code that later measures the candidate."""
    from tasks import evaluate

    cfg = _cfg(conf)
    _, store, rid = _ctx(run_id)
    teacher_dir = step_dir(store, model["model_uri"])
    texts = _texts(store, data_result, "eval")

    def work(out: Path) -> dict[str, Any]:
        if cfg.kind() == "encoder":
            return _measure_encoder(teacher_dir, "hf", cfg)
        return {"kind": "causal_lm", **evaluate.measure(evaluate.TorchRunner(teacher_dir, threads=cfg.eval.threads),
                                                        cfg.eval, texts, prompts_from(texts, cfg.eval.latency_prompts))}

    return run_step(store, rid, "baseline", {"eval": cfg.eval.model_dump(), "model": model["content_hash"],
                                             "data": data_result["data_hash"]}, work)


def evaluate_candidate(conf: dict[str, Any], run_id: str, candidate: dict[str, Any],
                       data_result: dict[str, Any]) -> dict[str, Any]:
    """The candidate measured exactly like the baseline, in the same run."""
    from tasks import evaluate

    cfg = _cfg(conf)
    _, store, rid = _ctx(run_id)
    cand_dir = model_path(store, candidate)
    texts = _texts(store, data_result, "eval")

    def work(out: Path) -> dict[str, Any]:
        if cfg.kind() == "encoder":
            return _measure_encoder(cand_dir, "onnx", cfg)
        return {"kind": "causal_lm", **evaluate.measure(_llm_runner(cand_dir, cfg.eval.threads), cfg.eval, texts,
                                                        prompts_from(texts, cfg.eval.latency_prompts))}

    return run_step(store, rid, "evaluate", {"eval": cfg.eval.model_dump(), "candidate": candidate["uri"],
                                             "data": data_result["data_hash"]}, work)


def _llm_runner(folder: Path, threads: int):
    """onnxruntime for a plain export; the early-exit runtime when the export has exits."""
    from tasks import evaluate

    if (folder / "trimflow_early_exit.json").is_file():
        from tasks.early_exit import runner_for

        return runner_for(folder, threads=threads)
    return evaluate.OrtRunner(folder, threads=threads)


def _measure_encoder(folder: Path, form: str, cfg: OptimizeConfig) -> dict[str, Any]:
    """Encoder quality (Spearman on the Lee corpus) and cost; the same code for teacher and candidate."""
    from tasks.encoder_eval import EncoderEvalConfig, OrtEncoderRunner, TorchEncoderRunner, measure_encoder

    runner = TorchEncoderRunner(folder) if form == "hf" else OrtEncoderRunner(folder)
    m = measure_encoder(runner, EncoderEvalConfig(threads=cfg.eval.threads))
    # Common names so gates, registry and report read both kinds alike.
    return {"kind": "encoder", **m, "latency_ms_p50": m["latency_ms_p50_b1"], "latency_ms_p95": m["latency_ms_p95_b1"]}


# -- 4-6. the recipe, stage by stage: distill, prune, compress, early_exit, export, quantize ----------
def start_point(model: dict[str, Any]) -> dict[str, Any]:
    """The model a recipe starts from: the ingested teacher, in HF form."""
    return {"uri": model["model_uri"], "form": "hf", "hf_uri": model["model_uri"], "steps": []}


def run_stage(conf: dict[str, Any], run_id: str, stage: str, upstream: dict[str, Any], model: dict[str, Any],
              data_result: dict[str, Any]) -> dict[str, Any]:
    """Apply the recipe's steps of ``stage`` in order to ``upstream``; a stage with no step passes through.

    Every step is its own published artifact (``<run>/steps/<i>-<technique>``) with its config and
    result, keyed by its input, so a retried task reuses finished steps and the report can show
    what each step bought.
    """
    from tasks.steps import scratch_resume_dir
    from tasks.technique import STAGES, StepContext

    if stage not in STAGES:
        raise ConfigError("stage", stage, f"must be one of {STAGES}")
    cfg = _cfg(conf)
    settings, store, rid = _ctx(run_id)
    recipe = cfg.build_recipe()
    plan = [(i, tech, tcfg) for i, tech, tcfg in recipe.plan() if tech.stage == stage]
    current = dict(upstream)
    current.setdefault("steps", [])
    if not plan:
        return current | {"stage": stage, "skipped": True}
    teacher_dir = step_dir(store, model["model_uri"])
    cache: dict[str, list[str]] = {}

    def texts(split: str) -> list[str]:
        if split not in cache:
            cache[split] = _texts(store, data_result, split)
        return cache[split]

    for index, tech, tcfg in plan:
        name = f"{index:02d}-{tech.name}"
        src = model_path(store, current)
        ctx = StepContext(kind=recipe.kind, teacher_dir=teacher_dir, texts=texts,
                          resume_dir=scratch_resume_dir(store, rid, name),
                          hf_dir=model_path(store, {"uri": current["hf_uri"]}) if current.get("hf_uri") else None)
        key_config = {"technique": tech.name, "config": tcfg.model_dump(mode="json"), "input": current["uri"],
                      "teacher": model["content_hash"], "data": data_result["data_hash"]}
        result = run_step(store, rid, f"steps/{name}", key_config,
                          lambda out, tech=tech, tcfg=tcfg, src=src, ctx=ctx: tech.run(tcfg, src, out, ctx))
        current = {
            "uri": result["uri"],
            "form": tech.produces,
            "hf_uri": result["uri"] if tech.produces == "hf" else current.get("hf_uri"),
            "steps": current["steps"] + [{"step": name, "technique": tech.name, "stage": stage, "uri": result["uri"],
                                          "seconds": result.get("seconds"), "reused": result.get("reused")}],
        }
    return current | {"stage": stage}


# -- 8. quality gate --------------------------------------------------------------------------------
def quality_gate(conf: dict[str, Any], run_id: str, teacher: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Thresholds from Params; a failure names every failed gate and the report path."""
    from tasks import gates

    cfg = _cfg(conf)
    settings, _, rid = _ctx(run_id)
    return gates.check(cfg.gates, teacher, candidate, settings.reports_dir / rid / "quality_gate.json")


# -- 9. register -------------------------------------------------------------------------------------
def flat_params(cfg: OptimizeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = obj

    walk("", cfg.model_dump(mode="json"))
    return out


def metrics_of(teacher: dict[str, Any], candidate: dict[str, Any], verdict: dict[str, Any] | None = None) -> dict[str, float]:
    keys = ("perplexity", "quality", "size_bytes", "latency_ms_p50", "latency_ms_p95", "tokens_per_s", "ttft_ms_p50",
            "throughput_b16")
    m = {f"teacher_{k}": teacher[k] for k in keys if isinstance(teacher.get(k), (int, float))}
    m |= {f"student_{k}": candidate[k] for k in keys if isinstance(candidate.get(k), (int, float))}
    if verdict:
        m |= {f"ratio_{k}": v for k, v in verdict["ratios"].items()}
    return m


def register(conf: dict[str, Any], run_id: str, model: dict[str, Any], data_result: dict[str, Any],
             candidate: dict[str, Any], teacher_metrics: dict[str, Any], candidate_metrics: dict[str, Any],
             verdict: dict[str, Any]) -> dict[str, Any]:
    """A new MLflow model version with alias ``challenger`` and lineage tags."""
    from tasks import registry

    cfg = _cfg(conf)
    settings, store, rid = _ctx(run_id)
    report_dir = settings.reports_dir / rid
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
    artifacts = [p for p in (report_dir / "config.json", report_dir / "quality_gate.json",
                             report_dir / "data_validation.json") if p.is_file()]
    tags = {
        "trimflow.teacher_hash": model["content_hash"],
        "trimflow.source": cfg.source,
        "trimflow.data_hash": data_result["data_hash"],
        "trimflow.recipe": ",".join(step["technique"] for step in candidate.get("steps", [])),
        "trimflow.recipe_name": cfg.build_recipe().name,
        "trimflow.profile": cfg.profile,
        "trimflow.config_digest": cfg.digest(),
    }
    req = registry.RegisterRequest(
        name=cfg.registered_name(), run_id=rid, onnx_dir=model_path(store, candidate), kind=cfg.kind(),
        hf_dir=model_path(store, {"uri": candidate["hf_uri"]}) if candidate.get("hf_uri") else None,
        params=flat_params(cfg),
        metrics=metrics_of(teacher_metrics, candidate_metrics, verdict), tags=tags, artifacts=artifacts)
    return registry.register(req, settings.mlflow_tracking_uri)


# -- 12. report --------------------------------------------------------------------------------------
def report(conf: dict[str, Any], run_id: str, *, model: dict[str, Any], data: dict[str, Any], teacher: dict[str, Any],
           candidate: dict[str, Any], verdict: dict[str, Any], registered: dict[str, Any], deployed: dict[str, Any],
           smoke: dict[str, Any], chain: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON + Markdown summary, written to the state folder and logged to the MLflow run."""
    from tasks import registry
    from tasks import report as report_mod

    cfg = _cfg(conf)
    settings, store, rid = _ctx(run_id)
    if teacher.get("kind") == "encoder":
        # Tokens embedded per second at batch 16: the encoder's unit of work.
        rate = lambda m: {"tokens_per_s": m["throughput_b16"] * m.get("tokens_mean", 1.0)}  # noqa: E731
        basis = "batch-16 embedding"
    else:
        rate, basis = (lambda m: m), "batch-1 decode"
    cost = {
        "basis": f"{cfg.cost.node} at ${cfg.cost.usd_per_hour}/h, {basis}",
        "teacher_usd_per_1m_tokens": report_mod.cost_per_million_tokens(rate(teacher), cfg.cost.usd_per_hour),
        "student_usd_per_1m_tokens": report_mod.cost_per_million_tokens(rate(candidate), cfg.cost.usd_per_hour),
    }
    doc = {
        "run_id": rid,
        "source": cfg.source,
        "profile": cfg.profile,
        "techniques": list(cfg.techniques),
        "config": conf,
        "teacher_hash": model.get("content_hash"),
        "data": {k: data.get(k) for k in ("source", "counts", "dropped", "data_hash")},
        "teacher": teacher,
        "student": candidate,
        "gates": verdict,
        "cost": cost,
        "recipe": cfg.build_recipe().name,
        "steps": _step_summaries(store, rid, chain),
        "registered_model": {k: registered.get(k) for k in ("name", "version", "aliases", "mlflow_run_id")},
        "triton": deployed,
        "smoke_test": smoke,
    }
    # Aliases moved after registration (champion); read them fresh.
    doc["registered_model"]["aliases"] = next(
        (v["aliases"] for v in registry.versions(settings.mlflow_tracking_uri, registered["name"])
         if v["version"] == registered["version"]), registered.get("aliases"))
    paths = report_mod.write(doc, settings.reports_dir / rid)
    if registered.get("mlflow_run_id"):
        registry.log_run_artifacts(settings.mlflow_tracking_uri, registered["mlflow_run_id"],
                                   [Path(paths["json"]), Path(paths["markdown"])],
                                   {"cost_usd_per_1m_tokens_teacher": cost["teacher_usd_per_1m_tokens"],
                                    "cost_usd_per_1m_tokens_student": cost["student_usd_per_1m_tokens"]})
    return {"report": paths, "registered_model": doc["registered_model"]}


def _step_summaries(store, rid: str, chain: dict[str, Any] | None) -> dict[str, Any]:
    """Per published step: its scalar results (sizes, parameters, losses, timings)."""
    names = ["ingest", "data", "baseline"] + [f"steps/{st['step']}" for st in (chain or {}).get("steps", [])]
    names.append("evaluate")
    out: dict[str, Any] = {}
    for name in names:
        key = f"{rid}/{name}"
        if not store.exists(key):
            continue
        res = json.loads((store.fetch(key) / RESULT).read_text())
        out[name.removeprefix("steps/")] = {k: v for k, v in sorted(res.items()) if isinstance(v, (int, float, str))
                                            and k not in ("run_id", "step", "uri", "config_digest", "resolved_path")}
    return out


# -- 10. deploy & 11. smoke test ------------------------------------------------------------------------
def _serving_spec(cfg: OptimizeConfig):
    from serving.model_config import ModelConfigSpec

    if cfg.kind() == "encoder":
        return ModelConfigSpec.encoder_embed(cfg.deploy.name_for("encoder"), max_batch_size=32,
                                             max_queue_delay_microseconds=cfg.deploy.max_queue_delay_us,
                                             response_cache=cfg.deploy.response_cache)
    return ModelConfigSpec.llm_generate(cfg.deploy.name_for("causal_lm"), max_batch_size=cfg.deploy.max_batch_size,
                                        max_queue_delay_microseconds=cfg.deploy.max_queue_delay_us,
                                        response_cache=cfg.deploy.response_cache)


def _stream_spec(cfg: OptimizeConfig):
    from serving.model_config import ModelConfigSpec

    return ModelConfigSpec.llm_continuous(cfg.deploy.stream_name(), max_batch=cfg.deploy.max_batch_size)  # causal LMs only


def _champion_in(repo, model: str, champion: int | None) -> int | None:
    """The registry champion if this Triton model has it on disk (a wiped repository has none)."""
    if champion is not None and champion not in repo.versions(model):
        log.warning("deploy: champion v%s is not in %s; deploying without a fallback version", champion,
                    repo.uri(model))
        return None
    return champion


def deploy(conf: dict[str, Any], run_id: str, registered: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Roll the registered version out on Triton: the request-level model, then the streaming model.

    The Triton version number is the MLflow registry version. Each model goes through a canary
    (the candidate loaded as ``<model>__canary``, smoke-tested, sent canary traffic, then promoted by
    one explicit load); any failure rolls back and the champion keeps serving.
    """
    import tempfile

    from serving.loadgen import LoadConfig
    from serving.repository import EARLY_EXIT_META, ModelRepository
    from serving.rollout import RolloutConfig, rollout
    from serving.runtime.continuous import stage_model_code
    from serving.server import local_server
    from tasks import registry

    cfg = _cfg(conf)
    settings, store, _ = _ctx(run_id)
    if cfg.deploy.target == "none":
        return {"target": "none", "model_name": None, "version": None, "dynamic_batching": None,
                "response_cache": None}
    kind = cfg.kind()
    name, stream = cfg.deploy.name_for(kind), cfg.deploy.stream_name(kind)
    version = int(registered["version"])
    server = local_server(settings).ensure_running()
    repo = ModelRepository(settings.triton_repository, endpoint_url=settings.s3_endpoint_url,
                           scratch=settings.scratch_dir)
    champion = registry.alias_version(settings.mlflow_tracking_uri, registered["name"])
    cand_dir = model_path(store, candidate)
    if kind == "encoder":
        from serving.deploy import deploy_encoder

        if version in repo.versions(name) and server.ready_versions(name) == [version]:
            result = {"version": version, "served_versions": [version], "reused": True}
        else:
            result = deploy_encoder(cand_dir, name, version, _champion_in(repo, name, champion), server,
                                    spec=_serving_spec(cfg))
        running = server.model_config(name)
        return {"target": "local", "kind": "encoder", "model_name": name, "stream_model_name": None,
                "version": version, "champion_version": champion, "served_versions": server.ready_versions(name),
                "dynamic_batching": "dynamic_batching" in running,
                "response_cache": bool(running.get("response_cache", {}).get("enable", False)),
                "continuous_batching": None, "repository": repo.uri(name), "http_url": server.http_url,
                "grpc_url": server.grpc_url, "smoke": result.get("smoke_test")}
    if (cand_dir / EARLY_EXIT_META).is_file():
        # The continuous batcher decodes every row through all layers; exits are served by the
        # batched llm_early_exit model alone (serving.repository stages it for such an export).
        log.info("deploy: early-exit export: %s serves it with exits; no streaming model", name)
        stream = None
    smoke = dict(smoke_prompt=cfg.deploy.smoke_prompt, smoke_max_tokens=cfg.deploy.smoke_max_tokens)
    results: dict[str, Any] = {}
    models = [(name, _serving_spec(cfg), None, RolloutConfig(min_canary_requests=cfg.deploy.canary_requests,
                                                             canary_share=1.0, **smoke))]
    if stream:
        probe = LoadConfig(mode="stream", concurrency=1, max_requests=10_000, max_duration_s=3600,
                           prompt_words=(8, 16), max_tokens=(4, 8), request_timeout_s=120)
        models.append((stream, _stream_spec(cfg), "stream",
                       RolloutConfig(min_canary_requests=cfg.deploy.canary_requests, canary_share=1.0,
                                     smoke_endpoint="stream", probe=probe, **smoke)))
    for model, spec, kind, rcfg in models:
        if version in repo.versions(model) and server.ready_versions(model) == [version]:
            log.info("deploy: %s v%s already served (a retried task)", model, version)
            results[model] = {"version": version, "reused": True, "served_versions": [version]}
            continue
        code = stage_model_code(Path(tempfile.mkdtemp(dir=settings.scratch_dir))) if kind == "stream" else None
        try:
            results[model] = rollout(cand_dir, model, version, _champion_in(repo, model, champion), server,
                                     repository=repo, spec=spec, cfg=rcfg, model_code=code)
        except Exception:
            # The streaming model failed after the batched one moved: put the batched one back too.
            for done in results:
                _restore(settings, cfg, done, version, champion)
            raise
    running = server.model_config(name)
    return {
        "target": "local", "model_name": name, "stream_model_name": stream, "version": version,
        "champion_version": champion, "served_versions": server.ready_versions(name),
        "dynamic_batching": "dynamic_batching" in running,
        "response_cache": bool(running.get("response_cache", {}).get("enable", False)),
        "continuous_batching": bool(stream) and server.model_config(stream).get("model_transaction_policy", {}).get(
            "decoupled", False),
        "repository": repo.uri(name), "http_url": server.http_url, "grpc_url": server.grpc_url,
        "rollouts": {m: r.get("rollout", r) for m, r in results.items()},
    }


def _restore(settings, cfg: OptimizeConfig, model: str, failed_version: int, champion: int | None) -> None:
    from serving.deploy import rollback
    from serving.server import local_server

    spec = _stream_spec(cfg) if model == cfg.deploy.stream_name(cfg.kind()) else _serving_spec(cfg)
    err = rollback(model, failed_version, champion, local_server(settings), RuntimeError("a sibling model failed"),
                   spec=spec, stage="sibling rollback")
    log.error("%s", err)


def smoke_test(conf: dict[str, Any], run_id: str, registered: dict[str, Any], deployed: dict[str, Any]) -> dict[str, Any]:
    """Requests as clients send them (no version pinned): streaming, gRPC infer and HTTP infer.

    Passing moves alias ``champion`` to the new version. Failing rolls Triton back to the previous
    champion and fails the run.
    """
    from serving.client import generate
    from serving.rollout import smoke_test as smoke_request
    from serving.server import local_server
    from tasks import registry
    from tasks.errors import DeployError

    cfg = _cfg(conf)
    settings, _, _ = _ctx(run_id)
    if deployed.get("target") == "none":
        return {"ok": None, "skipped": "deploy_target=none", "text": ""}
    name, stream, version = deployed["model_name"], deployed.get("stream_model_name"), int(deployed["version"])
    server = local_server(settings).ensure_running()
    prompt, max_tokens = cfg.deploy.smoke_prompt, cfg.deploy.smoke_max_tokens
    if deployed.get("kind") == "encoder":
        return _smoke_encoder(settings, cfg, registered, deployed, server)
    try:
        for model in filter(None, (name, stream)):
            served = server.ready_versions(model)
            if served != [version]:
                raise DeployError(f"Triton serves versions {served} of {model}, expected only [{version}]")
        checks: dict[str, Any] = {}
        if stream:
            checks["stream"] = smoke_request(server.grpc_url, stream, endpoint="stream", prompt=prompt,
                                             max_tokens=max_tokens)
        checks["infer"] = smoke_request(server.grpc_url, name, endpoint="infer", prompt=prompt, max_tokens=max_tokens)
        http_text = generate(server.http_url, name, prompt, max_tokens=max_tokens, protocol="http")
        if http_text != checks["infer"]["text"]:
            raise DeployError(f"gRPC and HTTP disagree on a greedy request: {checks['infer']['text']!r} vs {http_text!r}")
    except Exception as e:  # any failure rolls every model back before the run fails
        for model in filter(None, (stream, name)):
            _restore(settings, cfg, model, version, deployed.get("champion_version"))
        raise DeployError(f"smoke test of v{version} failed ({type(e).__name__}: {e}); rolled back to "
                          f"v{deployed.get('champion_version')}") from e
    promoted = registry.promote(settings.mlflow_tracking_uri, registered["name"], registered["version"])
    main = checks.get("stream") or checks["infer"]
    return {"ok": True, "prompt": prompt, "text": main["text"], "endpoint": main["endpoint"],
            "latency_ms": main["latency_ms"], "ttft_ms": main.get("ttft_ms"),
            "checks": {k: {kk: v.get(kk) for kk in ("endpoint", "model", "text", "latency_ms", "ttft_ms")}
                       for k, v in checks.items()},
            "champion": promoted["version"], "aliases": promoted["aliases"]}


def _smoke_encoder(settings, cfg: OptimizeConfig, registered: dict[str, Any], deployed: dict[str, Any], server):
    """Embeddings as clients ask for them: related texts must sit closer than unrelated ones."""
    from serving.semantic_cache import embed_texts
    from tasks import registry
    from tasks.errors import DeployError

    name, version = deployed["model_name"], int(deployed["version"])
    texts = ["The city council approved the new school budget on Tuesday.",
             "On Tuesday the council passed the budget for the town's schools.",
             "Heavy rain flooded several roads near the coast."]
    try:
        if server.ready_versions(name) != [version]:
            raise DeployError(f"Triton serves versions {server.ready_versions(name)} of {name}, expected [{version}]")
        emb = embed_texts(server.grpc_url, name, texts)
        related, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
        if not related > unrelated:
            raise DeployError(f"paraphrase similarity {related:.3f} is not above unrelated {unrelated:.3f}")
    except Exception as e:  # roll back before failing the run
        _restore(settings, cfg, name, version, deployed.get("champion_version"))
        raise DeployError(f"smoke test of {name} v{version} failed ({type(e).__name__}: {e}); rolled back") from e
    promoted = registry.promote(settings.mlflow_tracking_uri, registered["name"], registered["version"])
    return {"ok": True, "endpoint": "infer", "text": f"cos(paraphrase)={related:.3f} > cos(unrelated)={unrelated:.3f}",
            "similarity": {"paraphrase": related, "unrelated": unrelated}, "champion": promoted["version"],
            "aliases": promoted["aliases"]}
