"""Roll a new model version out on Triton: explicit load, smoke test, canary share, promote or roll back.

Triton cannot split traffic between versions, and a request without a version goes to the
highest *ready* version, so loading the candidate beside the champion would hand it all default
traffic before any check. The candidate is therefore loaded as its own model, ``<model>__canary``
(the same immutable version folder, hard-linked or copied server-side on S3), and a client-side
``CanaryRouter`` sends a configurable share of the traffic there while the default keeps serving
the champion. After enough successful canary requests within the error budget it is promoted:

    router = CanaryRouter(Target("tinyllm"))                 # clients send through router.pick()
    result = rollout(export_dir, "tinyllm", 2, 1, server, cfg=RolloutConfig(canary_share=0.25), router=router)
    result["rollout"]["canary"]                              # {"requests": 8, "ok": 8, "failed": 0, ...}

Promotion moves all routed traffic onto the already-loaded canary, switches the main model's
config to the new version in one explicit load (Triton 2.51 loads the new version set and then
retires the old one, measured: unversioned requests did not fail during version or config
changes; only requests pinned to a retired version fail), then routes back to the main model and
drains and unloads the canary. Any failure before the main model is switched leaves it untouched;
a failure after restores the champion's own config. ``RolloutFailed.report["rollback_ok"]`` says
whether the champion answers again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from pydantic import Field

from serving.deploy import SMOKE_PROMPT
from serving.loadgen import LoadConfig, LoadGenerator, Router, ServingConfig, Target, send_one
from serving.model_config import ModelConfigSpec, VersionPolicy, set_version_policy
from serving.repository import ModelRepository, WrittenVersion
from serving.server import LocalTriton
from tasks.errors import DeployError, RolloutFailed

log = logging.getLogger(__name__)

CANARY_SUFFIX = "__canary"


def _default_probe() -> LoadConfig:
    return LoadConfig(concurrency=1, max_requests=10_000, max_duration_s=3600, prompt_words=(8, 16, 32),
                      max_tokens=(4, 8), request_timeout_s=60)


class RolloutConfig(ServingConfig):
    """How a new version is rolled out.

    Args:
        canary_share: share of routed requests sent to the canary while it is judged (default 0.25).
        min_canary_requests: finished canary requests needed before promotion; 0 promotes right
            after the smoke test (default 8).
        max_canary_error_rate: largest share of failed canary requests that still promotes; at 0
            the first failure rolls back (default 0).
        canary_timeout_s: the canary phase rolls back if the requests have not come in by then
            (default 120).
        probe: traffic the rollout sends through its router during the canary phase when no
            outside traffic goes through it (default: one request at a time, 8-32 words, 4-8
            tokens); None relies on the callers' traffic alone.
        drain_timeout_s: wait for requests in flight on the canary before unloading it (default 60).
        smoke_endpoint: ``infer`` or ``stream`` (gRPC stream, for decoupled models) (default infer).
        smoke_prompt / smoke_max_tokens / smoke_timeout_s: the smoke request (defaults: a news
            sentence, 8 tokens, 120 s).
        canary_suffix: appended to the model name for the canary model (default ``__canary``).
    """

    canary_share: float = Field(0.25, gt=0, le=1)
    min_canary_requests: int = Field(8, ge=0, le=100_000)
    max_canary_error_rate: float = Field(0.0, ge=0, lt=1)
    canary_timeout_s: float = Field(120.0, gt=0, le=3600)
    probe: LoadConfig | None = Field(default_factory=_default_probe)
    drain_timeout_s: float = Field(60.0, gt=0, le=3600)
    smoke_endpoint: Literal["infer", "stream"] = "infer"
    smoke_prompt: str = SMOKE_PROMPT
    smoke_max_tokens: int = Field(8, ge=1)
    smoke_timeout_s: float = Field(120.0, gt=0)
    canary_suffix: str = Field(CANARY_SUFFIX, pattern=r"^[A-Za-z0-9_.\-]{1,32}$")


class CanaryRouter(Router):
    """Splits requests between the stable target and a canary by an exact share; thread-safe.

    The split is deterministic (request n goes to the canary when ``floor(n*share)`` steps up),
    so a share of 0.25 sends exactly every fourth request there. Counts and in-flight requests
    are kept per target, which is what the rollout judges the canary on and drains before unloading.

    Args:
        stable: where requests go by default; ``Target(model)`` leaves the version to Triton.
        canary_model: the canary's model name, known in advance so statistics include it
            (default None: ``<stable.model>__canary``).
    """

    def __init__(self, stable: Target, canary_model: str | None = None) -> None:
        super().__init__(stable)
        self._lock = threading.Lock()
        self.canary: Target | None = None
        self.share = 0.0
        self._n = 0
        self.canary_model = canary_model or f"{stable.model}{CANARY_SUFFIX}"
        self._counts: dict[Target, dict[str, Any]] = defaultdict(
            lambda: {"sent": 0, "ok": 0, "failed": 0, "in_flight": 0, "errors": []})

    @property
    def stable(self) -> Target:
        return self.target

    def pick(self) -> Target:
        with self._lock:
            self._n += 1
            to_canary = self.canary is not None and math.floor(self._n * self.share) > math.floor((self._n - 1) * self.share)
            t = self.canary if to_canary and self.canary is not None else self.target
            c = self._counts[t]
            c["sent"] += 1
            c["in_flight"] += 1
            return t

    def done(self, target: Target, ok: bool, latency_s: float, error: str = "") -> None:
        with self._lock:
            c = self._counts[target]
            c["in_flight"] -= 1
            c["ok" if ok else "failed"] += 1
            if not ok and len(c["errors"]) < 5:
                c["errors"].append(error)

    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.target.model, self.canary_model)))

    def set_canary(self, canary: Target, share: float) -> None:
        """Start sending ``share`` of the requests to ``canary`` (its counts start from zero)."""
        with self._lock:
            self.canary, self.share, self._n = canary, float(share), 0
            self._counts[canary] = {"sent": 0, "ok": 0, "failed": 0,
                                    "in_flight": self._counts[canary]["in_flight"], "errors": []}

    def set_share(self, share: float) -> None:
        with self._lock:
            self.share, self._n = float(share), 0

    def end_canary(self, stable: Target | None = None) -> None:
        """Send everything to ``stable`` (default: the current stable target) from now on."""
        with self._lock:
            self.share, self.canary = 0.0, None
            if stable is not None:
                self.target = stable

    def counts(self, target: Target) -> dict[str, Any]:
        with self._lock:
            c = self._counts[target]
            return {**c, "errors": list(c["errors"])}

    def wait_idle(self, target: Target, timeout_s: float) -> bool:
        """Wait until no request to ``target`` is in flight; False if some still are after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.counts(target)["in_flight"] > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def smoke_test(url: str, model: str, version: str | int = "", *, endpoint: Literal["infer", "stream"] = "infer",
               prompt: str = SMOKE_PROMPT, max_tokens: int = 8, timeout_s: float = 120.0,
               load_cfg: LoadConfig | None = None) -> dict[str, Any]:
    """One real request through ``endpoint``; what the DAG's smoke step and the rollout run.

    ``endpoint="stream"`` opens a gRPC stream, as clients of a decoupled (continuous-batching)
    model do, and also reports the time to the first response.

    Args:
        url: ``host:port`` of the gRPC endpoint.
        model / version: what to test (version default "": Triton's choice, as clients get it).
        endpoint: ``infer`` or ``stream`` (default infer).
        prompt / max_tokens: the request (defaults: a news sentence, 8 tokens).
        timeout_s: request timeout (default 120).
        load_cfg: tensor names if the model's differ from ``llm_generate``'s (default None).

    Returns:
        ``ok`` (True), ``endpoint``, ``model``, ``version``, ``prompt``, ``text``, ``latency_ms``,
        ``responses`` and, for streams, ``ttft_ms``.

    Raises:
        DeployError: the request failed or returned no text.
    """
    rec = send_one(url, model, prompt, max_tokens, version=version, mode=endpoint, timeout_s=timeout_s, cfg=load_cfg)
    where = f"{model}" + (f" v{version}" if str(version) else "") + f" at {url} ({endpoint})"
    if not rec.ok:
        raise DeployError(f"smoke request to {where} failed: {rec.error}")
    if not rec.text.strip():
        raise DeployError(f"smoke request {prompt!r} to {where} got empty text back")
    out = {"ok": True, "endpoint": endpoint, "model": model, "version": str(version), "prompt": prompt,
           "text": rec.text, "latency_ms": round(rec.latency_s * 1000, 2), "responses": rec.responses}
    if endpoint == "stream" and rec.first_response is not None:
        out["ttft_ms"] = round((rec.first_response - rec.start) * 1000, 2)
    return out


