"""MLflow tracking and model registry: runs, versions, aliases and lineage.

``register`` logs one MLflow run (params, metrics, artifacts) and creates a registered
model version carrying lineage tags, with alias ``challenger``. A retried register finds
the version it already created for the same pipeline run instead of making another.

    info = register(RegisterRequest(...), tracking_uri)     # {"name", "version", "aliases", ...}
    promote(tracking_uri, name, version)                    # moves "champion"
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.errors import RegistryError
from tasks.settings import REPO_ROOT

log = logging.getLogger(__name__)

EXPERIMENT = "trimflow-optimize"
CHAMPION, CHALLENGER = "champion", "challenger"
RUN_TAG = "trimflow.run_id"


@dataclass(frozen=True)
class RegisterRequest:
    """What gets registered.

    Args:
        name: registered model name.
        run_id: the pipeline run id (idempotency key, also a tag).
        onnx_dir: the served form (ONNX + tokenizer + trimflow_model.json).
        hf_dir: the PyTorch form, kept so a later run can optimize further from ``models:/``.
        params: flat run parameters.
        metrics: flat numeric metrics.
        tags: lineage tags set on the run and on the model version.
        artifacts: extra files (config, reports) logged under ``reports/``.
        kind: ``causal_lm`` (a text-generation pyfunc) or ``encoder`` (an embedding pyfunc).
    """

    name: str
    run_id: str
    onnx_dir: Path
    hf_dir: Path | None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    kind: str = "causal_lm"


def _client(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    _check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _check_reachable(tracking_uri: str) -> None:
    """Fail in a second, not after MLflow's minutes of connection retries, when the server is down."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10) as r:
            if r.status == 200:
                return
    except (urllib.error.URLError, OSError) as e:
        raise RegistryError(f"MLflow tracking server {tracking_uri} is not reachable ({e}); `make demo` starts one, "
                            "or point MLFLOW_TRACKING_URI at yours") from None
    raise RegistryError(f"MLflow tracking server {tracking_uri} answered /health with an error")


def find_version_for_run(tracking_uri: str, name: str, run_id: str):
    client = _client(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception as e:  # the registry answers with several MlflowException codes
        raise RegistryError(f"cannot search versions of {name!r} at {tracking_uri}: {e}") from e
    for v in versions:
        if (v.tags or {}).get(RUN_TAG) == run_id:
            return v
    return None


def register(req: RegisterRequest, tracking_uri: str) -> dict[str, Any]:
    """Log an MLflow run and register a new model version with alias ``challenger``."""
    import mlflow

    client = _client(tracking_uri)
    existing = find_version_for_run(tracking_uri, req.name, req.run_id)
    if existing is not None:
        log.info("register: run %s already registered %s v%s", req.run_id, req.name, existing.version)
        client.set_registered_model_alias(req.name, CHALLENGER, existing.version)
        return _describe(client, req.name, existing)
    mlflow.set_experiment(EXPERIMENT)
    tags = {RUN_TAG: req.run_id, **req.tags}
    with mlflow.start_run(run_name=f"{req.name}-{req.run_id}"[:250], tags=tags) as run:
        mlflow.log_params({k: _param(v) for k, v in req.params.items()})
        mlflow.log_metrics({k: float(v) for k, v in req.metrics.items() if v is not None})
        for f in req.artifacts:
            mlflow.log_artifact(str(f), artifact_path="reports")
        artifacts = {"onnx": str(req.onnx_dir)}
        if req.hf_dir is not None:
            artifacts["hf"] = str(req.hf_dir)
        encoder = req.kind == "encoder"
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("mlflow_pyfunc_encoder.py" if encoder else "mlflow_pyfunc.py")),
            artifacts=artifacts,
            # The encoder runtime lives in tasks/, the LLM's in serving/runtime/.
            code_paths=[str(REPO_ROOT / ("tasks" if encoder else "serving"))],
            # Explicit requirements: inference would import torchvision through transformers.
            pip_requirements=["onnxruntime==1.32.0", "tokenizers", "numpy", "pandas"],
        )
        try:
            mv = mlflow.register_model(info.model_uri, req.name, tags=tags)
        except Exception as e:
            raise RegistryError(f"registering {req.name} from run {run.info.run_id} failed: {e}") from e
    client.set_registered_model_alias(req.name, CHALLENGER, mv.version)
    return _describe(client, req.name, client.get_model_version(req.name, mv.version)) | {"mlflow_run_id": run.info.run_id}


def promote(tracking_uri: str, name: str, version: int | str) -> dict[str, Any]:
    """Point ``champion`` at ``version`` (after its smoke test passed)."""
    client = _client(tracking_uri)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return _describe(client, name, client.get_model_version(name, str(version)))


def alias_version(tracking_uri: str, name: str, alias: str = CHAMPION) -> int | None:
    """The version an alias points at, or None if the model or alias does not exist."""
    client = _client(tracking_uri)
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except Exception as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower() or "INVALID_PARAMETER_VALUE" in str(e):
            return None
        raise RegistryError(f"cannot read alias {alias!r} of {name!r} at {tracking_uri}: {e}") from e


def versions(tracking_uri: str, name: str) -> list[dict[str, Any]]:
    client = _client(tracking_uri)
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except Exception as e:
        raise RegistryError(f"cannot list versions of {name!r}: {e}") from e
    return sorted((_describe(client, name, v) for v in found), key=lambda d: d["version"])


def log_run_artifacts(tracking_uri: str, mlflow_run_id: str, files: list[Path], metrics: dict[str, float] | None = None) -> None:
    """Attach late artifacts (the final report) to the registering run."""
    client = _client(tracking_uri)
    for f in files:
        client.log_artifact(mlflow_run_id, str(f), artifact_path="reports")
    for k, v in (metrics or {}).items():
        client.log_metric(mlflow_run_id, k, float(v))


def _describe(client, name: str, mv) -> dict[str, Any]:
    # search_model_versions leaves aliases empty; get_model_version fills them.
    aliases = list(client.get_model_version(name, str(mv.version)).aliases or [])
    return {"name": name, "version": int(mv.version), "aliases": sorted(aliases), "source": mv.source,
            "tags": dict(mv.tags or {}), "mlflow_run_id": mv.run_id}


def _param(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:6000]
