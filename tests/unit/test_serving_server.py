"""LocalTriton's launch recipe and pidfile safety, checked without starting a server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from serving.server import LocalTriton, TritonConfig, _probe_runtime, free_ports
from tasks.errors import ConfigError
from tasks.settings import Settings


@pytest.fixture(scope="module")
def runtime():
    serving_python = Settings.from_env().serving_python
    if not serving_python.exists():
        pytest.skip(f"no serving environment at {serving_python}")
    return _probe_runtime(serving_python)


def test_free_ports_are_distinct_when_several_requested() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)


@pytest.mark.parametrize("kw, where", [
    ({"http_port": 9000, "grpc_port": 9000}, "triton.ports"),
    ({"model_control_mode": "poll", "load_models": ("m",)}, "triton.load_models"),
    ({"response_cache_bytes": -1}, "triton.response_cache_bytes"),
])
def test_triton_config_raises_config_error_when_values_conflict(tmp_path: Path, kw: dict, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        TritonConfig(model_repository=str(tmp_path), state_dir=tmp_path, **kw)
    assert e.value.where == where


def test_triton_config_takes_ports_from_settings_when_urls_set(tmp_path: Path) -> None:
    s = Settings.from_env({"TRIMFLOW_HOME": str(tmp_path), "TRIMFLOW_TRITON_HTTP": "127.0.0.1:18000",
                           "TRIMFLOW_TRITON_GRPC": "127.0.0.1:18001"})
    c = TritonConfig.from_settings(s)
    assert (c.http_port, c.grpc_port, c.metrics_port) == (18000, 18001, 18002)
    assert c.model_repository == str(tmp_path / "triton" / "models") and c.state_dir == tmp_path / "triton" / "state"


def test_local_triton_binds_loopback_only_when_command_built(tmp_path: Path, runtime) -> None:
    server = LocalTriton(TritonConfig.on_free_ports(tmp_path / "repo", tmp_path / "state"))
    cmd = server.command(runtime)
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                 "--model-control-mode=explicit", "--allow-gpu-metrics=false"):
        assert flag in cmd
    assert any(a.startswith("--cache-config=local,size=") for a in cmd)
    assert any(a.startswith("--exit-timeout-secs=") for a in cmd)


def test_local_triton_puts_serving_env_first_when_environment_built(tmp_path: Path, runtime, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/with/numpy2")
    env = LocalTriton(TritonConfig.on_free_ports(tmp_path, tmp_path / "state")).environment(runtime)
    assert env["PATH"].split(os.pathsep)[0] == str(runtime.venv_bin)
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[:2] == [str(runtime.libs_dir), runtime.python_libdir]
    assert "PYTHONPATH" not in env


def test_local_triton_copies_stub_into_backends_when_state_prepared(tmp_path: Path, runtime) -> None:
    server = LocalTriton(TritonConfig.on_free_ports(tmp_path, tmp_path / "state"))
    server._prepare_state(runtime)
    python_backend = tmp_path / "state" / "backends" / "python"
    assert (python_backend / "triton_python_backend_stub").is_file()
    assert (python_backend / "libtriton_python.so").is_file()
    assert (tmp_path / "state" / "caches" / "local" / "libtritoncache_local.so").is_file()


def test_local_triton_stop_spares_process_when_pidfile_names_a_non_triton_pid(tmp_path: Path) -> None:
    server = LocalTriton(TritonConfig.on_free_ports(tmp_path, tmp_path / "state"))
    server.pidfile.parent.mkdir(parents=True)
    # A stale pidfile whose pid was reused by an unrelated process (here: this test itself).
    server.pidfile.write_text(json.dumps({"pid": os.getpid(), "http_port": 1, "grpc_port": 2, "metrics_port": 3,
                                          "model_repository": str(tmp_path)}))
    server.stop()
    assert not server.pidfile.exists()  # and we are still alive to assert it
