"""The model-repository writer against a real S3 API (rclone serve s3 on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.repository import MARKER, ModelRepository
from tasks.errors import DeployError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from devstack.s3_server import S3Server, rclone_binary

    try:
        rclone_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    server = S3Server(tmp_path_factory.mktemp("s3") / "data").start()
    server.make_bucket("models")
    yield server
    server.stop()


@pytest.fixture()
def repo(s3, monkeypatch, tmp_path) -> ModelRepository:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return ModelRepository(f"s3://models/{tmp_path.name}/triton", endpoint_url=s3.url, scratch=tmp_path / "scratch")


def _export(path: Path, onnx: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(onnx)
    (path / "tokenizer.json").write_text("{}")
    (path / "trimflow_model.json").write_text(json.dumps({"onnx_file": "model.onnx"}))
    return path


def test_s3_repository_publishes_version_with_marker_when_written(repo, s3, tmp_path: Path) -> None:
    written = repo.write_version("m", 1, _export(tmp_path / "a", b"x" * 10_000))
    keys = sorted(o["Key"] for o in repo.client.list_objects_v2(Bucket="models", Prefix=repo.prefix)["Contents"])
    names = {k.rsplit("/", 1)[1] for k in keys}
    assert {"model.py", "generator.py", "model.onnx", "tokenizer.json", "trimflow_model.json", MARKER} <= names
    assert repo.versions("m") == [1] and repo.marker("m", 1)["digest"] == written.digest
    assert repo.write_version("m", 1, _export(tmp_path / "b", b"x" * 10_000)).reused


def test_s3_repository_refuses_overwrite_when_version_has_other_content(repo, tmp_path: Path) -> None:
    repo.write_version("m", 2, _export(tmp_path / "a", b"one"))
    with pytest.raises(DeployError, match="refusing to overwrite"):
        repo.write_version("m", 2, _export(tmp_path / "b", b"two"))


def test_s3_repository_ignores_version_without_marker_when_listing(repo, tmp_path: Path) -> None:
    repo.write_version("m", 1, _export(tmp_path / "a", b"one"))
    # An interrupted upload: files but no marker.
    repo.client.put_object(Bucket="models", Key=repo._key("m", 5, "model.onnx"), Body=b"half")
    assert repo.versions("m") == [1]


def test_s3_repository_moves_version_aside_when_failed(repo, tmp_path: Path) -> None:
    repo.write_version("m", 3, _export(tmp_path / "a", b"bad"))
    where = repo.move_aside("m", 3)
    assert where == repo.uri("m", "_failed", 3)
    assert repo.versions("m") == [] and not repo._s3_keys(repo._key("m", 3) + "/")
    moved = repo.client.get_object(Bucket="models", Key=repo._key("m", "_failed", 3, "model.onnx"))["Body"].read()
    assert moved == b"bad"


def test_s3_repository_replaces_config_when_written_again(repo) -> None:
    assert repo.read_config("m") is None
    repo.write_config("m", 'name: "m"\n')
    repo.write_config("m", 'name: "m"\nmax_batch_size: 2\n')
    assert repo.read_config("m") == 'name: "m"\nmax_batch_size: 2\n'
