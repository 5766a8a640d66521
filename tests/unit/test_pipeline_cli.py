"""The whole pipeline without Airflow (tasks.cli), on a tiny model, registering into a file-backed MLflow."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_run_publishes_every_step_and_reuses_them_when_rerun_with_same_run_id(env, tmp_path):
    from tasks import cli
    from tasks.settings import Settings
    from tasks.steps import store_from_settings
    from tests.tiny import make_tiny_llm

    src = make_tiny_llm(tmp_path / "tiny", layers=4)
    params = {"profile": "ci", "source": str(src), "student_layers": 2, "distill_steps": 2, "min_speedup": 0.0,
              "max_ppl_ratio": 1e6, "deploy_target": "none", "registered_model": "tiny-cli"}
    first = cli.run_pipeline(params, "cli-1")
    report = json.loads((Settings.from_env().reports_dir / "cli-1" / "report.json").read_text())
    assert report["registered_model"]["version"] == 1 and report["triton"]["target"] == "none"
    assert set(report["steps"]) == {"ingest", "data", "baseline", "00-distill", "01-prune_mlp", "02-export_onnx",
                                    "03-quantize_dynamic_int8", "evaluate"}
    assert report["steps"]["01-prune_mlp"]["params_after"] < report["steps"]["01-prune_mlp"]["params_before"]
    store = store_from_settings()
    assert store.exists("cli-1/steps/03-quantize_dynamic_int8")

    again = cli.run_pipeline(params, "cli-1")  # a retried run: finished steps are reused, not redone
    assert again["registered_model"]["version"] == first["registered_model"]["version"] == 1
    result = json.loads((store.fetch("cli-1/steps/00-distill") / "_step_result.json").read_text())
    assert result["config_digest"]


def test_cli_exits_2_with_the_field_named_when_params_are_bad(env, capsys):
    from tasks import cli

    assert cli.main(["config", "--param", "prune_ratio=2"]) == 2
    assert "prune.mlp_ratio" in capsys.readouterr().err
