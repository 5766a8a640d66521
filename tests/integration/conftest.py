"""Shared fixtures of the integration tests: real servers on 127.0.0.1, stopped after use.

Each group of fixtures is self-contained; add yours in a section of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

# -- Triton ---------------------------------------------------------------------------------------
# One tritonserver per test session (startup ~1 s, a model load ~2 s), serving a tiny random
# Llama exported with tasks.export. Tests that need their own model name write it into
# `triton_server.config.model_repository`; tests that need a server of their own start one.


@pytest.fixture(scope="session")
def tiny_llm_export(tmp_path_factory) -> Path:
    """A tiny random Llama exported to ONNX with KV cache (model.onnx + tokenizer + trimflow_model.json)."""
    from tasks.config import ExportConfig
    from tasks.export import export_causal_lm
    from tests.tiny import make_tiny_llm

    root = tmp_path_factory.mktemp("tiny-llm")
    hf = make_tiny_llm(root / "hf", layers=2)
    export_causal_lm(hf, root / "export", ExportConfig())
    return root / "export"


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    """A running LocalTriton (explicit model control, response cache on) on free loopback ports."""
    from serving.server import LocalTriton, TritonConfig, _group_alive

    settings_python = _serving_python()
    root = tmp_path_factory.mktemp("triton")
    (root / "models").mkdir()
    server = LocalTriton(TritonConfig.on_free_ports(root / "models", root / "state", serving_python=settings_python))
    server.start()
    pid = server.pid
    yield server
    server.stop()
    assert pid is not None and not _group_alive(pid), f"tritonserver group {pid} left processes behind"


@dataclass(frozen=True)
class ServedModel:
    server: object  # serving.server.LocalTriton
    name: str
    version: int


@pytest.fixture(scope="session")
def triton_llm(triton_server, tiny_llm_export) -> ServedModel:
    """Model ``tinyllm`` v1 loaded: dynamic batching (20 ms queue delay, batches up to 16), response cache."""
    from serving.model_config import ModelConfigSpec, VersionPolicy
    from serving.repository import ModelRepository

    name = "tinyllm"
    repo = ModelRepository(triton_server.config.model_repository)
    repo.write_version(name, 1, tiny_llm_export)
    spec = ModelConfigSpec.llm_generate(name, max_batch_size=16, max_queue_delay_microseconds=20000,
                                        version_policy=VersionPolicy.specific(1))
    repo.write_config(name, spec.to_pbtxt())
    triton_server.load(name)
    return ServedModel(triton_server, name, 1)


def _serving_python() -> Path:
    from tasks.settings import Settings

    p = Settings.from_env().serving_python
    if not p.exists():
        pytest.fail(f"no serving environment at {p}: run `make setup`")
    return p


# -- optimize DAG ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("src") / "tiny-llm", layers=4)


# -- encoder and semantic cache -------------------------------------------------------------------
# A tiny random BERT exported with tasks.encoder, served as `tinyenc` (encoder_embed: dynamic
# batching up to 16 with a 20 ms queue delay, response cache) on the shared triton_server.
@pytest.fixture(scope="session")
def tiny_encoder_export(tmp_path_factory) -> dict:
    """``{"hf": <tiny BERT folder>, "export": <its ONNX export>}``."""
    from tasks.encoder import EncoderExportConfig, export_encoder
    from tests.tiny import make_tiny_encoder

    root = tmp_path_factory.mktemp("tiny-encoder")
    hf = make_tiny_encoder(root / "hf", layers=2)
    export_encoder(hf, root / "export", EncoderExportConfig())
    return {"hf": hf, "export": root / "export"}


@pytest.fixture(scope="session")
def triton_encoder(triton_server, tiny_encoder_export) -> ServedModel:
    from serving.model_config import ModelConfigSpec, VersionPolicy
    from serving.repository import ModelRepository
    from serving.semantic_cache import write_encoder_version

    name = "tinyenc"
    repo = ModelRepository(triton_server.config.model_repository)
    write_encoder_version(repo, name, 1, tiny_encoder_export["export"])
    spec = ModelConfigSpec.encoder_embed(name, max_batch_size=16, max_queue_delay_microseconds=20000,
                                         version_policy=VersionPolicy.specific(1))
    repo.write_config(name, spec.to_pbtxt())
    triton_server.load(name)
    return ServedModel(triton_server, name, 1)
