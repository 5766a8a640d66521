"""Helpers for the DAG integration tests: a real MLflow (PostgreSQL) + Triton + Airflow CLI stack.

    stack, mlflow_server, db = start_stack(tmp)
    result = stack.run({"profile": "ci", ...}, "name")      # airflow dags test optimize_model
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY = {"profile": "ci", "student_layers": 2, "distill_steps": 3, "min_speedup": 0.0, "max_ppl_ratio": 1e6,
        "registered_model": "trimflow-tiny", "model_name": "tiny_llm"}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    mlflow_url: str
    triton_http: str
    triton_grpc: str

    def settings(self):
        from tasks.settings import Settings

        return Settings.from_env({**os.environ, **self.env})

    def run(self, conf: dict, name: str) -> dict:
        from devstack.demo import run_dag

        return run_dag(self.settings(), conf, self.env, self.home / "logs" / f"{name}.log", echo=False)

    def log_text(self, result: dict) -> str:
        return Path(result["log"]).read_text()


def start_stack(tmp: Path, *, artifact_root: str | None = None, mlflow_artifacts: str | None = None,
                 extra_env: dict[str, str] | None = None):
    from devstack import postgres
    from devstack.mlflow_server import MlflowServer
    from serving.server import free_ports

    if not postgres.available():
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is required for the integration tests (it runs on these machines)")
    db = f"trimflow_it_{uuid.uuid4().hex[:10]}"
    backend = postgres.create_database(db)
    http, grpc = free_ports(2)
    env = {
        "TRIMFLOW_HOME": str(tmp / "home"),
        # Share converted models with the demo and other runs: converting the GGUF takes ~45 s.
        "TRIMFLOW_CACHE": os.environ.get("TRIMFLOW_TEST_CACHE", str(Path(__file__).resolve().parents[2] / ".trimflow" / "cache")),
        "TRIMFLOW_TRITON_HTTP": f"127.0.0.1:{http}",
        "TRIMFLOW_TRITON_GRPC": f"127.0.0.1:{grpc}",
        **(extra_env or {}),
    }
    if artifact_root:
        env["TRIMFLOW_ARTIFACT_ROOT"] = artifact_root
    server = MlflowServer(backend_uri=backend, artifacts=mlflow_artifacts or str(tmp / "mlartifacts"),
                          state_dir=tmp / "mlflow", env=extra_env).start()
    env["MLFLOW_TRACKING_URI"] = server.url
    stack = Stack(tmp / "home", env, server.url, env["TRIMFLOW_TRITON_HTTP"], env["TRIMFLOW_TRITON_GRPC"])
    return stack, server, db


def stop_stack(stack: Stack, server, db: str) -> None:
    from devstack import postgres
    from serving.server import stop_recorded

    stop_recorded(stack.settings())
    server.stop()
    postgres.drop_database(db)


class env_vars:
    """Apply env vars for the client calls a test makes itself (registry lookups, tritonclient)."""

    def __init__(self, env):
        self.env, self.saved = env, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def registry_versions(stack: Stack, name: str) -> list[dict]:
    from tasks import registry

    return registry.versions(stack.mlflow_url, name)


def generate_text(stack: Stack, model: str, version: str = "") -> str:
    from serving.client import generate

    return generate(stack.triton_grpc, model, "The city council", max_tokens=6, version=version)
