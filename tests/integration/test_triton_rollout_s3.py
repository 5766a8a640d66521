"""A rollout whose repository is on S3 (``rclone serve s3`` on 127.0.0.1), read by Triton itself.

The writer speaks boto3 to ``s3://models/triton``; Triton reads the same objects through its
own S3 client as ``s3://127.0.0.1:<port>/models/triton`` (its form for a non-AWS endpoint).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving.loadgen import LoadConfig, LoadGenerator, Target
from serving.model_config import served_versions
from serving.repository import MARKER, ModelRepository
from serving.rollout import CanaryRouter, RolloutConfig, rollout
from tasks.errors import RolloutFailed

pytestmark = pytest.mark.integration
MODEL = "tinyllm_s3"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from devstack.s3_server import S3Server, rclone_binary

    try:
        rclone_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    server = S3Server(tmp_path_factory.mktemp("s3-rollout") / "data").start()
    server.make_bucket("models")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(s3, tmp_path_factory):
    """Triton serving the S3 repository, and the boto3 writer for it."""
    from serving.server import LocalTriton, TritonConfig, _group_alive
    from tasks.settings import Settings

    root = tmp_path_factory.mktemp("triton-s3")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env().items():  # boto3 here, and Triton's S3 client (it inherits the environment)
            mp.setenv(k, v)
        repo = ModelRepository("s3://models/triton", endpoint_url=s3.url, scratch=root / "scratch")
        # WAR: Triton refuses to start on an S3 repository path with no object under it ("not a valid
        # directory"); a file at the repository root is not a model folder, so Triton ignores it.
        repo.client.put_object(Bucket="models", Key="triton/README", Body=b"trimflow test repository\n")
        server = LocalTriton(TritonConfig.on_free_ports(f"s3://127.0.0.1:{s3.port}/models/triton", root / "state",
                                                        serving_python=Settings.from_env().serving_python))
        server.start()
        pid = server.pid
        try:
            yield server, repo
        finally:
            server.stop()
    assert pid is not None and not _group_alive(pid)


def test_s3_rollout_promotes_under_load_and_removes_canary_objects_when_candidate_is_good(stack,
                                                                                         tiny_llm_export) -> None:
    server, repo = stack
    rollout(tiny_llm_export, MODEL, 1, None, server, repository=repo)
    router = CanaryRouter(Target(MODEL))
    load_cfg = LoadConfig(concurrency=2, rate_rps=20, max_requests=100_000, max_duration_s=300, prompt_words=(4, 12),
                          max_tokens=(4, 8))
    with LoadGenerator(server.grpc_url, load_cfg, router=router) as load:
        r = rollout(tiny_llm_export, MODEL, 2, 1, server, repository=repo, router=router,
                    cfg=RolloutConfig(canary_share=0.5, min_canary_requests=4, probe=None))
    assert load.result["failed"] == 0 and load.result["requests"] > 10, load.result["errors"]
    assert r["served_versions"] == [2] and r["repository"] == "s3://models/triton/" + MODEL
    assert repo.versions(MODEL) == [1, 2] and served_versions(repo.read_config(MODEL)) == [2]
    assert not repo.has_model(f"{MODEL}__canary")


def test_s3_rollout_rolls_back_and_moves_broken_version_aside_when_canary_cannot_load(stack, tiny_llm_export,
                                                                                     tmp_path: Path) -> None:
    server, repo = stack
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llm_export, broken)
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:1000])
    with pytest.raises(RolloutFailed, match="failed at 'load canary'") as e:
        rollout(broken, MODEL, 3, 2, server, repository=repo, cfg=RolloutConfig(probe=None))
    assert e.value.report["rollback_ok"] is True and server.ready_versions(MODEL) == [2]
    assert repo.versions(MODEL) == [1, 2]
    failed = repo.client.list_objects_v2(Bucket="models", Prefix=f"triton/{MODEL}/_failed/3/")["Contents"]
    assert {o["Key"].rsplit("/", 1)[1] for o in failed} >= {"model.onnx", MARKER}
    assert not repo.has_model(f"{MODEL}__canary")
