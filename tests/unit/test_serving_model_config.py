"""The config.pbtxt spec: golden files parsed with Triton's own schema, and the checks it makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.model_config import (Accelerator, DynamicBatching, InstanceGroup, ModelConfigSpec, TensorSpec,
                                  VersionPolicy, parse_pbtxt, served_versions, set_version_policy)
from tasks.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"


def _llm_cpu() -> ModelConfigSpec:
    return ModelConfigSpec.llm_generate("trimflow_llm", max_batch_size=8, max_queue_delay_microseconds=2000,
                                        preferred_batch_size=(4, 8), instances=2, default_max_tokens=24,
                                        version_policy=VersionPolicy.specific(4, 3))


def _ort_gpu() -> ModelConfigSpec:
    return ModelConfigSpec(
        name="trimflow_decoder", backend="onnxruntime", max_batch_size=16,
        inputs=(TensorSpec("input_ids", "INT64", (-1,)),), outputs=(TensorSpec("logits", "TYPE_FP32", (-1, -1)),),
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=100),
        instance_groups=(InstanceGroup(1, "KIND_GPU", (0, 1)),), version_policy=VersionPolicy.latest(2),
        gpu_accelerators=(Accelerator("tensorrt", {"precision_mode": "FP16",
                                                   "max_workspace_size_bytes": "1073741824"}),),
        default_model_filename="model.int8.onnx")


def _unbatched() -> ModelConfigSpec:
    return ModelConfigSpec(name="echo", backend="python", max_batch_size=0,
                           inputs=(TensorSpec("INPUT0", "TYPE_FP32", (4,)),),
                           outputs=(TensorSpec("OUTPUT0", "TYPE_FP32", (4,)),), version_policy=VersionPolicy.all())


CASES = {"llm_generate_cpu.pbtxt": _llm_cpu, "onnxruntime_gpu_tensorrt.pbtxt": _ort_gpu,
         "unbatched_all_versions.pbtxt": _unbatched}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_model_config_matches_golden_when_parsed_by_triton_schema(golden: str) -> None:
    generated = parse_pbtxt(CASES[golden]().to_pbtxt())
    expected = parse_pbtxt((GOLDEN / golden).read_text())
    assert generated == expected, f"{golden}:\n{generated}\n!=\n{expected}"


def test_model_config_golden_files_are_all_used_when_listed() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.pbtxt")) == sorted(CASES)


def test_model_config_differs_from_golden_when_one_field_changes() -> None:
    # Guards the comparison above against being vacuous (e.g. both sides parsing to empty).
    changed = _llm_cpu().with_version_policy(VersionPolicy.specific(3))
    assert parse_pbtxt(changed.to_pbtxt()) != parse_pbtxt((GOLDEN / "llm_generate_cpu.pbtxt").read_text())


def test_model_config_rendering_is_deterministic_when_parameters_inserted_in_other_order() -> None:
    a = ModelConfigSpec.llm_generate("m")
    b = ModelConfigSpec(**{**a.__dict__, "parameters": dict(reversed(list(a.parameters.items())))})
    assert a.to_pbtxt() == b.to_pbtxt()


def test_model_config_escapes_strings_when_values_have_quotes() -> None:
    spec = ModelConfigSpec.llm_generate("m")
    spec = ModelConfigSpec(**{**spec.__dict__, "parameters": {"note": 'say "hi"\\ there\n'}})
    cfg = parse_pbtxt(spec.to_pbtxt())
    assert cfg.parameters["note"].string_value == 'say "hi"\\ there\n'


def test_set_version_policy_changes_only_policy_when_rolling_back() -> None:
    text = (GOLDEN / "llm_generate_cpu.pbtxt").read_text()
    rolled = set_version_policy(text, VersionPolicy.specific(3))
    assert served_versions(rolled) == [3]
    before, after = parse_pbtxt(text), parse_pbtxt(rolled)
    before.ClearField("version_policy"), after.ClearField("version_policy")
    assert before == after


def test_served_versions_is_none_when_policy_is_latest() -> None:
    assert served_versions(_ort_gpu().to_pbtxt()) is None


@pytest.mark.parametrize("build, where", [
    (lambda: ModelConfigSpec(**{**_llm_cpu().__dict__, "max_batch_size": 0}), "model.dynamic_batching"),
    (lambda: ModelConfigSpec.llm_generate("m", max_batch_size=4, preferred_batch_size=(8,)),
     "dynamic_batching.preferred_batch_size"),
    (lambda: ModelConfigSpec(**{**_llm_cpu().__dict__, "decoupled": True}), "model.response_cache"),
    (lambda: ModelConfigSpec(**{**_ort_gpu().__dict__, "instance_groups": (InstanceGroup(),)}),
     "model.gpu_accelerators"),
    (lambda: ModelConfigSpec(**{**_ort_gpu().__dict__, "backend": "python"}), "model.execution_accelerators"),
    (lambda: ModelConfigSpec.llm_generate("bad/name"), "model.name"),
    (lambda: TensorSpec("x", "TYPE_INT33", (1,)), "tensor x.dtype"),
    (lambda: TensorSpec("x", "INT32", (0,)), "tensor x.dims"),
    (lambda: VersionPolicy.specific(), "version_policy.specific"),
    (lambda: InstanceGroup(1, "KIND_CPU", (0,)), "instance_group.gpus"),
])
def test_model_config_raises_config_error_when_combination_is_invalid(build, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        build()
    assert e.value.where == where


def test_model_config_rejects_optional_output_when_declared() -> None:
    with pytest.raises(ConfigError, match="outputs cannot be optional"):
        ModelConfigSpec(name="m", backend="python", inputs=(TensorSpec("a", "FP32", (1,)),),
                        outputs=(TensorSpec("b", "FP32", (1,), optional=True),))
