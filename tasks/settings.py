"""Where trimflow keeps its state, read from the environment once per call.

Every path and endpoint a step needs comes from here, so one folder
(``TRIMFLOW_HOME``, default ``.trimflow/`` in the repository) holds the Airflow
home, MLflow database and artifacts, the Triton model repository and reports:

    s = Settings.from_env()
    s.artifact_root        # "/repo/.trimflow/runs" or "s3://bucket/prefix"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    """Resolved locations and endpoints.

    Attributes:
        home: the state folder (``TRIMFLOW_HOME``; default ``<repo>/.trimflow``).
        artifact_root: where step outputs are published: a local folder or ``s3://bucket/prefix``
            (``TRIMFLOW_ARTIFACT_ROOT``; default ``<home>/runs``).
        cache_dir: content-addressed cache of converted models and downloaded data packages,
            shared between runs (``TRIMFLOW_CACHE``; default ``<home>/cache``).
        scratch_dir: local working space for steps (``<home>/scratch``).
        mlflow_tracking_uri: MLflow tracking server (``MLFLOW_TRACKING_URI``;
            default ``http://127.0.0.1:5000``).
        triton_repository: the Triton model repository, a local folder or ``s3://…``
            (``TRIMFLOW_TRITON_REPOSITORY``; default ``<home>/triton/models``).
        triton_http_url / triton_grpc_url: the serving endpoints (``TRIMFLOW_TRITON_HTTP`` /
            ``TRIMFLOW_TRITON_GRPC``; defaults 127.0.0.1:8000 / 127.0.0.1:8001).
        serving_python: interpreter of the serving environment, whose numpy<2 the Triton
            python-backend stub needs (``TRIMFLOW_SERVING_PYTHON``; default ``<repo>/.venv-serving/bin/python``).
        s3_endpoint_url: S3 endpoint for boto3 (``AWS_ENDPOINT_URL``; unset means AWS itself).
        reports_dir: where run reports and the demo summary go (``<home>/reports``).
    """

    home: Path
    artifact_root: str
    cache_dir: Path
    scratch_dir: Path
    mlflow_tracking_uri: str
    triton_repository: str
    triton_http_url: str
    triton_grpc_url: str
    serving_python: Path
    s3_endpoint_url: str | None
    reports_dir: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        e = os.environ if env is None else env
        home = Path(e.get("TRIMFLOW_HOME", REPO_ROOT / ".trimflow")).resolve()
        return cls(
            home=home,
            artifact_root=e.get("TRIMFLOW_ARTIFACT_ROOT") or str(home / "runs"),
            cache_dir=Path(e.get("TRIMFLOW_CACHE") or home / "cache"),
            scratch_dir=home / "scratch",
            mlflow_tracking_uri=e.get("MLFLOW_TRACKING_URI") or "http://127.0.0.1:5000",
            triton_repository=e.get("TRIMFLOW_TRITON_REPOSITORY") or str(home / "triton" / "models"),
            triton_http_url=e.get("TRIMFLOW_TRITON_HTTP") or "127.0.0.1:8000",
            triton_grpc_url=e.get("TRIMFLOW_TRITON_GRPC") or "127.0.0.1:8001",
            serving_python=Path(e.get("TRIMFLOW_SERVING_PYTHON") or REPO_ROOT / ".venv-serving" / "bin" / "python"),
            s3_endpoint_url=e.get("AWS_ENDPOINT_URL") or None,
            reports_dir=home / "reports",
        )
