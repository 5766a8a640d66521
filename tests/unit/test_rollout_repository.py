"""The repository operations a rollout and a config search add: copies, removal, files beside the config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from serving.repository import MARKER, ModelRepository
from tasks.errors import DeployError


def _export(path: Path, onnx: bytes = b"onnx-v1") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(onnx)
    (path / "tokenizer.json").write_text("{}")
    (path / "trimflow_model.json").write_text(json.dumps({"onnx_file": "model.onnx"}))
    return path


def test_copy_version_hard_links_files_and_writes_own_marker_when_copied_locally(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    src = repo.write_version("m", 2, _export(tmp_path / "e"))
    copy = repo.copy_version("m", 2, "m__canary")
    a, b = tmp_path / "repo" / "m" / "2", tmp_path / "repo" / "m__canary" / "2"
    assert copy.digest == src.digest and not copy.reused and repo.versions("m__canary") == [2]
    assert os.stat(a / "model.onnx").st_ino == os.stat(b / "model.onnx").st_ino
    assert os.stat(a / MARKER).st_ino != os.stat(b / MARKER).st_ino
    marker = json.loads((b / MARKER).read_text())
    assert marker["model"] == "m__canary" and marker["copied_from"] == str(a)
    assert json.loads((a / MARKER).read_text())["model"] == "m"
    assert repo.copy_version("m", 2, "m__canary").reused
    assert [p.name for p in (tmp_path / "repo" / "m__canary").iterdir()] == ["2"]


def test_copy_version_refuses_when_destination_differs_or_source_is_missing(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.write_version("m", 1, _export(tmp_path / "a"))
    repo.write_version("x", 1, _export(tmp_path / "b", onnx=b"other"))
    with pytest.raises(DeployError, match="refusing to overwrite"):
        repo.copy_version("m", 1, "x")
    with pytest.raises(DeployError, match="no complete version"):
        repo.copy_version("m", 5, "y")


def test_remove_model_deletes_copy_and_keeps_source_when_copy_is_removed(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.write_version("m", 1, _export(tmp_path / "a"))
    repo.copy_version("m", 1, "m__search")
    repo.remove_model("m__search")
    assert not repo.has_model("m__search") and repo.has_model("m")
    assert (tmp_path / "repo" / "m" / "1" / "model.onnx").read_bytes() == b"onnx-v1"


def test_write_text_puts_file_beside_config_and_refuses_version_like_names(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    where = repo.write_text("m", "search.json", '{"a": 1}')
    assert where == str(tmp_path / "repo" / "m" / "search.json") and repo.read_text("m", "search.json") == '{"a": 1}'
    assert repo.read_text("m", "absent.json") is None
    for bad in ("3.json", "config.pbtxt", "a/b.json"):
        with pytest.raises(DeployError):
            repo.write_text("m", bad, "x")