class _Rollout:
    """State of one rollout; ``run()`` or a ``RolloutFailed`` with the rollback's outcome."""

    def __init__(self, candidate_dir: Path, model: str, version: int, champion: int | None, server: LocalTriton,
                 repo: ModelRepository, spec: ModelConfigSpec, onnx_file: str | None, cfg: RolloutConfig,
                 router: CanaryRouter, texts: Sequence[str] | None, model_code: Path | None = None) -> None:
        self.candidate_dir, self.model, self.version, self.champion = Path(candidate_dir), model, version, champion
        self.server, self.repo, self.spec, self.onnx_file, self.cfg = server, repo, spec, onnx_file, cfg
        self.router, self.texts, self.model_code = router, texts, model_code
        self.canary_model = router.canary_model
        self.canary = Target(self.canary_model, str(version))
        self.previous_config = repo.read_config(model)
        self.written: WrittenVersion | None = None
        self.main_changed = False
        self.canary_staged = False
        self.stage = "check"
        self.report: dict[str, Any] = {
            "model_name": model, "version": version, "champion_version": champion, "canary_model": self.canary_model,
            "strategy": "canary model beside the champion, client-side share, promote by one explicit load",
            "stages": {}, "canary": None, "probe": None}

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        self.stage = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.report["stages"][name] = round(time.perf_counter() - t0, 3)

    def _smoke(self, model: str, version: int | str) -> dict[str, Any]:
        c = self.cfg
        probe = c.probe or LoadConfig()
        return smoke_test(self.server.grpc_url, model, version, endpoint=c.smoke_endpoint, prompt=c.smoke_prompt,
                          max_tokens=c.smoke_max_tokens, timeout_s=c.smoke_timeout_s, load_cfg=probe)

    def _load_ready(self, model: str, version: int) -> None:
        self.server.load(model)
        if not self.server.is_ready(model, version):
            raise DeployError(f"{model} v{version} loaded but not ready")

    def run(self) -> dict[str, Any]:
        try:
            with self._stage("write version"):
                code = {"model_code": self.model_code} if self.model_code is not None else {}
                self.written = self.repo.write_version(self.model, self.version, self.candidate_dir,
                                                       onnx_file=self.onnx_file, **code)
            if self.champion is None:
                smoke = self._first_deploy()
            else:
                smoke = self._canary_deploy()
        except Exception as e:  # every failure rolls back; the cause is chained and named in the message
            raise self._rollback(e) from e
        self._retire_canary()
        return self._result(smoke)

    def _first_deploy(self) -> dict[str, Any]:
        # Nothing serves yet, so there is no traffic to protect and no canary to compare against.
        self.report["canary"] = {"skipped": "no champion: first version goes straight to the main model"}
        with self._stage("load"):
            self.repo.write_config(self.model, self.spec.with_version_policy(VersionPolicy.specific(self.version)).to_pbtxt())
            self.main_changed = True
            self._load_ready(self.model, self.version)
        with self._stage("smoke test"):
            return self._smoke(self.model, self.version)

    def _canary_deploy(self) -> dict[str, Any]:
        with self._stage("stage canary"):
            self._clear_stale_canary()
            self.canary_staged = True
            self.repo.copy_version(self.model, self.version, self.canary_model)
            canary_spec = replace(self.spec, name=self.canary_model)
            self.repo.write_config(self.canary_model,
                                   canary_spec.with_version_policy(VersionPolicy.specific(self.version)).to_pbtxt())
        with self._stage("load canary"):
            self._load_ready(self.canary_model, self.version)
        with self._stage("smoke test"):
            smoke = self._smoke(self.canary_model, self.version)
        with self._stage("canary"):
            self._judge_canary()
        with self._stage("promote"):
            # Routed traffic rides on the canary (loaded, judged) while the main model switches, so it
            # never depends on how Triton swaps versions; unversioned outside clients get Triton's swap.
            self.router.set_share(1.0)
            self.repo.write_config(self.model,
                                   self.spec.with_version_policy(VersionPolicy.specific(self.version)).to_pbtxt())
            self.main_changed = True
            self._load_ready(self.model, self.version)
            self._smoke(self.model, self.version)
            self.router.end_canary(Target(self.model, ""))
        return smoke

    def _clear_stale_canary(self) -> None:
        """A canary left by an interrupted rollout is unloaded and removed before a new one is staged."""
        if not self.repo.has_model(self.canary_model):
            return
        log.warning("rollout: removing stale canary %s", self.repo.uri(self.canary_model))
        if any(m.get("name") == self.canary_model and m.get("state") == "READY" for m in self.server.index()):
            self.server.unload(self.canary_model)
        self.repo.remove_model(self.canary_model)

    def _judge_canary(self) -> None:
        c = self.cfg
        self.router.set_canary(self.canary, c.canary_share)
        if c.min_canary_requests == 0:
            self.report["canary"] = {**self._canary_counts(), "skipped": "min_canary_requests=0"}
            return
        probe = None
        if c.probe is not None:
            probe_cfg = LoadConfig(**{**c.probe.model_dump(), "max_duration_s": min(c.probe.max_duration_s,
                                                                                     c.canary_timeout_s)})
            probe = LoadGenerator(self.server.grpc_url, probe_cfg, router=self.router, texts=self.texts).start()
        deadline = time.monotonic() + c.canary_timeout_s
        try:
            while True:
                counts = self._canary_counts()
                done, failed = counts["ok"] + counts["failed"], counts["failed"]
                rate = failed / done if done else 0.0
                if failed and (c.max_canary_error_rate == 0 or (done >= c.min_canary_requests
                                                                and rate > c.max_canary_error_rate)):
                    raise DeployError(f"canary error rate {rate:.3f} over the budget {c.max_canary_error_rate} "
                                      f"after {done} requests; errors: {counts['errors']}")
                if done >= c.min_canary_requests:
                    break
                if time.monotonic() > deadline or (probe is not None and not probe.running):
                    raise DeployError(f"only {done} of {c.min_canary_requests} canary requests finished in "
                                      f"{c.canary_timeout_s:.0f}s" + (" (probe ended)" if probe is not None else
                                                                       " (no probe: is traffic routed through the router?)"))
                time.sleep(0.02)
        finally:
            if probe is not None:
                summary = probe.stop()
                self.report["probe"] = {k: summary[k] for k in ("requests", "ok", "failed", "duration_s", "latency_ms")}
            self.report["canary"] = {**self._canary_counts(), "share": c.canary_share}

    def _canary_counts(self) -> dict[str, Any]:
        c = self.router.counts(self.canary)
        return {"target": str(self.canary), "requests": c["sent"], "ok": c["ok"], "failed": c["failed"],
                "error_rate": round(c["failed"] / (c["ok"] + c["failed"]), 4) if c["ok"] + c["failed"] else 0.0,
                "errors": c["errors"]}

    def _retire_canary(self) -> None:
        """Drain, unload and delete the canary; a failure here leaves the promoted version serving."""
        if not self.canary_staged:
            return
        with self._stage("retire canary"):
            try:
                if not self.router.wait_idle(self.canary, self.cfg.drain_timeout_s):
                    log.warning("rollout: requests still in flight on %s after %.0fs", self.canary,
                                self.cfg.drain_timeout_s)
                self.server.unload(self.canary_model)
                self.repo.remove_model(self.canary_model)
                self.report["canary_retired"] = True
            except Exception as e:  # the new version serves; a leftover canary is removed by the next rollout
                log.warning("rollout: canary %s not cleaned up: %s", self.canary_model, e)
                self.report["canary_retired"] = f"failed: {type(e).__name__}: {e}"

    def _result(self, smoke: dict[str, Any]) -> dict[str, Any]:
        assert self.written is not None
        running = self.server.model_config(self.model)
        served = self.server.ready_versions(self.model)
        self.report["served_versions"] = served
        log.info("rolled out %s v%s (champion was %s) in %s", self.model, self.version, self.champion,
                 self.report["stages"])
        return {
            "model_name": self.model, "version": self.version, "champion_version": self.champion,
            "served_versions": served,
            "dynamic_batching": "dynamic_batching" in running,
            "response_cache": bool(running.get("response_cache", {}).get("enable", False)),
            "smoke_test": smoke,
            "repository": self.repo.uri(self.model), "version_uri": self.written.uri,
            "reused_version": self.written.reused, "server": self.server.urls(), "http_url": self.server.http_url,
            "grpc_url": self.server.grpc_url, "server_log": str(self.server.log_file), "rollout": self.report,
        }

    def _rollback(self, error: Exception) -> RolloutFailed:
        """Put the champion back as the only served version; returns the error to raise."""
        notes: list[str] = []
        stage, model, champion = self.stage, self.model, self.champion
        self.router.end_canary(Target(model, ""))

        def step(what: str, fn) -> None:
            try:
                fn()
            except Exception as e:  # report a failed rollback step with the original failure, never instead
                notes.append(f"ROLLBACK STEP FAILED ({what}): {type(e).__name__}: {e}")

        if self.main_changed:
            if champion is not None:
                # The champion's own config (its batching, cache, parameters), with only the policy changed.
                base = self.previous_config if self.previous_config is not None else self.spec.to_pbtxt()
                step("restore champion config", lambda: self.repo.write_config(
                    model, set_version_policy(base, VersionPolicy.specific(champion))))
                step("reload champion", lambda: self.server.load(model))
            else:
                step("restore config", lambda: self.repo.write_config(model, self.previous_config)
                     if self.previous_config is not None else self.repo.remove_config(model))
                step("unload", lambda: self.server.unload(model))
        if self.canary_staged:
            if not self.router.wait_idle(self.canary, self.cfg.drain_timeout_s):
                notes.append(f"requests still in flight on {self.canary} after {self.cfg.drain_timeout_s:.0f}s")
            step("unload canary", lambda: self.server.unload(self.canary_model))
            step("remove canary", lambda: self.repo.remove_model(self.canary_model))
            notes.append(f"canary {self.canary_model} removed")
        if self.written is not None:
            # Only a folder this rollout wrote (or found identical) gets here; a clashing one is left alone.
            step("move candidate aside", lambda: notes.append(
                f"candidate moved to {self.repo.move_aside(model, self.version)}"))
        rollback_ok = self._champion_answers(notes)
        self.report.update(stage=stage, cause=f"{type(error).__name__}: {error}", rollback=notes,
                           rollback_ok=rollback_ok, served_versions=self._served())
        log.error("rollout of %s v%s failed at %s: %s; %s", model, self.version, stage, error, "; ".join(notes))
        head = f"rollout of {model} v{self.version} failed at '{stage}': {type(error).__name__}: {error}"
        if self.written is None and not self.main_changed and not self.canary_staged:
            return RolloutFailed(f"{head}\nnothing was changed", self.report)
        return RolloutFailed(f"{head}\nrollback: {'; '.join(notes)}\nserver log: {self.server.log_file}",
                             self.report)

    def _champion_answers(self, notes: list[str]) -> bool:
        if self.champion is None:
            notes.append("no champion: nothing serves this model")
            return True
        try:
            if self.server.ready_versions(self.model) != [self.champion]:
                raise DeployError(f"served versions are {self.server.ready_versions(self.model)}")
            self._smoke(self.model, "")
        except Exception as e:  # the check's own failure is the answer: the champion does not answer
            notes.append(f"ROLLBACK FAILED: champion v{self.champion} does not answer: {e}")
            return False
        notes.append(f"champion v{self.champion} serving")
        return True

    def _served(self) -> list[int]:
        try:
            return self.server.ready_versions(self.model)
        except Exception:  # the server itself may be what failed
            return []


