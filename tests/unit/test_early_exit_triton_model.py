"""The llm_early_exit python-backend model over a real tiny early-exit export, with a stand-in for pb_utils.

The real stub only exists inside tritonserver; this checks the model's request handling, that
it serves the export's exits, and that the runtime it imports is the one copied beside it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.early_exit import EarlyExitConfig, early_exit
from tests.tiny import CORPUS, make_tiny_llm
from tests.unit.test_serving_llm_model import _fake_pb_utils, req

SERVING = Path(__file__).resolve().parents[2] / "serving"
MODEL_PY = SERVING / "triton_models" / "llm_early_exit" / "model.py"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    base = tmp_path_factory.mktemp("ee-triton")
    tiny = make_tiny_llm(base / "tiny", layers=3)
    out = base / "export"
    early_exit(EarlyExitConfig(exit_layers=(1,), fit_tokens=64, calib_tokens=64, seq_len=32, eval_windows=0,
                               speed_prompts=0, target_agreement=0.5), tiny, out, CORPUS * 6, CORPUS * 6)
    return out


@pytest.fixture()
def version_dir(export, tmp_path):
    """A version folder written by the repository writer: code, runtime modules, export files."""
    from serving.repository import stage_version

    d = tmp_path / "llm_early_exit" / "1"
    stage_version(export, d)
    return d


def test_repository_writer_refuses_an_early_exit_export_missing_a_segment(export, tmp_path):
    from serving.repository import stage_version
    from serving.runtime.early_exit import export_files
    from tasks.errors import DeployError

    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    segment = next(n for n in export_files(export) if n.startswith("segment"))
    (broken / segment).unlink()
    with pytest.raises(DeployError, match=f"missing {segment}"):
        stage_version(broken, tmp_path / "v1")


@pytest.fixture(autouse=True)
def _isolated_imports(monkeypatch):
    """model.py puts its folder on sys.path and imports the runtime copies beside it: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = {n: sys.modules.pop(n) for n in ("early_exit", "generator") if n in sys.modules}
    yield
    for n in ("early_exit", "generator"):
        sys.modules.pop(n, None)
    sys.modules.update(before)


def _load_model(monkeypatch, path: Path, name: str):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def _initialize(mod, version_dir: Path, **params: str):
    m = mod.TritonPythonModel()
    cfg = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    m.initialize({"model_config": json.dumps(cfg), "model_repository": str(version_dir.parent),
                  "model_version": version_dir.name, "model_name": "llm_early_exit"})
    return m


def test_early_exit_model_serves_text_with_the_exits_when_loaded_from_a_version_folder(version_dir, monkeypatch):
    mod = _load_model(monkeypatch, version_dir / "model.py", "llm_early_exit_under_test")
    m = _initialize(mod, version_dir, exit_threshold="0.0", intra_op_threads="1")

    assert Path(sys.modules["early_exit"].__file__).parent == version_dir  # the copy, not the source tree
    assert sorted(p.name for p in version_dir.glob("*.py")) == ["early_exit.py", "generate_model.py", "generator.py", "model.py"]
    out = m.execute([req("The city council", max_tokens=3), req("Shares rose", "Heavy rain", max_tokens=2)])
    assert [r.error for r in out] == [None, None]
    assert len(out[0].text()) == 1 and len(out[1].text()) == 2
    assert m.lm.threshold == 0.0 and m.lm.stats()["exit_counts"]["1"] == m.lm.stats()["tokens"] > 0


def test_early_exit_model_answers_like_full_generation_when_exits_are_off(version_dir, monkeypatch):
    from serving.runtime.early_exit import EarlyExitLM

    mod = _load_model(monkeypatch, MODEL_PY, "llm_early_exit_source_tree")
    m = _initialize(mod, version_dir, exit_threshold="1.0")
    assert "early_exit" not in sys.modules  # the source tree's model.py falls back to serving.runtime
    text = m.execute([req("The president said", max_tokens=4)])[0].text()[0]

    full = EarlyExitLM(version_dir, threshold=1.0)
    assert text == full.generate_text(["The president said"], max_new_tokens=4)[0]
    assert set(m.lm.stats()["exit_counts"].values()) == {0, m.lm.stats()["tokens"]}


def test_early_exit_model_fails_only_the_bad_request_when_batched_with_good_ones(version_dir, monkeypatch):
    mod = _load_model(monkeypatch, MODEL_PY, "llm_early_exit_errors")
    m = _initialize(mod, version_dir)
    out = m.execute([req("fine prompt", max_tokens=2), req(""), req("also fine", max_tokens=100000)])
    assert out[0].error is None and len(out[0].text()) == 1
    assert out[1].error.code == "INVALID_ARG" and "empty prompt" in out[1].error.message
    assert out[2].error.code == "INVALID_ARG" and "max_tokens=100000" in out[2].error.message
    assert np.isfinite(m.lm.threshold)
