"""Rollouts on the real tritonserver under continuous load: promotion without failed requests, rollbacks.

Two kinds of traffic run through each rollout: requests routed by the rollout's ``CanaryRouter``
(what trimflow's clients do) and plain unversioned requests straight to the model (any other
client, which only Triton's own version handling protects). The steps build on each other:
v1 first deploy → v2 promoted under load → broken v3 rolled back → v4 failing its canary
error budget rolled back → v5 through ``deploy_and_smoke_test(rollout=...)``.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from serving.deploy import deploy_and_smoke_test
from serving.loadgen import LoadConfig, LoadGenerator, Target
from serving.model_config import ModelConfigSpec, served_versions
from serving.repository import ModelRepository
from serving.rollout import CanaryRouter, RolloutConfig, rollout
from tasks.errors import RolloutFailed

pytestmark = pytest.mark.integration
MODEL = "tinyllm_rollout"
TRAFFIC = LoadConfig(concurrency=2, rate_rps=25, max_requests=100_000, max_duration_s=300, prompt_words=(4, 12),
                     max_tokens=(4, 8))


@pytest.fixture(scope="module")
def repo(triton_server) -> ModelRepository:
    return ModelRepository(triton_server.config.model_repository)


@pytest.fixture(scope="module")
def broken_export(tiny_llm_export, tmp_path_factory) -> Path:
    broken = tmp_path_factory.mktemp("broken-rollout") / "export"
    shutil.copytree(tiny_llm_export, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 3])
    return broken


@contextmanager
def traffic(server, router: CanaryRouter):
    """Routed and direct unversioned load for the duration of the block; yields both generators."""
    direct = LoadGenerator(server.grpc_url, TRAFFIC.model_copy(update={"seed": 11}), model=MODEL)
    routed = LoadGenerator(server.grpc_url, TRAFFIC, router=router)
    with direct, routed:
        yield routed, direct


def test_rollout_serves_first_version_directly_when_there_is_no_champion(triton_server, tiny_llm_export,
                                                                         repo) -> None:
    r = rollout(tiny_llm_export, MODEL, 1, None, triton_server)
    assert r["served_versions"] == [1] and r["smoke_test"]["ok"] and "skipped" in r["rollout"]["canary"]
    assert served_versions(repo.read_config(MODEL)) == [1]


def test_rollout_promotes_without_failed_requests_when_traffic_runs_through_the_swap(triton_server,
                                                                                     tiny_llm_export, repo) -> None:
    router = CanaryRouter(Target(MODEL))
    cfg = RolloutConfig(canary_share=0.25, min_canary_requests=6, probe=None)
    with traffic(triton_server, router) as (routed, direct):
        r = rollout(tiny_llm_export, MODEL, 2, 1, triton_server, cfg=cfg, router=router)
    for load in (routed, direct):
        assert load.result["requests"] > 20 and load.result["failed"] == 0, load.result["errors"]
    canary = r["rollout"]["canary"]
    assert canary["ok"] >= 6 and canary["failed"] == 0
    assert routed.result["by_target"][f"{MODEL}__canary:2"]["ok"] >= canary["ok"]
    assert r["served_versions"] == [2] and triton_server.ready_versions(MODEL) == [2]
    assert served_versions(repo.read_config(MODEL)) == [2] and repo.versions(MODEL) == [1, 2]
    assert r["rollout"]["canary_retired"] is True and not repo.has_model(f"{MODEL}__canary")
    assert list(r["rollout"]["stages"]) == ["write version", "stage canary", "load canary", "smoke test", "canary",
                                            "promote", "retire canary"]


def test_rollout_rolls_back_broken_version_while_champion_keeps_serving(triton_server, broken_export, repo) -> None:
    router = CanaryRouter(Target(MODEL))
    with traffic(triton_server, router) as (routed, direct):
        with pytest.raises(RolloutFailed, match="failed at 'load canary'") as e:
            rollout(broken_export, MODEL, 3, 2, triton_server, cfg=RolloutConfig(probe=None), router=router)
    report = e.value.report
    assert report["rollback_ok"] is True and report["served_versions"] == [2]
    assert "champion v2 serving" in report["rollback"]
    assert routed.result["failed"] == 0 and direct.result["failed"] == 0
    assert triton_server.ready_versions(MODEL) == [2] and repo.versions(MODEL) == [1, 2]
    assert (Path(repo.root) / MODEL / "_failed" / "3" / "model.onnx").is_file()
    assert not repo.has_model(f"{MODEL}__canary")


def test_rollout_rolls_back_when_canary_exceeds_its_error_budget(triton_server, tiny_llm_export, repo) -> None:
    # The candidate's config caps max_tokens at 4: the 4-token smoke test passes, 8-token canary requests fail.
    spec = ModelConfigSpec.llm_generate(MODEL, max_tokens_limit=4)
    probe = LoadConfig(concurrency=1, max_requests=200, prompt_words=(4, 8), max_tokens=(4, 8))
    cfg = RolloutConfig(canary_share=0.5, min_canary_requests=6, max_canary_error_rate=0.2, probe=probe,
                        smoke_max_tokens=4)
    with pytest.raises(RolloutFailed, match="failed at 'canary'.*error rate") as e:
        rollout(tiny_llm_export, MODEL, 4, 2, triton_server, spec=spec, cfg=cfg)
    report = e.value.report
    assert report["canary"]["failed"] > 0 and "max_tokens=8" in report["canary"]["errors"][0]
    assert report["rollback_ok"] is True and triton_server.ready_versions(MODEL) == [2]
    assert triton_server.model_config(MODEL)["parameters"]["max_tokens_limit"]["string_value"] == "256"
    assert 4 not in repo.versions(MODEL)


def test_deploy_and_smoke_test_rolls_out_through_canary_when_rollout_config_is_given(triton_server,
                                                                                    tiny_llm_export) -> None:
    r = deploy_and_smoke_test(tiny_llm_export, MODEL, "5", "2", triton_server,
                              rollout=RolloutConfig(canary_share=1.0, min_canary_requests=2), smoke_max_tokens=3)
    assert r["served_versions"] == [5] and r["champion_version"] == 2 and r["smoke_test"]["text"].strip()
    assert r["rollout"]["canary"]["ok"] >= 2 and r["rollout"]["probe"]["failed"] == 0
    assert {"dynamic_batching", "response_cache", "version_uri", "reused_version", "grpc_url"} <= set(r)