def rollout(candidate_dir: Path, model_name: str, version: int | str, champion_version: int | str | None,
            server: LocalTriton, *, repository: ModelRepository | None = None, spec: ModelConfigSpec | None = None,
            onnx_file: str | None = None, cfg: RolloutConfig | None = None, router: CanaryRouter | None = None,
            texts: Sequence[str] | None = None, model_code: Path | None = None) -> dict[str, Any]:
    """Publish ``candidate_dir`` as ``model_name`` v``version``, judge it as a canary, promote or roll back.

    Args:
        candidate_dir: exported model folder (``tasks.export`` output).
        model_name: Triton model name clients use.
        version: Triton version to write (trimflow uses the MLflow registry version).
        champion_version: the version serving now (None: first deploy, no canary phase).
        server: the running server (explicit model control) whose repository is written.
        repository: where to write (default None: ``server.config.model_repository``; pass it for
            ``s3://`` repositories, whose Triton URI names the endpoint).
        spec: the candidate's model configuration (default None: ``ModelConfigSpec.llm_generate``).
        onnx_file: ONNX file of the candidate to serve (default None: the one its metadata names).
        cfg: canary share, promotion rule, probe traffic, smoke request (default ``RolloutConfig()``).
        router: the router callers send their traffic through (default None: one of its own, used
            by the probe); its stable target must be ``Target(model_name)``.
        texts: prose for probe prompts (default None: the built-in texts).
        model_code: the python-backend code folder written beside the model (default None: the
            ``llm_generate`` model; ``serving.runtime.continuous.stage_model_code`` for streaming).

    Returns:
        ``deploy_and_smoke_test``'s keys (model_name, version, champion_version, served_versions,
        dynamic_batching, response_cache, smoke_test, repository, version_uri, reused_version, server,
        http_url, grpc_url, server_log) plus ``rollout``: stages (seconds each), canary counts, probe
        summary, canary_model, strategy, served_versions.

    Raises:
        DeployError: bad input, before anything is changed.
        RolloutFailed: a stage failed; everything was rolled back (``report`` has the outcome).
    """
    cfg = cfg or RolloutConfig()
    version = int(version)
    champion = int(champion_version) if champion_version is not None else None
    repo = repository or ModelRepository(server.config.model_repository)
    spec = spec or ModelConfigSpec.llm_generate(model_name)
    if spec.name != model_name:
        spec = replace(spec, name=model_name)
    router = router or CanaryRouter(Target(model_name), canary_model=f"{model_name}{cfg.canary_suffix}")
    if router.stable.model != model_name:
        raise DeployError(f"router's stable target {router.stable} is not model {model_name!r}")
    if server.config.model_control_mode != "explicit":
        raise DeployError(f"rollout needs explicit model control; the server runs {server.config.model_control_mode!r}")
    if champion == version:
        raise DeployError(f"{model_name}: candidate version {version} is the champion version; use a new number")
    if champion is not None and champion not in repo.versions(model_name):
        raise DeployError(f"{model_name}: champion version {champion} is not in {repo.uri(model_name)} "
                          f"(found {repo.versions(model_name)}); nothing was changed")
    return _Rollout(candidate_dir, model_name, version, champion, server, repo, spec, onnx_file, cfg, router,
                    texts, model_code).run()
