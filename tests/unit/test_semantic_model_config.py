"""Encoder and semantic-gateway config specs: golden files parsed with Triton's own schema."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from serving.model_config import ModelConfigSpec, parse_pbtxt
from serving.semantic_cache import SemanticCacheConfig
from tasks.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden" / "encoder"


def _encoder_cpu() -> ModelConfigSpec:
    return ModelConfigSpec.encoder_embed("minilm_embed", embedding_dim=384, preferred_batch_size=(16, 32),
                                         intra_op_threads=2, max_length=128)


def _encoder_unbatched() -> ModelConfigSpec:
    return ModelConfigSpec.encoder_embed("minilm_embed_unbatched", max_batch_size=0, response_cache=False)


def _encoder_gpu() -> ModelConfigSpec:
    return ModelConfigSpec.encoder_onnxruntime_gpu("minilm_embed_gpu", embedding_dim=384, instances=2, gpus=(0,),
                                                   max_workspace_size_bytes=2 << 30, engine_cache_path="/cache/trt",
                                                   gpu_mem_limit_bytes=4 << 30)


def _gateway() -> ModelConfigSpec:
    cache = SemanticCacheConfig(redis_url="redis://redis.trimflow.svc:6379/0")
    return ModelConfigSpec.semantic_gateway("trimflow_gateway", encoder_model="minilm_embed",
                                            llm_model="trimflow_llm", cache_parameters=cache.to_parameters(),
                                            instances=2)


CASES = {"encoder_embed_cpu.pbtxt": _encoder_cpu, "encoder_embed_unbatched.pbtxt": _encoder_unbatched,
         "encoder_onnxruntime_gpu.pbtxt": _encoder_gpu, "semantic_gateway.pbtxt": _gateway}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_encoder_config_matches_golden_when_parsed_by_triton_schema(golden: str) -> None:
    generated = parse_pbtxt(CASES[golden]().to_pbtxt())
    expected = parse_pbtxt((GOLDEN / golden).read_text())
    assert generated == expected, f"{golden}:\n{generated}\n!=\n{expected}"


def test_encoder_config_golden_files_are_all_used_when_listed() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.pbtxt")) == sorted(CASES)


def test_encoder_config_differs_from_golden_when_precision_changes() -> None:
    # Guards the comparison above against being vacuous (e.g. accelerator parameters dropped on both sides).
    changed = ModelConfigSpec.encoder_onnxruntime_gpu("minilm_embed_gpu", embedding_dim=384, instances=2, gpus=(0,),
                                                      max_workspace_size_bytes=2 << 30,
                                                      engine_cache_path="/cache/trt", gpu_mem_limit_bytes=4 << 30,
                                                      precision_mode="FP32")
    golden = parse_pbtxt((GOLDEN / "encoder_onnxruntime_gpu.pbtxt").read_text())
    assert parse_pbtxt(changed.to_pbtxt()) != golden


def test_encoder_embed_has_no_batcher_when_max_batch_size_is_one() -> None:
    cfg = parse_pbtxt(ModelConfigSpec.encoder_embed("e", max_batch_size=1).to_pbtxt())
    assert cfg.max_batch_size == 1 and not cfg.HasField("dynamic_batching")


def test_semantic_gateway_parameters_read_back_when_rendered() -> None:
    cfg = parse_pbtxt(_gateway().to_pbtxt())
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert SemanticCacheConfig.from_parameters(params).redis_url == "redis://redis.trimflow.svc:6379/0"
    assert params["encoder_model"] == "minilm_embed" and cfg.model_transaction_policy.decoupled


@pytest.mark.parametrize("build, where", [
    (lambda: ModelConfigSpec.encoder_onnxruntime_gpu("e", precision_mode="BF16"), "encoder.precision_mode"),
    (lambda: ModelConfigSpec.encoder_onnxruntime_gpu("e", max_batch_size=8, opt_batch_size=16), "encoder.trt_profile"),
    (lambda: ModelConfigSpec.semantic_gateway("g", encoder_model="e", llm_model="l", response_cache=True),
     "model.response_cache"),
    (lambda: ModelConfigSpec.semantic_gateway("g", encoder_model="bad/name", llm_model="l"),
     "semantic_gateway.encoder_model"),
    (lambda: replace(_encoder_gpu(), instance_groups=()), "model.gpu_accelerators"),
])
def test_encoder_config_raises_config_error_when_combination_is_invalid(build, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        build()
    assert e.value.where == where
