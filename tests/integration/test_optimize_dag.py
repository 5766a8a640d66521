"""The optimize DAG through real Airflow (`airflow dags test`), a real MLflow server on
PostgreSQL and a real Triton server, on 127.0.0.1.

The mechanics (registration, aliases, rollback on a failed gate, bad data, S3 artifacts) run on
a tiny random Llama so they take seconds per task; the real-model run (marked slow) runs the
packaged SmolLM2 in the `ci` profile and checks a real generated response.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TINY = {"profile": "ci", "student_layers": 2, "distill_steps": 3, "min_speedup": 0.0, "max_ppl_ratio": 1e6,
        "registered_model": "trimflow-tiny", "model_name": "tiny_llm"}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    mlflow_url: str
    triton_http: str
    triton_grpc: str

    def settings(self):
        from tasks.settings import Settings

        return Settings.from_env({**os.environ, **self.env})

    def run(self, conf: dict, name: str) -> dict:
        from devstack.demo import run_dag

        return run_dag(self.settings(), conf, self.env, self.home / "logs" / f"{name}.log", echo=False)

    def log_text(self, result: dict) -> str:
        return Path(result["log"]).read_text()


def _start_stack(tmp: Path, *, artifact_root: str | None = None, mlflow_artifacts: str | None = None,
                 extra_env: dict[str, str] | None = None):
    from devstack import postgres
    from devstack.mlflow_server import MlflowServer
    from serving.server import free_ports

    if not postgres.available():
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is required for the integration tests (it runs on these machines)")
    db = f"trimflow_it_{uuid.uuid4().hex[:10]}"
    backend = postgres.create_database(db)
    http, grpc = free_ports(2)
    env = {
        "TRIMFLOW_HOME": str(tmp / "home"),
        # Share converted models with the demo and other runs: converting the GGUF takes ~45 s.
        "TRIMFLOW_CACHE": os.environ.get("TRIMFLOW_TEST_CACHE", str(Path(__file__).resolve().parents[2] / ".trimflow" / "cache")),
        "TRIMFLOW_TRITON_HTTP": f"127.0.0.1:{http}",
        "TRIMFLOW_TRITON_GRPC": f"127.0.0.1:{grpc}",
        **(extra_env or {}),
    }
    if artifact_root:
        env["TRIMFLOW_ARTIFACT_ROOT"] = artifact_root
    server = MlflowServer(backend_uri=backend, artifacts=mlflow_artifacts or str(tmp / "mlartifacts"),
                          state_dir=tmp / "mlflow", env=extra_env).start()
    env["MLFLOW_TRACKING_URI"] = server.url
    stack = Stack(tmp / "home", env, server.url, env["TRIMFLOW_TRITON_HTTP"], env["TRIMFLOW_TRITON_GRPC"])
    return stack, server, db


def _stop_stack(stack: Stack, server, db: str) -> None:
    from devstack import postgres
    from serving.server import stop_recorded

    stop_recorded(stack.settings())
    server.stop()
    postgres.drop_database(db)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("src") / "tiny-llm", layers=4)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_source):
    tmp = tmp_path_factory.mktemp("stack")
    s, server, db = _start_stack(tmp)
    with _env(s.env):
        yield s
    _stop_stack(s, server, db)


class _env:
    """Apply env vars for the client calls a test makes itself (registry lookups, tritonclient)."""

    def __init__(self, env):
        self.env, self.saved = env, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _registry(stack: Stack, name: str) -> list[dict]:
    from tasks import registry

    return registry.versions(stack.mlflow_url, name)


def _generate(stack: Stack, model: str, version: str = "") -> str:
    from serving.client import generate

    return generate(stack.triton_grpc, model, "The city council", max_tokens=6, version=version)


def test_optimize_dag_registers_deploys_and_promotes_when_run_twice(stack, tiny_source):
    conf = {**TINY, "source": str(tiny_source)}
    first = stack.run(conf, "first")
    assert first["state"] == "success", stack.log_text(first)[-4000:]
    versions = _registry(stack, "trimflow-tiny")
    assert [v["version"] for v in versions] == [1]
    assert set(versions[0]["aliases"]) == {"champion", "challenger"}
    assert versions[0]["tags"]["trimflow.recipe"] == "distill,prune,quantize"
    assert versions[0]["tags"]["trimflow.teacher_hash"]
    assert _generate(stack, "tiny_llm").strip()

    from tasks.steps import safe_run_id

    report = json.loads((stack.settings().reports_dir / safe_run_id(first["run_id"]) / "report.json").read_text())
    assert report["triton"]["dynamic_batching"] is True and report["triton"]["response_cache"] is True
    assert report["smoke_test"]["ok"] is True and report["smoke_test"]["text"].strip()
    for side in ("teacher", "student"):
        assert report[side]["perplexity"] > 1 and report[side]["size_bytes"] > 0 and report[side]["tokens_per_s"] > 0

    second = stack.run(conf, "second")
    assert second["state"] == "success", stack.log_text(second)[-4000:]
    versions = {v["version"]: v for v in _registry(stack, "trimflow-tiny")}
    assert sorted(versions) == [1, 2]
    assert "champion" in versions[2]["aliases"] and "champion" not in versions[1]["aliases"]
    from serving.server import local_server

    assert local_server(stack.settings()).ready_versions("tiny_llm") == [2]


def test_optimize_dag_fails_at_quality_gate_and_keeps_champion_when_gate_is_impossible(stack, tiny_source):
    before = _registry(stack, "trimflow-tiny")
    if not before:
        pytest.fail("needs the champion registered by the previous test (run the module in order)")
    champion = next(v["version"] for v in before if "champion" in v["aliases"])
    result = stack.run({**TINY, "source": str(tiny_source), "max_ppl_ratio": 1e-6}, "gate")
    assert result["state"] == "failed"
    log = stack.log_text(result)
    assert "QualityGateFailed" in log and "max_ppl_ratio" in log and "quality_gate.json" in log
    after = _registry(stack, "trimflow-tiny")
    assert [v["version"] for v in after] == [v["version"] for v in before], "a failed gate must not register"
    assert next(v["version"] for v in after if "champion" in v["aliases"]) == champion
    assert _generate(stack, "tiny_llm").strip(), "the previous champion must still answer"


def test_optimize_dag_stops_at_validate_data_when_eval_overlaps_train(stack, tiny_source, tmp_path):
    texts = [f"Article {i}: " + "the council met and voted on the budget for the town. " * 6 for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"text": None}))
    result = stack.run({**TINY, "source": str(tiny_source), "data_source": str(tmp_path),
                        "registered_model": "trimflow-baddata"}, "baddata")
    assert result["state"] == "failed"
    log = stack.log_text(result)
    assert "DataValidationError" in log
    assert "expect_column_values_to_not_be_in_set" in log and "expect_column_values_to_not_be_null" in log
    assert _registry(stack, "trimflow-baddata") == []


def test_optimize_dag_keeps_artifacts_on_s3_when_roots_are_s3(tmp_path_factory, tiny_source):
    from devstack.s3_server import S3Server
    from tasks.store import ArtifactStore, s3_client

    tmp = tmp_path_factory.mktemp("s3stack")
    s3 = S3Server(tmp / "s3").start()
    s3.make_bucket("trimflow")
    try:
        with _env(s3.env()):
            client = s3_client(s3.url)
            for f in sorted(tiny_source.iterdir()):  # the model source itself comes from S3 too
                client.upload_file(str(f), "trimflow", f"sources/tiny-llm/{f.name}")
            stack, server, db = _start_stack(tmp, artifact_root="s3://trimflow/runs",
                                             mlflow_artifacts="s3://trimflow/mlflow", extra_env=s3.env())
            try:
                with _env(stack.env):
                    result = stack.run({**TINY, "source": "s3://trimflow/sources/tiny-llm",
                                        "registered_model": "trimflow-s3"}, "s3")
                    assert result["state"] == "success", stack.log_text(result)[-4000:]
                    store = ArtifactStore("s3://trimflow/runs", scratch=tmp / "check", endpoint_url=s3.url)
                    from tasks.steps import safe_run_id

                    rid = safe_run_id(result["run_id"])
                    for step in ("ingest", "data", "baseline", "distill", "prune", "export", "quantize", "evaluate"):
                        assert store.exists(f"{rid}/{step}"), f"{step} not published to S3"
                    keys = [o["Key"] for o in client.list_objects_v2(Bucket="trimflow", Prefix="mlflow/")["Contents"]]
                    assert any(k.endswith("model.onnx") or k.endswith(".onnx") for k in keys), keys[:20]
                    versions = _registry(stack, "trimflow-s3")
                    assert versions and "champion" in versions[0]["aliases"]
                    assert _generate(stack, "tiny_llm").strip()
            finally:
                _stop_stack(stack, server, db)
    finally:
        s3.stop()


@pytest.mark.slow
def test_optimize_dag_serves_real_text_when_ci_profile_on_smollm2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    stack, server, db = _start_stack(tmp)
    try:
        with _env(stack.env):
            result = stack.run({"profile": "ci", "registered_model": "trimflow-smollm2-ci"}, "real")
            assert result["state"] == "success", stack.log_text(result)[-6000:]
            versions = _registry(stack, "trimflow-smollm2-ci")
            assert versions[-1]["aliases"] and "champion" in versions[-1]["aliases"]
            text = _generate(stack, "trimflow_llm")
            words = [w for w in text.split() if w.isalpha()]
            assert len(words) >= 2, f"expected real words from SmolLM2, got {text!r}"
    finally:
        _stop_stack(stack, server, db)
