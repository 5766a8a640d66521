"""The optimize DAG through real Airflow (`airflow dags test`), a real MLflow server on
PostgreSQL and a real Triton server, on 127.0.0.1.

The mechanics (registration, aliases, rollback on a failed gate, bad data, S3 artifacts) run on
a tiny random Llama so they take seconds per task; the real-model run (marked slow) runs the
packaged SmolLM2 in the `ci` profile and checks a real generated response.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.dagstack import TINY, env_vars, generate_text, registry_versions, start_stack, stop_stack

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_source):
    tmp = tmp_path_factory.mktemp("stack")
    s, server, db = start_stack(tmp)
    with env_vars(s.env):
        yield s
    stop_stack(s, server, db)


def test_optimize_dag_registers_deploys_and_promotes_when_run_twice(stack, tiny_source):
    conf = {**TINY, "source": str(tiny_source)}
    first = stack.run(conf, "first")
    assert first["state"] == "success", stack.log_text(first)[-4000:]
    versions = registry_versions(stack, "trimflow-tiny")
    assert [v["version"] for v in versions] == [1]
    assert set(versions[0]["aliases"]) == {"champion", "challenger"}
    assert versions[0]["tags"]["trimflow.recipe"] == "distill,prune_mlp,export_onnx,quantize_dynamic_int8"
    assert versions[0]["tags"]["trimflow.teacher_hash"]
    assert generate_text(stack, "tiny_llm").strip()

    from tasks.steps import safe_run_id

    report = json.loads((stack.settings().reports_dir / safe_run_id(first["run_id"]) / "report.json").read_text())
    assert report["triton"]["dynamic_batching"] is True and report["triton"]["response_cache"] is True
    assert report["triton"]["continuous_batching"] is True
    assert report["smoke_test"]["ok"] is True and report["smoke_test"]["text"].strip()
    assert report["smoke_test"]["endpoint"] == "stream"
    for side in ("teacher", "student"):
        assert report[side]["perplexity"] > 1 and report[side]["size_bytes"] > 0 and report[side]["tokens_per_s"] > 0

    second = stack.run(conf, "second")
    assert second["state"] == "success", stack.log_text(second)[-4000:]
    versions = {v["version"]: v for v in registry_versions(stack, "trimflow-tiny")}
    assert sorted(versions) == [1, 2]
    assert "champion" in versions[2]["aliases"] and "champion" not in versions[1]["aliases"]
    from serving.server import local_server

    assert local_server(stack.settings()).ready_versions("tiny_llm") == [2]
    assert local_server(stack.settings()).ready_versions("tiny_llm_stream") == [2]


def test_optimize_dag_fails_at_quality_gate_and_keeps_champion_when_gate_is_impossible(stack, tiny_source):
    before = registry_versions(stack, "trimflow-tiny")
    if not before:
        pytest.fail("needs the champion registered by the previous test (run the module in order)")
    champion = next(v["version"] for v in before if "champion" in v["aliases"])
    result = stack.run({**TINY, "source": str(tiny_source), "max_ppl_ratio": 1e-6}, "gate")
    assert result["state"] == "failed"
    log = stack.log_text(result)
    assert "QualityGateFailed" in log and "max_ppl_ratio" in log and "quality_gate.json" in log
    after = registry_versions(stack, "trimflow-tiny")
    assert [v["version"] for v in after] == [v["version"] for v in before], "a failed gate must not register"
    assert next(v["version"] for v in after if "champion" in v["aliases"]) == champion
    assert generate_text(stack, "tiny_llm").strip(), "the previous champion must still answer"


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
    assert registry_versions(stack, "trimflow-baddata") == []


def test_optimize_dag_keeps_artifacts_on_s3_when_roots_are_s3(tmp_path_factory, tiny_source):
    from devstack.s3_server import S3Server
    from tasks.store import ArtifactStore, s3_client

    tmp = tmp_path_factory.mktemp("s3stack")
    s3 = S3Server(tmp / "s3").start()
    s3.make_bucket("trimflow")
    try:
        with env_vars(s3.env()):
            client = s3_client(s3.url)
            for f in sorted(tiny_source.iterdir()):  # the model source itself comes from S3 too
                client.upload_file(str(f), "trimflow", f"sources/tiny-llm/{f.name}")
            stack, server, db = start_stack(tmp, artifact_root="s3://trimflow/runs",
                                             mlflow_artifacts="s3://trimflow/mlflow", extra_env=s3.env())
            try:
                with env_vars(stack.env):
                    result = stack.run({**TINY, "source": "s3://trimflow/sources/tiny-llm",
                                        "registered_model": "trimflow-s3"}, "s3")
                    assert result["state"] == "success", stack.log_text(result)[-4000:]
                    store = ArtifactStore("s3://trimflow/runs", scratch=tmp / "check", endpoint_url=s3.url)
                    from tasks.steps import safe_run_id

                    rid = safe_run_id(result["run_id"])
                    for step in ("ingest", "data", "baseline", "steps/00-distill", "steps/01-prune_mlp",
                                 "steps/02-export_onnx", "steps/03-quantize_dynamic_int8", "evaluate"):
                        assert store.exists(f"{rid}/{step}"), f"{step} not published to S3"
                    keys = [o["Key"] for o in client.list_objects_v2(Bucket="trimflow", Prefix="mlflow/")["Contents"]]
                    assert any(k.endswith("model.onnx") or k.endswith(".onnx") for k in keys), keys[:20]
                    versions = registry_versions(stack, "trimflow-s3")
                    assert versions and "champion" in versions[0]["aliases"]
                    assert generate_text(stack, "tiny_llm").strip()
            finally:
                stop_stack(stack, server, db)
    finally:
        s3.stop()


@pytest.mark.slow
def test_optimize_dag_serves_real_text_when_ci_profile_on_smollm2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    stack, server, db = start_stack(tmp)
    try:
        with env_vars(stack.env):
            result = stack.run({"profile": "ci", "registered_model": "trimflow-smollm2-ci"}, "real")
            assert result["state"] == "success", stack.log_text(result)[-6000:]
            versions = registry_versions(stack, "trimflow-smollm2-ci")
            assert versions[-1]["aliases"] and "champion" in versions[-1]["aliases"]
            text = generate_text(stack, "trimflow_llm")
            words = [w for w in text.split() if w.isalpha()]
            assert len(words) >= 2, f"expected real words from SmolLM2, got {text!r}"
    finally:
        stop_stack(stack, server, db)


def test_optimize_dag_serves_an_encoder_when_recipe_is_for_encoders(stack, tmp_path):
    from serving.semantic_cache import embed_texts
    from tests.tiny import make_tiny_encoder

    source = make_tiny_encoder(tmp_path / "tiny-bert", layers=4)
    recipe = tmp_path / "tiny-encoder.yaml"
    recipe.write_text("name: tiny-encoder\nkind: encoder\nsteps:\n"
                      "  - {technique: encoder_distill, student_layers: 2, steps: 2, batch_size: 4}\n"
                      "  - {technique: encoder_quantize_int8}\n")
    result = stack.run({"profile": "ci", "source": str(source), "recipe": str(recipe), "min_speedup": 0.0,
                        "min_quality_ratio": 0.0, "registered_model": "trimflow-tiny-encoder"}, "encoder")
    assert result["state"] == "success", stack.log_text(result)[-4000:]
    versions = registry_versions(stack, "trimflow-tiny-encoder")
    assert [v["version"] for v in versions] == [1] and "champion" in versions[0]["aliases"]
    assert versions[0]["tags"]["trimflow.recipe"] == "encoder_distill,export_encoder_onnx,encoder_quantize_int8"
    emb = embed_texts(stack.triton_grpc, "trimflow_encoder", ["The council met.", "Rain fell."])
    assert emb.shape[0] == 2 and abs(float((emb[0] ** 2).sum()) - 1.0) < 1e-3


def test_optimize_dag_serves_exits_with_the_early_exit_model_when_recipe_exits_early(stack, tiny_source, tmp_path):
    recipe = tmp_path / "tiny-early-exit.yaml"
    recipe.write_text("name: tiny-early-exit\nkind: causal_lm\nsteps:\n"
                      "  - {technique: early_exit, exit_layers: [1], fit_tokens: 64, calib_tokens: 64, seq_len: 32,"
                      " eval_windows: 0, speed_prompts: 0, target_agreement: 0.5}\n")
    result = stack.run({**TINY, "source": str(tiny_source), "recipe": str(recipe), "registered_model": "trimflow-tiny-ee",
                        "model_name": "tiny_ee"}, "early-exit")
    assert result["state"] == "success", stack.log_text(result)[-4000:]
    versions = registry_versions(stack, "trimflow-tiny-ee")
    assert [v["version"] for v in versions] == [1] and "champion" in versions[0]["aliases"]
    repo = Path(stack.settings().triton_repository)
    # The exits travel with the version and the early-exit model serves them; no streaming twin.
    assert (repo / "tiny_ee" / "1" / "trimflow_early_exit.json").is_file()
    assert (repo / "tiny_ee" / "1" / "early_exit.py").is_file() and not (repo / "tiny_ee_stream").exists()
    assert generate_text(stack, "tiny_ee").strip()
