"""Start a server as its own process group, wait until it answers, stop it whole.

    proc = ManagedProcess("mlflow", cmd, log_file, health_url="http://127.0.0.1:5000/health")
    proc.start(timeout=60); ...; proc.stop()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from tasks.errors import ServingError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class ManagedProcess:
    """A detached server process with a log file and a pidfile.

    Args:
        name: label used in errors.
        cmd: the command line.
        log_file: stdout and stderr go here (its tail is quoted when start fails).
        ready: a callable that returns True once the server answers.
        env: extra environment (merged over ``os.environ``).
        pidfile: if given, ``{"pid", ...info}`` is written there so another process can reuse
            or stop the server.
    """

    def __init__(self, name: str, cmd: Sequence[str], log_file: Path, ready: Callable[[], bool],
                 env: dict[str, str] | None = None, pidfile: Path | None = None, info: dict | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.cmd, self.log_file, self.ready = name, list(cmd), Path(log_file), ready
        self.env, self.pidfile, self.info, self.cwd = env or {}, pidfile, info or {}, cwd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "ManagedProcess":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env}, cwd=self.cwd,
                                     start_new_session=True)  # own process group: stop() kills workers too
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServingError(f"{self.name} exited with code {self.proc.returncode} during start-up; "
                                   f"log {self.log_file}:\n{self.tail()}")
            if self.ready():
                if self.pidfile:
                    self.pidfile.parent.mkdir(parents=True, exist_ok=True)
                    self.pidfile.write_text(json.dumps({"pid": self.proc.pid, **self.info}))
                return self
            time.sleep(0.5)
        self.stop()
        raise ServingError(f"{self.name} not ready after {timeout:.0f}s; log {self.log_file}:\n{self.tail()}")

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is not None:
            stop_group(self.proc.pid, grace)
            self.proc = None
        if self.pidfile and self.pidfile.exists():
            self.pidfile.unlink()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def stop_group(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL what is left after ``grace`` seconds."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        try:  # reap our own child so it does not linger as a zombie
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
