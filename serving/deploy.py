"""Deploy an exported candidate as a new Triton version beside the champion, smoke-test it, switch.

The candidate is loaded next to the champion (``version_policy: specific [champion, candidate]``),
answers one real generate request, and only then becomes the one served version. On any failure
the champion-only config is restored, the candidate folder moves to ``<model>/_failed/<v>`` and
the champion keeps answering; ``DeployError`` says what failed and where the server log is:

    result = deploy_and_smoke_test(export_dir, "tinyllm", version=3, champion_version=2, server=server)
    result["served_versions"]   # [3]; version 2 stays on disk for rollback

With ``rollout=RolloutConfig(...)`` the candidate goes through ``serving.rollout`` instead: loaded
as a canary model, smoke-tested, given a share of routed traffic, then promoted or rolled back
(same result keys, plus ``rollout``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from serving.client import generate
from serving.model_config import ModelConfigSpec, VersionPolicy, set_version_policy
from serving.repository import ModelRepository, WrittenVersion
from serving.server import LocalTriton
from tasks.errors import DeployError

if TYPE_CHECKING:
    from serving.rollout import CanaryRouter, RolloutConfig

log = logging.getLogger(__name__)

SMOKE_PROMPT = "The city council voted on Tuesday to"


def deploy_and_smoke_test(candidate_dir: Path, model_name: str, version: int | str,
                          champion_version: int | str | None, server: LocalTriton, *,
                          repository: ModelRepository | None = None, spec: ModelConfigSpec | None = None,
                          onnx_file: str | None = None,
                          smoke_prompt: str = SMOKE_PROMPT, smoke_max_tokens: int = 8,
                          timeout_s: float = 120.0, rollout: "RolloutConfig | None" = None,
                          router: "CanaryRouter | None" = None) -> dict:
    """Publish ``candidate_dir`` as ``model_name`` version ``version`` and make it the served version.

    Args:
        candidate_dir: exported model folder (``tasks.export`` output).
        model_name: Triton model name.
        version: Triton version to write (trimflow uses the MLflow registry version number).
        champion_version: the version serving now, kept answering throughout (None: first deploy).
        server: the running server whose repository is written (it must serve that repository).
        repository: where to write (default None: ``server.config.model_repository``).
        spec: model configuration (default None: ``ModelConfigSpec.llm_generate(model_name)``).
        onnx_file: ONNX file of the candidate to serve (default None: the one its metadata names).
        smoke_prompt / smoke_max_tokens: the smoke request (defaults: a news sentence, 8 tokens).
        timeout_s: smoke request timeout (default 120).
        rollout: canary rollout settings (default None: load beside the champion and switch, as
            above); when given, ``serving.rollout.rollout`` runs with this function's smoke prompt,
            tokens and timeout.
        router: the canary router callers send traffic through (rollout only; default None: the
            rollout's own, fed by its probe traffic).

    Returns:
        JSON-able summary: model_name, version, champion_version, served_versions, dynamic_batching,
        response_cache (both as Triton runs the model), smoke_test {ok, prompt, text, latency_ms},
        repository, version_uri, reused_version, server (urls), http_url, grpc_url, server_log;
        with ``rollout`` also ``rollout`` (stages, canary counts).

    Raises:
        DeployError: naming the failed stage, the rollback outcome and the server log
            (``serving.rollout`` raises its subclass ``RolloutFailed``).
    """
    if rollout is not None:
        from serving.rollout import RolloutConfig
        from serving.rollout import rollout as run_rollout

        cfg = RolloutConfig(**{**rollout.model_dump(), "smoke_prompt": smoke_prompt,
                               "smoke_max_tokens": smoke_max_tokens, "smoke_timeout_s": timeout_s})
        return run_rollout(candidate_dir, model_name, version, champion_version, server, repository=repository,
                           spec=spec, onnx_file=onnx_file, cfg=cfg, router=router)
    # MLflow hands version numbers over as strings.
    version = int(version)
    champion_version = int(champion_version) if champion_version is not None else None
    repo = repository or ModelRepository(server.config.model_repository)
    spec = spec or ModelConfigSpec.llm_generate(model_name)
    if spec.name != model_name:
        spec = replace(spec, name=model_name)
    if champion_version == version:
        raise DeployError(f"{model_name}: candidate version {version} is the champion version; use a new number")
    if champion_version is not None and champion_version not in repo.versions(model_name):
        raise DeployError(f"{model_name}: champion version {champion_version} is not in {repo.uri(model_name)} "
                          f"(found {repo.versions(model_name)}); nothing was changed")
    serving_policy = VersionPolicy.specific(*[v for v in (champion_version, version) if v is not None])
    previous_config = repo.read_config(model_name)
    written: WrittenVersion | None = None
    stage = "write version"
    try:
        written = repo.write_version(model_name, version, candidate_dir, onnx_file=onnx_file)
        stage = "write config"
        repo.write_config(model_name, spec.with_version_policy(serving_policy).to_pbtxt())
        stage = "load candidate beside champion"
        server.load(model_name)
        if not server.is_ready(model_name, version):
            raise DeployError(f"version {version} loaded but not ready")
        stage = "smoke test"
        t0 = time.perf_counter()
        text = generate(server.grpc_url, model_name, smoke_prompt, max_tokens=smoke_max_tokens, version=version,
                        timeout_s=timeout_s)
        latency_ms = (time.perf_counter() - t0) * 1000
        if not text.strip():
            raise DeployError(f"smoke request {smoke_prompt!r} got empty text back")
        stage = "switch to candidate"
        repo.write_config(model_name, spec.with_version_policy(VersionPolicy.specific(version)).to_pbtxt())
        server.load(model_name)
        if not server.is_ready(model_name, version):
            raise DeployError(f"version {version} not ready after the switch")
        running = server.model_config(model_name)
    except Exception as e:  # every failure rolls back; the cause is chained and named in the message
        if written is None:
            raise DeployError(f"deploy of {model_name} v{version} failed at '{stage}': {type(e).__name__}: {e}\n"
                              f"nothing was changed") from e
        raise _rollback(e, stage, repo, server, model_name, version, champion_version, previous_config, spec) from e
    result = {
        "model_name": model_name,
        "version": version,
        "champion_version": champion_version,
        "served_versions": server.ready_versions(model_name),
        "dynamic_batching": "dynamic_batching" in running,
        "response_cache": bool(running.get("response_cache", {}).get("enable", False)),
        "smoke_test": {"ok": True, "prompt": smoke_prompt, "text": text, "latency_ms": round(latency_ms, 2)},
        "repository": repo.uri(model_name),
        "version_uri": written.uri,
        "reused_version": written.reused,
        "server": server.urls(),
        "http_url": server.http_url,
        "grpc_url": server.grpc_url,
        "server_log": str(server.log_file),
    }
    log.info("deployed %s v%s (champion was %s): %s", model_name, version, champion_version, result["smoke_test"])
    return result


def _rollback(error: Exception, stage: str, repo: ModelRepository, server: LocalTriton, model: str, version: int,
              champion: int | None, previous_config: str | None, spec: ModelConfigSpec) -> DeployError:
    """Put the champion back as the only served version; returns the error to raise."""
    notes: list[str] = []
    try:
        if champion is not None:
            # The champion's own config (its batching, cache, parameters), with only the policy changed.
            base = previous_config if previous_config is not None else spec.to_pbtxt()
            repo.write_config(model, set_version_policy(base, VersionPolicy.specific(champion)))
        elif previous_config is not None:
            repo.write_config(model, previous_config)
        else:
            repo.remove_config(model)
        # Only a folder this deploy wrote (or found identical) gets here; a clashing one is left alone.
        notes.append(f"candidate moved to {repo.move_aside(model, version)}")
        if champion is not None:
            server.load(model)
            if not server.is_ready(model, champion):
                raise DeployError(f"champion v{champion} not ready after rollback")
            notes.append(f"champion v{champion} serving")
        else:
            server.unload(model)
            notes.append("no champion: model unloaded")
    except Exception as e:  # report a failed rollback with the original failure, never instead of it
        notes.append(f"ROLLBACK FAILED: {type(e).__name__}: {e}")
    log.error("deploy of %s v%s failed at %s: %s; %s", model, version, stage, error, "; ".join(notes))
    return DeployError(f"deploy of {model} v{version} failed at '{stage}': {type(error).__name__}: {error}\n"
                       f"rollback: {'; '.join(notes)}\nserver log: {server.log_file}")


def rollback(model_name: str, failed_version: int | str, champion_version: int | str | None, server: LocalTriton,
             reason: Exception, *, repository: ModelRepository | None = None,
             spec: ModelConfigSpec | None = None, stage: str = "post-deploy check") -> DeployError:
    """Undo a deploy that passed its own smoke test but failed a later check.

    Restores the champion as the only served version, moves ``failed_version`` aside and returns
    the ``DeployError`` to raise (naming ``reason``, the rollback outcome and the server log).
    """
    repo = repository or ModelRepository(server.config.model_repository)
    spec = spec or ModelConfigSpec.llm_generate(model_name)
    champion = int(champion_version) if champion_version is not None else None
    return _rollback(reason, stage, repo, server, model_name, int(failed_version), champion,
                     repo.read_config(model_name), spec)


def deploy_encoder(candidate_dir: Path, model_name: str, version: int | str, champion_version: int | str | None,
                   server: LocalTriton, *, spec: ModelConfigSpec | None = None,
                   smoke_texts: tuple[str, ...] = ("The council approved the budget.", "Heavy rain flooded roads."),
                   ) -> dict:
    """Serve an encoder export as ``model_name`` v``version`` beside the champion, check it, switch.

    The same sequence as ``deploy_and_smoke_test`` for the LLM, with an embedding request as the
    smoke test: the candidate must return one finite, L2-normalised vector per text.

    Raises:
        DeployError: naming the failed stage; after a write, the champion is restored.
    """
    import numpy as np

    from serving.semantic_cache import embed_texts, write_encoder_version

    version = int(version)
    champion = int(champion_version) if champion_version is not None else None
    repo = ModelRepository(server.config.model_repository)
    spec = spec or ModelConfigSpec.encoder_embed(model_name)
    if champion == version:
        raise DeployError(f"{model_name}: candidate version {version} is the champion version; use a new number")
    if champion is not None and champion not in repo.versions(model_name):
        champion = None  # a wiped repository: deploy without a fallback rather than refuse
    previous = repo.read_config(model_name)
    written = None
    stage = "write version"
    try:
        written = write_encoder_version(repo, model_name, version, candidate_dir)
        stage = "load candidate beside champion"
        policy = VersionPolicy.specific(*[v for v in (champion, version) if v is not None])
        repo.write_config(model_name, spec.with_version_policy(policy).to_pbtxt())
        server.load(model_name)
        stage = "smoke test"
        t0 = time.perf_counter()
        emb = embed_texts(server.grpc_url, model_name, list(smoke_texts), version=version)
        latency_ms = (time.perf_counter() - t0) * 1000
        norms = np.linalg.norm(emb, axis=1)
        if emb.shape[0] != len(smoke_texts) or not np.all(np.isfinite(emb)) or not np.allclose(norms, 1.0, atol=1e-3):
            raise DeployError(f"smoke embeddings malformed: shape {emb.shape}, norms {norms.round(4).tolist()}")
        stage = "switch to candidate"
        repo.write_config(model_name, spec.with_version_policy(VersionPolicy.specific(version)).to_pbtxt())
        server.load(model_name)
        if not server.is_ready(model_name, version):
            raise DeployError(f"version {version} not ready after the switch")
        running = server.model_config(model_name)
    except Exception as e:  # every failure after the write rolls back; the cause is chained
        if written is None:
            raise DeployError(f"deploy of {model_name} v{version} failed at '{stage}': {type(e).__name__}: {e}\n"
                              f"nothing was changed") from e
        raise _rollback(e, stage, repo, server, model_name, version, champion, previous, spec) from e
    return {
        "model_name": model_name, "version": version, "champion_version": champion,
        "served_versions": server.ready_versions(model_name),
        "dynamic_batching": "dynamic_batching" in running,
        "response_cache": bool(running.get("response_cache", {}).get("enable", False)),
        "smoke_test": {"ok": True, "texts": list(smoke_texts), "dim": int(emb.shape[1]),
                       "latency_ms": round(latency_ms, 2)},
        "repository": repo.uri(model_name), "http_url": server.http_url, "grpc_url": server.grpc_url,
        "server_log": str(server.log_file),
    }
