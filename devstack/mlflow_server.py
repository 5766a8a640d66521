"""A real MLflow tracking server + model registry on 127.0.0.1.

SQLite is the default back end; integration tests pass a PostgreSQL URI. Artifacts are
proxied by the server to a local folder or to ``s3://`` (boto3, ``MLFLOW_S3_ENDPOINT_URL``).

    server = MlflowServer(backend_uri="sqlite:///x/mlflow.db", artifacts="x/artifacts", port=5000).start()
    os.environ["MLFLOW_TRACKING_URI"] = server.url
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from devstack.process import ManagedProcess, free_port, http_ok, pid_alive, stop_group


class MlflowServer:
    """Args:
        backend_uri: SQLAlchemy URI of the tracking/registry store.
        artifacts: artifact destination (folder or ``s3://bucket/prefix``).
        port: TCP port on 127.0.0.1 (default: a free one).
        state_dir: log and pidfile location.
        env: extra environment, e.g. S3 endpoint and credentials for an s3:// destination.
    """

    def __init__(self, backend_uri: str, artifacts: str, state_dir: Path, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.backend_uri, self.artifacts, self.state_dir = backend_uri, artifacts, Path(state_dir)
        self.port = port or free_port()
        self.env = env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.pidfile = self.state_dir / "mlflow-server.json"
        self._proc: ManagedProcess | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", self.backend_uri, "--artifacts-destination", self.artifacts,
                "--workers", "1"]

    def running_elsewhere(self) -> bool:
        """True if a server recorded in the pidfile answers on this port (a previous demo)."""
        if not self.pidfile.is_file():
            return False
        info = json.loads(self.pidfile.read_text())
        return info.get("port") == self.port and pid_alive(info["pid"]) and http_ok(f"{self.url}/health")

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        if self.running_elsewhere():
            return self
        if not self.artifacts.startswith("s3://"):
            Path(self.artifacts).mkdir(parents=True, exist_ok=True)
        self._proc = ManagedProcess(
            "mlflow server", self.command(), self.state_dir / "mlflow-server.log",
            ready=lambda: http_ok(f"{self.url}/health"), env=self.env, pidfile=self.pidfile,
            info={"port": self.port, "url": self.url}).start(timeout)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
        elif self.pidfile.is_file():
            stop_group(json.loads(self.pidfile.read_text())["pid"])
            self.pidfile.unlink(missing_ok=True)
