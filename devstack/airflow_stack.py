"""A real Airflow deployment on 127.0.0.1: api-server, scheduler, dag-processor, triggerer.

LocalExecutor on the given metadata database (SQLite for the demo's UI, PostgreSQL in
integration tests). Unlike ``airflow standalone``, every component binds to loopback only.
DAG runs are triggered through the REST API as an operator's client would.

    with AirflowStack(home, env).started() as af:
        run_id = af.trigger("optimize_model", {"profile": "quick"})
        state = af.wait(run_id, timeout=1800)
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from devstack.airflow_env import airflow_bin
from devstack.process import ManagedProcess, free_port, http_ok
from tasks.errors import ServingError


class AirflowStack:
    """Args:
        home: AIRFLOW_HOME (logs, generated passwords).
        env: environment from ``airflow_env`` (database, DAGs folder, trimflow settings).
        port: api-server port (default: a free one).
        user: simple-auth-manager user, created as admin (default ``admin``).
    """

    def __init__(self, home: Path, env: dict[str, str], port: int | None = None, user: str = "admin") -> None:
        self.home, self.port, self.user = Path(home), port or free_port(), user
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                    "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(self.port),
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:admin",
                    # New DAGs start unpaused so a triggered run is scheduled at once.
                    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"}
        self._procs: list[ManagedProcess] = []
        self._token: str | None = None

    def start(self, timeout: float = 180.0) -> "AirflowStack":
        done = subprocess.run([airflow_bin(), "db", "migrate"], env=self.env, capture_output=True, text=True)
        if done.returncode:
            # The migration's own message (a locked database, a refused connection) is what explains it.
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
            raise RuntimeError(f"airflow db migrate failed (exit {done.returncode}) for "
                               f"{self.env.get('AIRFLOW__DATABASE__SQL_ALCHEMY_CONN')}:\n{tail}")
        logs = self.home / "logs"
        api = ManagedProcess("airflow api-server", [airflow_bin(), "api-server", "--host", "127.0.0.1", "--port",
                                                     str(self.port)], logs / "api-server.log",
                             ready=lambda: http_ok(f"{self.url}/api/v2/monitor/health"), env=self.env)
        self._procs.append(api.start(timeout))
        for name, cmd in (("scheduler", ["scheduler", "--skip-serve-logs"]), ("dag-processor", ["dag-processor"]),
                          ("triggerer", ["triggerer", "--skip-serve-logs"])):
            proc = ManagedProcess(f"airflow {name}", [airflow_bin(), *cmd], logs / f"{name}.log",
                                  ready=lambda: True, env=self.env)
            self._procs.append(proc.start(timeout))
        return self

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()

    @contextlib.contextmanager
    def started(self) -> Iterator["AirflowStack"]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- REST -------------------------------------------------------------------------------------
    def password(self) -> str:
        path = self.home / "simple_auth_manager_passwords.json.generated"
        deadline = time.time() + 30
        while not path.is_file() and time.time() < deadline:
            time.sleep(0.5)
        return json.loads(path.read_text())[self.user]

    def _call(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            if self._token is None:
                self._token = self._call("POST", "/auth/token", {"username": self.user, "password": self.password()},
                                         auth=False)["access_token"]
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(f"{self.url}{path}", method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise ServingError(f"Airflow API {method} {path} -> {e.code}: {e.read()[:500]!r}") from None

    def wait_for_dag(self, dag_id: str, timeout: float = 180.0) -> None:
        """Until the dag-processor has parsed ``dag_id`` into the database."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                self._call("GET", f"/api/v2/dags/{dag_id}")
                return
            except ServingError:
                time.sleep(2)
        raise ServingError(f"DAG {dag_id} not parsed within {timeout:.0f}s; see {self.home / 'logs'}")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        self.wait_for_dag(dag_id)
        self._call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self._call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        from urllib.parse import quote

        return self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        from urllib.parse import quote

        tis = self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances")
        return {t["task_id"]: t["state"] for t in tis["task_instances"]}

    def wait(self, dag_id: str, run_id: str, timeout: float = 1800.0) -> str:
        deadline = time.time() + timeout
        state = "queued"
        while time.time() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(3)
        raise ServingError(f"DAG run {run_id} still {state} after {timeout:.0f}s; tasks {self.task_states(dag_id, run_id)}")
