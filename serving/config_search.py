"""Find the serving configuration with the highest throughput that meets a p95 latency SLO.

What Triton Model Analyzer does, on the real local server: every candidate (max batch size ×
queue delay × instance count × optional model parameters) is written as a config of a scratch
copy of the deployed version (``<model>__search``), loaded, warmed up and measured with the same
seeded load (``serving.loadgen``). The winner is written into the deployed ``config.pbtxt`` (its
version policy, cache and parameters kept) with the whole table beside it in ``search.json``:

    result = search_config(server, "tinyllm", SearchConfig(p95_slo_ms=500))
    result["chosen"]   # {"max_batch_size": 8, "queue_delay_us": 2000, "instances": 1, "ok_rps": ..., ...}
    repo.read_text("tinyllm", "search.json")

The sweep is bounded: at most ``space.max_candidates`` candidates and ``max_total_s`` seconds,
each measured within its load's request and time bounds.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator

from serving.loadgen import LoadConfig, ServingConfig, run_load
from serving.model_config import VersionPolicy, parse_pbtxt
from serving.repository import ModelRepository
from serving.server import LocalTriton
from tasks.errors import ConfigError, DeployError, SloNotMet

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
SCRATCH_SUFFIX = "__search"


class SearchSpace(ServingConfig):
    """The candidates: every combination, minus those that mean the same thing.

    With a max batch size of 1 no batch can form, so only the first queue delay is kept for it.

    Args:
        max_batch_sizes: Triton ``max_batch_size`` values (default 1, 4, 8).
        queue_delays_us: dynamic-batcher ``max_queue_delay_microseconds`` values (default 0, 2000, 10000).
        instance_counts: CPU instances (default 1, 2).
        parameters: model parameters to sweep too, e.g. ``{"max_batch": ("4", "8")}`` for the
            continuous-batching model (default none).
        max_candidates: most candidates measured; the rest are listed as skipped (default 12).
    """

    max_batch_sizes: tuple[int, ...] = (1, 4, 8)
    queue_delays_us: tuple[int, ...] = (0, 2000, 10000)
    instance_counts: tuple[int, ...] = (1, 2)
    parameters: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    max_candidates: int = Field(12, ge=1, le=64)

    @field_validator("max_batch_sizes", "queue_delays_us", "instance_counts")
    @classmethod
    def _non_empty(cls, v: tuple[int, ...], info) -> tuple[int, ...]:
        low = {"max_batch_sizes": 0, "queue_delays_us": 0, "instance_counts": 1}[info.field_name]
        if not v or min(v) < low:
            raise ValueError(f"need at least one value, each >= {low}")
        return tuple(dict.fromkeys(v))

    def candidates(self) -> list[dict[str, Any]]:
        """Every distinct candidate, in sweep order (instances, then batch size, delay, parameters)."""
        grid = [dict(zip(self.parameters, values)) for values in itertools.product(*self.parameters.values())]
        out, seen = [], set()
        for inst, mbs, delay, params in itertools.product(self.instance_counts, self.max_batch_sizes,
                                                          self.queue_delays_us, grid or [{}]):
            if mbs <= 1:
                delay = self.queue_delays_us[0]  # nothing to wait for: no batch can form
            key = (inst, mbs, delay, tuple(sorted(params.items())))
            if key not in seen:
                seen.add(key)
                out.append({"instances": inst, "max_batch_size": mbs, "queue_delay_us": delay, "parameters": params})
        return out


def _default_load() -> LoadConfig:
    return LoadConfig(concurrency=8, max_requests=64, max_duration_s=20, warmup_requests=2, prompt_words=(8, 32),
                      max_tokens=(4, 16))


class SearchConfig(ServingConfig):
    """A bounded configuration search.

    Args:
        p95_slo_ms: the latency SLO a candidate's p95 must meet (required).
        slo_metric: ``latency`` (whole request) or ``ttft`` (time to first token; stream loads)
            (default latency).
        objective: ``ok_rps`` (successful requests/s) or ``tokens_per_s`` (stream loads) (default ok_rps).
        space: the candidates (default ``SearchSpace()``).
        load: the load each candidate is measured with (default: 8 concurrent, 64 requests, 20 s
            at most, 2 warm-up requests, 8-32 word prompts, 4-16 tokens); the same seed for all.
        max_error_rate: a candidate with more failed requests is not eligible (default 0).
        max_total_s: the sweep stops starting candidates after this many seconds (default 900).
        apply: load the deployed model with the chosen config (default True).
        scratch_suffix: model name suffix of the scratch copy (default ``__search``).
    """

    p95_slo_ms: float = Field(gt=0)
    slo_metric: Literal["latency", "ttft"] = "latency"
    objective: Literal["ok_rps", "tokens_per_s"] = "ok_rps"
    space: SearchSpace = Field(default_factory=SearchSpace)
    load: LoadConfig = Field(default_factory=_default_load)
    max_error_rate: float = Field(0.0, ge=0, lt=1)
    max_total_s: float = Field(900.0, gt=0, le=24 * 3600)
    apply: bool = True
    scratch_suffix: str = Field(SCRATCH_SUFFIX, pattern=r"^[A-Za-z0-9_.\-]{1,32}$")


def with_serving_shape(text: str, *, max_batch_size: int, queue_delay_us: int, instances: int,
                       parameters: dict[str, str] | None = None, name: str | None = None,
                       response_cache: bool | None = None, policy: VersionPolicy | None = None) -> str:
    """``text`` (a config.pbtxt) with batching, instances and parameters replaced; all else kept.

    Args:
        text: the config to start from.
        max_batch_size / queue_delay_us / instances: the serving shape; a max batch size of 1 or
            less drops the dynamic batcher (nothing to batch).
        parameters: model parameters to set (default None: unchanged).
        name: a new model name (default None: unchanged).
        response_cache: turn the response cache on/off (default None: unchanged).
        policy: a new version policy (default None: unchanged).
    """
    from google.protobuf import text_format

    cfg = parse_pbtxt(text)
    if name is not None:
        cfg.name = name
    cfg.max_batch_size = max_batch_size
    if max_batch_size > 1:
        cfg.dynamic_batching.SetInParent()  # present even when every field keeps its default (0 delay)
        preferred = [b for b in cfg.dynamic_batching.preferred_batch_size if b <= max_batch_size]
        cfg.dynamic_batching.ClearField("preferred_batch_size")
        cfg.dynamic_batching.preferred_batch_size.extend(preferred)
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    else:
        cfg.ClearField("dynamic_batching")
    if not cfg.instance_group:
        from tritonclient.grpc import model_config_pb2

        cfg.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    for group in cfg.instance_group:
        group.count = instances
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    if response_cache is not None:
        if response_cache:
            cfg.response_cache.enable = True
        else:
            cfg.ClearField("response_cache")
    if policy is not None:
        cfg.ClearField("version_policy")
        if policy.kind == "latest":
            cfg.version_policy.latest.num_versions = policy.num_versions
        elif policy.kind == "specific":
            cfg.version_policy.specific.versions.extend(policy.versions)
        else:
            cfg.version_policy.all.SetInParent()
    return text_format.MessageToString(cfg)


def _check_space(space: SearchSpace, base) -> None:
    base_mbs = int(base.max_batch_size)
    if base_mbs == 0 and space.max_batch_sizes != (0,):
        raise ConfigError("search.space.max_batch_sizes", space.max_batch_sizes,
                          "the model has no batch dimension (max_batch_size 0); sweep (0,) only")
    if base_mbs > 0 and 0 in space.max_batch_sizes:
        raise ConfigError("search.space.max_batch_sizes", space.max_batch_sizes,
                          "0 would remove the model's batch dimension, which its clients send")
    if base.model_transaction_policy.decoupled and space.max_batch_sizes != (base_mbs,):
        raise ConfigError("search.space.max_batch_sizes", space.max_batch_sizes,
                          f"a decoupled model batches inside itself; keep ({base_mbs},) and sweep its parameters")


def _measure(server: LocalTriton, model: str, version: int, cfg: SearchConfig, texts: Sequence[str] | None) -> dict:
    report = run_load(server.grpc_url, cfg.load, model=model, version=version, texts=texts)
    lat = report["latency_ms"] or {}
    ttft = (report.get("stream") or {}).get("ttft_ms") or {}
    slo_value = (ttft if cfg.slo_metric == "ttft" else lat).get("p95")
    return {
        "ok_rps": report["ok_rps"], "throughput_rps": report["throughput_rps"],
        "tokens_per_s": (report.get("stream") or {}).get("tokens_per_s"),
        "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"),
        "ttft_p95_ms": ttft.get("p95"), "slo_value_ms": slo_value,
        "requests": report["requests"], "failed": report["failed"], "error_rate": report["error_rate"],
        "errors": report["errors"], "duration_s": report["duration_s"], "stopped_by": report["stopped_by"],
        "avg_batch": report["triton"]["avg_batch"], "queue_ms_avg": report["triton"]["queue_ms_avg"],
        "compute_infer_ms_avg": report["triton"]["compute_infer_ms_avg"],
    }


def search_config(server: LocalTriton, model: str, cfg: SearchConfig, *, version: int | None = None,
                  repository: ModelRepository | None = None, texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Sweep ``cfg.space`` on a scratch copy of ``model``, write the best SLO-meeting config back.

    Args:
        server: the running server (explicit model control) serving ``repository``.
        model: the deployed model; its ``config.pbtxt`` is the base of every candidate.
        cfg: SLO, space, load and bounds.
        version: the version to measure (default None: the highest version Triton serves, else the
            repository's highest).
        repository: where ``model`` lives (default None: ``server.config.model_repository``).
        texts: prose for prompts (default None: the built-in texts).

    Returns:
        model, version, p95_slo_ms, slo_metric, objective, chosen (the winning row), table (every
        candidate: its shape, measurements, ``meets_slo``, ``load_s`` or ``error``), skipped,
        config_uri, search_uri, applied, duration_s.

    Raises:
        DeployError: the model has no config or version, or the server is not in explicit mode.
        ConfigError: the space does not fit the model (e.g. batch sizes for a decoupled model).
        SloNotMet: no candidate met the SLO; ``search.json`` was written, the config was not changed.
    """
    t_start = time.monotonic()
    repo = repository or ModelRepository(server.config.model_repository)
    if server.config.model_control_mode != "explicit":
        raise DeployError(f"config search needs explicit model control; the server runs "
                          f"{server.config.model_control_mode!r}")
    base_text = repo.read_config(model)
    if base_text is None:
        raise DeployError(f"no {repo.uri(model, 'config.pbtxt')}: deploy {model!r} before searching its config")
    base = parse_pbtxt(base_text)
    _check_space(cfg.space, base)
    if version is None:
        served = server.ready_versions(model)
        on_disk = repo.versions(model)
        version = max(served) if served else (max(on_disk) if on_disk else None)
    if version is None or version not in repo.versions(model):
        raise DeployError(f"{model}: no complete version {version} in {repo.uri(model)} to measure")
    version = int(version)
    scratch = f"{model}{cfg.scratch_suffix}"
    all_candidates = cfg.space.candidates()
    candidates, skipped = all_candidates[: cfg.space.max_candidates], all_candidates[cfg.space.max_candidates:]
    skipped = [{**c, "skipped": "max_candidates"} for c in skipped]
    table: list[dict[str, Any]] = []
    _remove_scratch(server, repo, scratch)
    repo.copy_version(model, version, scratch)
    try:
        for i, cand in enumerate(candidates):
            if time.monotonic() - t_start > cfg.max_total_s:
                skipped += [{**c, "skipped": f"max_total_s {cfg.max_total_s:.0f}"} for c in candidates[i:]]
                break
            # WAR: the response cache keys on model name, version and inputs and survives a reload, so
            # with the cache on, a later candidate would be answered from an earlier one's results.
            text = with_serving_shape(base_text, name=scratch, max_batch_size=cand["max_batch_size"],
                                      queue_delay_us=cand["queue_delay_us"], instances=cand["instances"],
                                      parameters=cand["parameters"], response_cache=False,
                                      policy=VersionPolicy.specific(version))
            row: dict[str, Any] = dict(cand)
            try:
                repo.write_config(scratch, text)
                t0 = time.perf_counter()
                server.load(scratch)
                row["load_s"] = round(time.perf_counter() - t0, 2)
                row.update(_measure(server, scratch, version, cfg, texts))
            except Exception as e:  # a candidate that cannot load or run is a row with an error, not the end
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            row["meets_slo"] = (row.get("error") is None and row.get("slo_value_ms") is not None
                                and row["slo_value_ms"] <= cfg.p95_slo_ms and row["error_rate"] <= cfg.max_error_rate)
            log.info("config search %s candidate %d/%d: %s", model, i + 1, len(candidates),
                     {k: row.get(k) for k in ("instances", "max_batch_size", "queue_delay_us", "parameters",
                                              "ok_rps", "slo_value_ms", "meets_slo", "error")})
            table.append(row)
    finally:
        _remove_scratch(server, repo, scratch)
    eligible = [r for r in table if r["meets_slo"]]
    chosen = max(eligible, key=lambda r: (r.get(cfg.objective) or 0.0, -(r["slo_value_ms"] or 0.0)), default=None)
    result: dict[str, Any] = {
        "model": model, "version": version, "p95_slo_ms": cfg.p95_slo_ms, "slo_metric": cfg.slo_metric,
        "objective": cfg.objective, "chosen": chosen, "table": table, "skipped": skipped,
        "search_config": cfg.model_dump(mode="json"), "base_config": base_text,
        "config_uri": repo.uri(model, "config.pbtxt"), "search_uri": repo.uri(model, SEARCH_FILE),
        "server": server.urls(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "applied": False,
    }
    if chosen is None:
        result["duration_s"] = round(time.monotonic() - t_start, 1)
        where = repo.write_text(model, SEARCH_FILE, json.dumps(result, indent=2, default=str))
        best = min((r for r in table if r.get("slo_value_ms") is not None), key=lambda r: r["slo_value_ms"], default=None)
        raise SloNotMet(f"config search of {model} v{version}: none of {len(table)} candidates met p95 "
                        f"{cfg.slo_metric} <= {cfg.p95_slo_ms} ms with error rate <= {cfg.max_error_rate} "
                        f"(best p95 {best['slo_value_ms'] if best else None} ms); config.pbtxt unchanged", where)
    new_text = with_serving_shape(base_text, max_batch_size=chosen["max_batch_size"],
                                  queue_delay_us=chosen["queue_delay_us"], instances=chosen["instances"],
                                  parameters=chosen["parameters"])
    repo.write_config(model, new_text)
    if cfg.apply:
        # An explicit load swaps to the new config once it is loaded (measured on Triton 2.51: requests
        # without a pinned version kept succeeding through config reloads).
        server.load(model)
        result["applied"] = _running_matches(server.model_config(model), chosen)
        if not result["applied"]:
            log.warning("config search: %s runs %s, not the chosen shape", model, server.model_config(model))
    result["duration_s"] = round(time.monotonic() - t_start, 1)
    repo.write_text(model, SEARCH_FILE, json.dumps(result, indent=2, default=str))
    log.info("config search %s v%s: chose %s", model, version,
             {k: chosen.get(k) for k in ("instances", "max_batch_size", "queue_delay_us", "parameters", "ok_rps",
                                         "slo_value_ms")})
    return result


def _running_matches(running: dict, chosen: dict) -> bool:
    delay = int(running.get("dynamic_batching", {}).get("max_queue_delay_microseconds", 0) or 0)
    counts = {int(g.get("count", 1)) for g in running.get("instance_group", [])}
    params = {k: v.get("string_value") for k, v in running.get("parameters", {}).items()}
    return (int(running.get("max_batch_size", 0)) == chosen["max_batch_size"]
            and (chosen["max_batch_size"] <= 1 or delay == chosen["queue_delay_us"])
            and counts == {chosen["instances"]}
            and all(params.get(k) == str(v) for k, v in chosen["parameters"].items()))


def _remove_scratch(server: LocalTriton, repo: ModelRepository, scratch: str) -> None:
    if any(m.get("name") == scratch and m.get("state") in ("READY", "UNLOADING") for m in server.index()):
        server.unload(scratch)
    if repo.has_model(scratch):
        repo.remove_model(scratch)
