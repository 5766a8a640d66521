"""Run the real ``tritonserver`` binary (from the serving environment's nvidia-pytriton wheel) locally.

The server outlives the Python process that started it, so a later DAG task or the demo can
talk to it: ``ensure_running()`` reuses a healthy server recorded in ``<state>/triton.json``.

    server = LocalTriton(TritonConfig.from_settings(Settings.from_env()))
    server.ensure_running(); server.load("tinyllm")
    server.stop()
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from tasks.errors import ConfigError, ServingError
from tasks.settings import Settings

log = logging.getLogger(__name__)

PIDFILE = "triton.json"


def free_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (all sockets held until every port is picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _port_of(url: str, default: int) -> int:
    tail = url.rsplit(":", 1)
    return int(tail[1].split("/")[0]) if len(tail) == 2 and tail[1].split("/")[0].isdigit() else default


@dataclass(frozen=True)
class TritonConfig:
    """How to run one local Triton server.

    Args:
        model_repository: folder (or ``s3://`` URI, read by Triton itself) holding the models.
        state_dir: writable folder for the backends/caches copy, the pidfile and the log.
        host: address every endpoint binds to (default 127.0.0.1; Triton's own default is 0.0.0.0).
        http_port / grpc_port / metrics_port: endpoints (defaults 8000 / 8001 / 8002).
        model_control_mode: ``explicit`` (load/unload on request; default), ``poll`` or ``none``.
        load_models: models loaded at startup in explicit mode (default none).
        response_cache_bytes: size of the local response cache; 0 disables it (default 16 MiB).
        log_file: server stdout+stderr, stub output included (default ``<state_dir>/triton.log``).
        log_verbose: Triton ``--log-verbose`` level (default 0).
        exit_timeout_s: how long Triton waits for in-flight requests on shutdown (default 5).
        startup_timeout_s: how long ``start()`` waits for readiness (default 60).
        serving_python: interpreter of the serving environment (default ``Settings.serving_python``).
        extra_args: further ``tritonserver`` flags (default none).
    """

    model_repository: str
    state_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: Literal["explicit", "poll", "none"] = "explicit"
    load_models: tuple[str, ...] = ()
    response_cache_bytes: int = 16 * 1024 * 1024
    log_file: Path | None = None
    log_verbose: int = 0
    exit_timeout_s: int = 5
    startup_timeout_s: float = 60.0
    serving_python: Path = field(default_factory=lambda: Settings.from_env().serving_python)
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).resolve())
        object.__setattr__(self, "serving_python", Path(self.serving_python))
        if self.log_file is None:
            object.__setattr__(self, "log_file", self.state_dir / "triton.log")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise ConfigError("triton.ports", ports, "need three distinct ports in 1..65535")
        if self.model_control_mode not in ("explicit", "poll", "none"):
            raise ConfigError("triton.model_control_mode", self.model_control_mode, "must be explicit, poll or none")
        if self.load_models and self.model_control_mode != "explicit":
            raise ConfigError("triton.load_models", self.load_models, "only explicit mode loads named models")
        if self.response_cache_bytes < 0:
            raise ConfigError("triton.response_cache_bytes", self.response_cache_bytes, "must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> "TritonConfig":
        """Repository, ports and interpreter from ``Settings``; state under ``<home>/triton``."""
        base = dict(model_repository=settings.triton_repository, state_dir=settings.home / "triton" / "state",
                    http_port=_port_of(settings.triton_http_url, 8000),
                    grpc_port=_port_of(settings.triton_grpc_url, 8001),
                    serving_python=settings.serving_python)
        base["metrics_port"] = base["grpc_port"] + 1 if base["grpc_port"] + 1 != base["http_port"] else 8002
        base.update(overrides)
        return cls(**base)

    @classmethod
    def on_free_ports(cls, model_repository: str | Path, state_dir: Path, **overrides) -> "TritonConfig":
        """A config whose three ports were free a moment ago (tests, side-by-side servers)."""
        http, grpc, metrics = free_ports(3)
        return cls(model_repository=str(model_repository), state_dir=state_dir, http_port=http, grpc_port=grpc,
                   metrics_port=metrics, **overrides)


@dataclass(frozen=True)
class _Runtime:
    """Where the serving environment keeps the binary and what it must be launched with."""

    binary: Path
    wheel_dir: Path
    libs_dir: Path
    python_libdir: str
    python_version: str
    venv_bin: Path


def _probe_runtime(serving_python: Path) -> _Runtime:
    if not serving_python.exists():
        raise ServingError(f"serving interpreter {serving_python} does not exist (set TRIMFLOW_SERVING_PYTHON)")
    code = ("import json, sys, sysconfig; "
            "print(json.dumps({'purelib': sysconfig.get_paths()['purelib'],"
            " 'libdir': sysconfig.get_config_var('LIBDIR'),"
            " 'version': f'{sys.version_info[0]}.{sys.version_info[1]}'}))")
    try:
        out = subprocess.run([str(serving_python), "-c", code], capture_output=True, text=True, check=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        raise ServingError(f"cannot run serving interpreter {serving_python}: {e}") from e
    info = json.loads(out.stdout)
    site = Path(info["purelib"])
    wheel = site / "pytriton" / "tritonserver"
    binary = wheel / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServingError(f"no tritonserver binary at {binary}: install nvidia-pytriton in the serving environment")
    return _Runtime(binary=binary, wheel_dir=wheel, libs_dir=site / "nvidia_pytriton.libs",
                    python_libdir=info["libdir"], python_version=info["version"],
                    # The venv's bin, not the resolved interpreter's: the stub runs `python3` from PATH
                    # and must get the venv's site-packages (numpy<2).
                    venv_bin=Path(os.path.abspath(serving_python)).parent)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_tritonserver(pid: int) -> bool:
    try:
        return _pid_alive(pid) and os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "tritonserver"
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class LocalTriton:
    """One local ``tritonserver`` process and its HTTP control API.

    Args:
        config: how to run it.
    """

    def __init__(self, config: TritonConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._log_handle = None

    # -- endpoints -------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient's HTTP client takes it."""
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    @property
    def log_file(self) -> Path:
        assert self.config.log_file is not None
        return self.config.log_file

    @property
    def pidfile(self) -> Path:
        return self.config.state_dir / PIDFILE

    @property
    def pid(self) -> int | None:
        return self._pid

    def urls(self) -> dict[str, str]:
        return {"http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url}

    # -- lifecycle -------------------------------------------------------------------------
    def command(self, runtime: _Runtime) -> list[str]:
        c = self.config
        cmd = [str(runtime.binary), f"--model-repository={c.model_repository}",
               f"--backend-directory={c.state_dir / 'backends'}", f"--model-control-mode={c.model_control_mode}",
               f"--http-address={c.host}", f"--http-port={c.http_port}",
               f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
               f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
               # WAR: the wheel's server is built with GPU (DCGM) metrics; the local server runs on CPU,
               # where there is nothing for it to poll.
               "--allow-gpu-metrics=false",
               f"--exit-timeout-secs={c.exit_timeout_s}", f"--log-verbose={c.log_verbose}"]
        if c.response_cache_bytes > 0:
            cmd += [f"--cache-directory={c.state_dir / 'caches'}",
                    f"--cache-config=local,size={c.response_cache_bytes}"]
        if c.model_control_mode == "poll":
            cmd.append("--repository-poll-secs=2")
        cmd += [f"--load-model={m}" for m in c.load_models]
        return cmd + list(c.extra_args)

    def environment(self, runtime: _Runtime) -> dict[str, str]:
        env = dict(os.environ)
        # WAR: the wheel's libtritonserver and the python backend need the wheel's bundled libs, and the
        # stub must find the serving interpreter's own libpython (LIBDIR), not a mismatched one on the host.
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(runtime.libs_dir), runtime.python_libdir] +
                                                 [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        # WAR: the python-backend stub runs `python3` from PATH to find its packages; the pipeline's
        # numpy 2 makes it return empty output buffers, so the serving venv must come first.
        env["PATH"] = os.pathsep.join([str(runtime.venv_bin), env.get("PATH", "")])
        # Version folders stay byte-identical to what was published: no __pycache__ written into them.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(var, None)  # the pipeline env's values would leak numpy 2 into the stub
        return env

    def _prepare_state(self, runtime: _Runtime) -> None:
        """A writable copy of backends/ and caches/ with the stub beside the python backend."""
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        if not str(self.config.model_repository).startswith("s3://"):
            # A first deploy starts the server before any model folder exists; Triton refuses a missing root.
            Path(self.config.model_repository).mkdir(parents=True, exist_ok=True)
        stamp = state / "backends" / ".source"
        source = f"{runtime.wheel_dir}|{runtime.python_version}|{runtime.binary.stat().st_mtime_ns}"
        if stamp.is_file() and stamp.read_text() == source:
            return
        stub = runtime.wheel_dir / "python_backend_stubs" / runtime.python_version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServingError(f"no python-backend stub for Python {runtime.python_version} at {stub}")
        for sub in ("backends", "caches"):
            tmp = state / f".{sub}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(runtime.wheel_dir / sub, tmp, ignore=shutil.ignore_patterns("__pycache__"))
            if sub == "backends":
                # WAR: the python backend looks for its stub next to libtriton_python.so; the wheel keeps
                # stubs per Python version elsewhere.
                shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
            shutil.rmtree(state / sub, ignore_errors=True)
            os.rename(tmp, state / sub)
        stamp.write_text(source)

    def start(self) -> "LocalTriton":
        """Start the server and wait until it is ready.

        Raises:
            ServingError: the server exited or was not ready within ``startup_timeout_s``; the
                message carries the tail of the server log.
        """
        if self._pid is not None and _pid_alive(self._pid):
            return self
        runtime = _probe_runtime(self.config.serving_python)
        self._prepare_state(runtime)
        self._cleanup_handles()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = self.log_file.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._log_handle.write(f"\n=== trimflow: starting tritonserver {stamp} ===\n".encode())
        self._log_handle.flush()
        cmd = self.command(runtime)
        log.info("starting %s", " ".join(cmd))
        # Own session and process group: stop() can end the stubs with the server, and a Ctrl-C in the
        # caller's terminal does not reach a server meant to outlive it.
        self._proc = subprocess.Popen(cmd, env=self.environment(runtime), stdout=self._log_handle,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                      cwd=self.config.state_dir)
        self._pid = self._proc.pid
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup_handles()
                self._pid = None
                raise ServingError(f"tritonserver exited with code {code} during startup; "
                                   f"log {self.log_file}:\n{self.log_tail()}")
            if self.is_server_ready():
                self._write_pidfile(cmd)
                log.info("tritonserver ready (pid %s) http %s grpc %s", self._pid, self.http_url, self.grpc_url)
                return self
            time.sleep(0.2)
        self.stop()
        raise ServingError(f"tritonserver not ready after {self.config.startup_timeout_s:.0f}s; "
                           f"log {self.log_file}:\n{self.log_tail()}")

    def ensure_running(self) -> "LocalTriton":
        """Reuse the healthy server recorded in the pidfile, or start one.

        A recorded server is reused only if its process is a live tritonserver answering on the
        recorded ports and serving the same repository; the recorded ports then win over the
        config's. A recorded server that stops answering is killed and replaced.

        Raises:
            ServingError: a live server recorded here serves another repository, or start failed.
        """
        rec = self._read_pidfile()
        if rec is not None:
            pid = int(rec["pid"])
            if _is_tritonserver(pid):
                adopted = LocalTriton(replace(self.config, http_port=rec["http_port"], grpc_port=rec["grpc_port"],
                                              metrics_port=rec["metrics_port"]))
                # Live, not ready: with strict readiness a server is "not ready" while another task is
                # (re)loading a model, and that server must not be taken for a broken one.
                if adopted.wait_live(min(self.config.startup_timeout_s, 30.0)):
                    if rec["model_repository"] != str(self.config.model_repository):
                        raise ServingError(
                            f"tritonserver pid {pid} recorded in {self.pidfile} serves {rec['model_repository']}, "
                            f"not {self.config.model_repository}; stop it first")
                    self.config = adopted.config
                    self._pid = pid
                    log.info("reusing tritonserver pid %s on %s", pid, self.http_url)
                    return self
                log.warning("tritonserver pid %s recorded in %s does not answer; restarting it", pid, self.pidfile)
                LocalTriton(adopted.config)._stop_pid(pid)
            self.pidfile.unlink(missing_ok=True)
        return self.start()

    def stop(self) -> None:
        """Stop the server and every process of its group (the python stubs); idempotent.

        Stops the server recorded in the pidfile too when this object did not start it.
        """
        pid = self._pid
        if pid is None:
            rec = self._read_pidfile()
            # A recorded pid may have been reused by an unrelated process since: only a tritonserver is stopped.
            pid = int(rec["pid"]) if rec and _is_tritonserver(int(rec["pid"])) else None
        if pid is not None:
            self._stop_pid(pid)
        self.pidfile.unlink(missing_ok=True)
        self._pid = None
        self._cleanup_handles()

    def _stop_pid(self, pid: int) -> None:
        # SIGTERM to the server alone lets it unload models and end its stubs cleanly; then the whole
        # group is killed so that no orphaned stub survives a server that did not finish in time.
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.config.exit_timeout_s + 10
        while time.monotonic() < deadline and _pid_alive(pid):
            if self._proc is not None and self._proc.pid == pid and self._proc.poll() is not None:
                break
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise ServingError(f"tritonserver pid {pid} did not exit after SIGKILL") from None
        deadline = time.monotonic() + 10
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _cleanup_handles(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def _write_pidfile(self, cmd: list[str]) -> None:
        from tasks.store import write_json_atomic

        c = self.config
        write_json_atomic(self.pidfile, {"pid": self._pid, "http_port": c.http_port, "grpc_port": c.grpc_port,
                                         "metrics_port": c.metrics_port, "host": c.host,
                                         "model_repository": str(c.model_repository), "log_file": str(self.log_file),
                                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": cmd})

    def _read_pidfile(self) -> dict | None:
        try:
            return json.loads(self.pidfile.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError) as e:
            log.warning("ignoring unreadable pidfile %s: %s", self.pidfile, e)
            return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP control API ------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def is_server_live(self) -> bool:
        try:
            return self._request("GET", "/v2/health/live", timeout=2)[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_live(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.is_server_live():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def is_server_ready(self) -> bool:
        try:
            return self._request("GET", "/v2/health/ready", timeout=2)[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self, name: str, version: int | str = "") -> bool:
        """True when ``name`` (that ``version``, or any when empty) is loaded and ready."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if str(version) else "") + "/ready"
        try:
            return self._request("GET", path, timeout=5)[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    def load(self, name: str, timeout_s: float = 300.0) -> None:
        """(Re)load ``name`` from the repository; returns when Triton has loaded it.

        Versions unchanged since the last load keep serving while changed ones reload.

        Raises:
            ServingError: Triton refused the load; the message has Triton's reason and the log path.
        """
        code, body = self._call("POST", f"/v2/repository/models/{name}/load", timeout_s)
        if code != 200:
            raise ServingError(f"loading model {name!r} failed (HTTP {code}): {_error_text(body)}; "
                               f"server log: {self.log_file}")

    def unload(self, name: str, wait_s: float = 60.0) -> None:
        """Unload every version of ``name``; waits until Triton reports it unavailable."""
        code, body = self._call("POST", f"/v2/repository/models/{name}/unload", wait_s)
        if code != 200:
            raise ServingError(f"unloading model {name!r} failed (HTTP {code}): {_error_text(body)}; "
                               f"server log: {self.log_file}")
        # Unload returns once requested; the instances finish in-flight work and leave after it.
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not any(m.get("name") == name and m.get("state") in ("READY", "UNLOADING") for m in self.index()):
                return
            time.sleep(0.1)
        raise ServingError(f"model {name!r} still loaded {wait_s:.0f}s after unload; server log: {self.log_file}")

    def index(self) -> list[dict]:
        """The repository index: ``[{name, version, state, reason}]`` for every model Triton knows."""
        code, body = self._call("POST", "/v2/repository/index", 30.0)
        if code != 200:
            raise ServingError(f"repository index failed (HTTP {code}): {_error_text(body)}")
        return json.loads(body or b"[]")

    def ready_versions(self, name: str) -> list[int]:
        return sorted(int(m["version"]) for m in self.index()
                      if m.get("name") == name and m.get("state") == "READY" and str(m.get("version", "")).isdigit())

    def model_config(self, name: str, version: int | str = "") -> dict:
        """The configuration Triton actually runs for ``name`` (JSON), after its own auto-completion."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if str(version) else "") + "/config"
        code, body = self._call("GET", path, 30.0)
        if code != 200:
            raise ServingError(f"config of model {name!r} unavailable (HTTP {code}): {_error_text(body)}")
        return json.loads(body)

    def metrics(self) -> str:
        """Prometheus text from the metrics endpoint."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
                return r.read().decode()
        except (urllib.error.URLError, OSError) as e:
            raise ServingError(f"metrics endpoint {self.metrics_url} unreachable: {e}") from e

    def _call(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        try:
            return self._request(method, path, timeout=timeout)
        except (urllib.error.URLError, OSError) as e:
            raise ServingError(f"tritonserver at {self.http_url} unreachable ({method} {path}): {e}; "
                               f"server log: {self.log_file}") from e


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body).get("error", body.decode(errors="replace"))
    except (json.JSONDecodeError, AttributeError):
        return body.decode(errors="replace")


def local_server(settings: Settings | None = None, **overrides) -> LocalTriton:
    """The LocalTriton the DAG tasks and the demo share (state under ``<home>/triton/state``)."""
    return LocalTriton(TritonConfig.from_settings(settings or Settings.from_env(), **overrides))


def stop_recorded(settings: Settings | None = None) -> bool:
    """Stop the server recorded for ``settings`` (the demo's ``--stop``); False when none was recorded."""
    server = local_server(settings)
    recorded = server.pidfile.is_file()
    server.stop()
    return recorded
