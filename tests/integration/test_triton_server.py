"""LocalTriton's lifecycle with servers of its own: reuse through the pidfile, stop, failed start."""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from serving.model_config import ModelConfigSpec
from serving.repository import ModelRepository
from serving.server import LocalTriton, TritonConfig, _group_alive, free_ports
from tasks.errors import ServingError
from tasks.settings import Settings

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, **kw) -> TritonConfig:
    python = Settings.from_env().serving_python
    if not python.exists():
        pytest.skip(f"no serving environment at {python}")
    (tmp_path / "models").mkdir(exist_ok=True)
    return TritonConfig.on_free_ports(tmp_path / "models", tmp_path / "state", serving_python=python,
                                      startup_timeout_s=30, **kw)


def test_local_triton_reuses_recorded_server_and_stops_stubs_when_asked_from_another_object(
        tmp_path: Path, tiny_llm_export: Path) -> None:
    config = _config(tmp_path)
    ModelRepository(config.model_repository).write_version("m", 1, tiny_llm_export)
    ModelRepository(config.model_repository).write_config("m", ModelConfigSpec.llm_generate("m").to_pbtxt())
    first = LocalTriton(config).start()
    try:
        first.load("m")
        stubs = subprocess.run(["pgrep", "-g", str(first.pid), "-f", "triton_python_backend_stub"],
                               capture_output=True, text=True).stdout.split()
        assert stubs, "a loaded python model runs a stub process in the server's group"
        # A later task builds its own object, with other ports in its config: the recorded server wins.
        http, grpc, metrics = free_ports(3)
        later = LocalTriton(replace(config, http_port=http, grpc_port=grpc, metrics_port=metrics))
        later.ensure_running()
        assert later.pid == first.pid and later.http_url == first.http_url
        assert later.is_ready("m", 1)
        later.stop()
        assert not _group_alive(first.pid) and not later.pidfile.exists()
    finally:
        first.stop()


def test_local_triton_starts_fresh_when_pidfile_names_a_dead_server(tmp_path: Path) -> None:
    config = _config(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    config.state_dir.mkdir(parents=True)
    (config.state_dir / "triton.json").write_text(json.dumps({
        "pid": dead.pid, "http_port": config.http_port, "grpc_port": config.grpc_port,
        "metrics_port": config.metrics_port, "model_repository": config.model_repository}))
    server = LocalTriton(config)
    try:
        server.ensure_running()
        assert server.pid != dead.pid and server.is_server_ready()
        assert json.loads(server.pidfile.read_text())["pid"] == server.pid
    finally:
        server.stop()


def test_local_triton_raises_with_log_tail_when_port_is_taken(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", config.grpc_port))
        s.listen()
        server = LocalTriton(config)
        with pytest.raises(ServingError) as e:
            server.start()
    msg = str(e.value)
    assert "tritonserver exited" in msg and str(server.log_file) in msg
    assert f"127.0.0.1:{config.grpc_port}' already in use" in msg  # Triton's own words, from the log tail
    assert server.pid is None and not server.pidfile.exists()


def test_local_triton_refuses_to_adopt_when_recorded_server_serves_another_repository(tmp_path: Path) -> None:
    config = _config(tmp_path)
    server = LocalTriton(config).start()
    try:
        other = LocalTriton(replace(config, model_repository=str(tmp_path / "elsewhere")))
        with pytest.raises(ServingError, match="serves .*models, not .*elsewhere"):
            other.ensure_running()
        assert server.is_server_ready()
    finally:
        server.stop()
