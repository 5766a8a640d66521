"""Artifact store and idempotent steps: atomic publish, never overwrite, retries reuse finished work."""

from __future__ import annotations

import json

import pytest

from tasks.config import PruneConfig
from tasks.errors import ConfigError, SourceError, TrimflowError
from tasks.steps import RESULT, run_step, safe_run_id
from tasks.store import MANIFEST, ArtifactStore, tree_digest


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "root"), scratch=tmp_path / "scratch")


def test_publish_moves_folder_with_manifest_and_refuses_to_overwrite(store, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a")
    digest = tree_digest(src)
    uri = store.publish(src, "run/step")
    assert uri.endswith("run/step") and store.exists("run/step")
    assert json.loads((store.fetch("run/step") / MANIFEST).read_text())["digest"] == digest
    again = tmp_path / "again"
    again.mkdir()
    (again / "b.txt").write_text("b")
    with pytest.raises(TrimflowError, match="refusing to overwrite"):
        store.publish(again, "run/step")
    assert (store.fetch("run/step") / "sub" / "a.txt").read_text() == "a"


def test_fetch_raises_when_key_is_not_published(store):
    with pytest.raises(SourceError, match="not published"):
        store.fetch("nope")


def test_run_step_reuses_result_when_retried_with_same_config(store):
    calls = []

    def work(out):
        calls.append(1)
        (out / "weights.bin").write_bytes(b"x" * 10)
        return {"value": 42}

    first = run_step(store, "r1", "prune", PruneConfig(), work)
    second = run_step(store, "r1", "prune", PruneConfig(), work)
    assert calls == [1] and first["value"] == second["value"] == 42
    assert first["reused"] is False and second["reused"] is True
    assert json.loads((store.fetch("r1/prune") / RESULT).read_text())["config_digest"] == first["config_digest"]


def test_run_step_refuses_when_same_run_has_other_config(store):
    run_step(store, "r1", "prune", PruneConfig(mlp_ratio=0.1), lambda out: {})
    with pytest.raises(ConfigError, match="never overwritten"):
        run_step(store, "r1", "prune", PruneConfig(mlp_ratio=0.2), lambda out: {})


def test_run_step_publishes_nothing_when_work_fails(store):
    def boom(out):
        (out / "partial.bin").write_bytes(b"half")
        raise RuntimeError("crash mid-step")

    with pytest.raises(RuntimeError):
        run_step(store, "r1", "distill", {"a": 1}, boom)
    assert not store.exists("r1/distill")
    assert not list(store.scratch.glob("distill-*")), "the temp folder must be cleaned up"


def test_safe_run_id_makes_airflow_ids_path_safe():
    assert safe_run_id("manual__2026-11-27T23:36:49.041414+00:00") == "manual__2026-11-27T23_36_49.041414_00_00"
    with pytest.raises(ConfigError):
        safe_run_id(" ")
