"""The model-repository writer on a local folder (no server; the ONNX file is opaque bytes here)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import serving.repository as repository
from serving.repository import MARKER, ModelRepository
from tasks.errors import DeployError
from tasks.settings import Settings


def make_export(path: Path, onnx: bytes = b"onnx-v1", extra: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(onnx)
    (path / "tokenizer.json").write_text('{"model": {}}')
    (path / "tokenizer_config.json").write_text("{}")
    (path / "trimflow_model.json").write_text(json.dumps({"onnx_file": "model.onnx", "num_layers": 2}))
    for name, data in (extra or {}).items():
        (path / name).write_bytes(data)
    return path


def test_repository_writes_complete_version_when_source_is_an_export(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    written = repo.write_version("m", 1, make_export(tmp_path / "exp"))
    vdir = tmp_path / "repo" / "m" / "1"
    assert {p.name for p in vdir.iterdir()} == {"model.py", "generator.py", "model.onnx", "tokenizer.json",
                                                "tokenizer_config.json", "trimflow_model.json", MARKER}
    assert json.loads((vdir / MARKER).read_text())["digest"] == written.digest
    assert not written.reused and repo.versions("m") == [1]
    assert [p.name for p in (tmp_path / "repo" / "m").iterdir()] == ["1"]  # no staging folder left


def test_repository_reuses_version_when_rewritten_with_identical_content(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    first = repo.write_version("m", 2, make_export(tmp_path / "a"))
    again = repo.write_version("m", 2, make_export(tmp_path / "b"))
    assert again.reused and again.digest == first.digest


def test_repository_refuses_overwrite_when_version_exists_with_other_content(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.write_version("m", 2, make_export(tmp_path / "a"))
    with pytest.raises(DeployError, match="refusing to overwrite"):
        repo.write_version("m", 2, make_export(tmp_path / "b", onnx=b"onnx-v2"))
    assert (tmp_path / "repo" / "m" / "2" / "model.onnx").read_bytes() == b"onnx-v1"


def test_repository_refuses_overwrite_when_unmarked_folder_holds_the_version(tmp_path: Path) -> None:
    (tmp_path / "repo" / "m" / "3").mkdir(parents=True)
    with pytest.raises(DeployError, match="refusing to overwrite"):
        ModelRepository(tmp_path / "repo").write_version("m", 3, make_export(tmp_path / "a"))


def test_repository_names_every_missing_file_when_source_is_incomplete(tmp_path: Path) -> None:
    src = make_export(tmp_path / "exp")
    (src / "tokenizer.json").unlink()
    (src / "model.onnx").unlink()
    with pytest.raises(DeployError, match="missing tokenizer.json, model.onnx"):
        ModelRepository(tmp_path / "repo").write_version("m", 1, src)
    assert not (tmp_path / "repo" / "m" / "1").exists()


def test_repository_leaves_no_version_when_staging_fails(tmp_path: Path, monkeypatch) -> None:
    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(repository, "tree_digest", boom)
    with pytest.raises(OSError):
        ModelRepository(tmp_path / "repo").write_version("m", 1, make_export(tmp_path / "exp"))
    assert list((tmp_path / "repo" / "m").iterdir()) == []


def test_repository_serves_named_onnx_file_when_override_given(tmp_path: Path) -> None:
    src = make_export(tmp_path / "exp", extra={"model.int8.onnx": b"int8", "model.int8.onnx.data": b"w"})
    ModelRepository(tmp_path / "repo").write_version("m", 1, src, onnx_file="model.int8.onnx")
    vdir = tmp_path / "repo" / "m" / "1"
    assert json.loads((vdir / "trimflow_model.json").read_text())["onnx_file"] == "model.int8.onnx"
    assert (vdir / "model.int8.onnx.data").is_file() and not (vdir / "model.onnx").exists()


def test_repository_moves_version_aside_when_asked_twice_for_same_number(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.write_version("m", 4, make_export(tmp_path / "a"))
    first = Path(repo.move_aside("m", 4))
    repo.write_version("m", 4, make_export(tmp_path / "b", onnx=b"other"))
    second = Path(repo.move_aside("m", 4))
    assert first == tmp_path / "repo" / "m" / "_failed" / "4"
    assert second.parent == first.parent and second.name.startswith("4-")
    assert repo.versions("m") == [] and (second / "model.onnx").read_bytes() == b"other"


def test_repository_replaces_config_when_written_again(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    assert repo.read_config("m") is None
    repo.write_config("m", "name: \"m\"\n")
    repo.write_config("m", "name: \"m\"\nmax_batch_size: 4\n")
    assert repo.read_config("m").endswith("max_batch_size: 4\n")
    assert sorted(p.name for p in (tmp_path / "repo" / "m").iterdir()) == ["config.pbtxt"]


def test_repository_version_code_imports_in_serving_env_when_serving_package_absent(tmp_path: Path) -> None:
    """model.py + generator.py must work in the stub's interpreter with only the version folder on the path."""
    serving_python = Settings.from_env().serving_python
    if not serving_python.exists():
        pytest.skip(f"no serving environment at {serving_python}")
    ModelRepository(tmp_path / "repo").write_version("m", 1, make_export(tmp_path / "exp"))
    vdir = tmp_path / "repo" / "m" / "1"
    code = ("import sys, types; sys.modules['triton_python_backend_utils'] = types.ModuleType('pb'); "
            f"sys.path.insert(0, {str(vdir)!r}); import model; "
            "assert model.OnnxCausalLM.__module__ == 'generator', model.OnnxCausalLM.__module__; "
            "import importlib.util; assert importlib.util.find_spec('serving') is None; print('ok')")
    # -I: no cwd, no PYTHONPATH, no user site: nothing but the serving venv and the version folder.
    out = subprocess.run([str(serving_python), "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_repository_rejects_version_zero_when_writing(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="start at 1"):
        ModelRepository(tmp_path / "repo").write_version("m", 0, make_export(tmp_path / "exp"))
