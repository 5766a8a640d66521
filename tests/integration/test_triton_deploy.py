"""deploy_and_smoke_test against the real server: promote good versions, roll back broken ones.

The steps build on each other (v1 → v2 → broken v3 → v4 failing its smoke test), as in a
model's life: each test names the state it starts from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving.client import generate
from serving.deploy import deploy_and_smoke_test
from serving.model_config import served_versions
from serving.repository import ModelRepository
from tasks.errors import DeployError

pytestmark = pytest.mark.integration
MODEL = "tinyllm_deploy"


@pytest.fixture(scope="module")
def repo(triton_server) -> ModelRepository:
    return ModelRepository(triton_server.config.model_repository)


@pytest.fixture(scope="module")
def broken_export(tiny_llm_export, tmp_path_factory) -> Path:
    """The tiny export with its ONNX file cut short: it cannot load."""
    broken = tmp_path_factory.mktemp("broken") / "export"
    shutil.copytree(tiny_llm_export, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 3])
    return broken


def test_deploy_serves_first_version_when_no_champion(triton_server, tiny_llm_export, repo) -> None:
    r = deploy_and_smoke_test(tiny_llm_export, MODEL, 1, None, triton_server)
    assert r["served_versions"] == [1] and r["smoke_test"]["ok"] and r["smoke_test"]["text"].strip()
    assert r["dynamic_batching"] is True and r["response_cache"] is True
    assert r["repository"] == str(Path(triton_server.config.model_repository) / MODEL)
    assert r["server"]["grpc"] == triton_server.grpc_url


def test_deploy_switches_to_candidate_and_keeps_champion_on_disk_when_candidate_is_good(
        triton_server, tiny_llm_export, repo) -> None:
    # Version numbers as the MLflow registry hands them over: strings.
    r = deploy_and_smoke_test(tiny_llm_export, MODEL, "2", "1", triton_server)
    assert r["version"] == 2 and r["served_versions"] == [2] and r["champion_version"] == 1
    assert repo.versions(MODEL) == [1, 2]
    assert served_versions(repo.read_config(MODEL)) == [2]
    assert generate(triton_server.grpc_url, MODEL, "The president said", max_tokens=4)


def test_deploy_rolls_back_to_champion_when_candidate_fails_to_load(triton_server, broken_export, repo) -> None:
    with pytest.raises(DeployError) as e:
        deploy_and_smoke_test(broken_export, MODEL, 3, 2, triton_server)
    msg = str(e.value)
    assert "failed at 'load candidate beside champion'" in msg and str(triton_server.log_file) in msg
    assert "champion v2 serving" in msg and "ROLLBACK FAILED" not in msg
    assert triton_server.ready_versions(MODEL) == [2]
    assert served_versions(repo.read_config(MODEL)) == [2]
    assert repo.versions(MODEL) == [1, 2]
    assert (Path(triton_server.config.model_repository) / MODEL / "_failed" / "3" / "model.onnx").is_file()
    assert generate(triton_server.grpc_url, MODEL, "Heavy rain caused", max_tokens=4, version=2)


def test_deploy_rolls_back_to_champion_when_smoke_request_fails(triton_server, tiny_llm_export, repo) -> None:
    # The candidate loads, but the smoke request (an empty prompt) is refused by the model.
    with pytest.raises(DeployError, match="(?s)failed at .smoke test.*empty prompt"):
        deploy_and_smoke_test(tiny_llm_export, MODEL, 4, 2, triton_server, smoke_prompt="")
    assert triton_server.ready_versions(MODEL) == [2]
    assert 4 not in repo.versions(MODEL)
    assert generate(triton_server.http_url, MODEL, "Scientists announced", max_tokens=4, protocol="http")


def test_deploy_changes_nothing_when_version_exists_with_other_content(triton_server, broken_export, repo) -> None:
    with pytest.raises(DeployError, match="(?s)refusing to overwrite.*nothing was changed"):
        deploy_and_smoke_test(broken_export, MODEL, 2, 1, triton_server)
    assert triton_server.ready_versions(MODEL) == [2] and repo.versions(MODEL) == [1, 2]
