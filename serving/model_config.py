"""A typed spec of a Triton model configuration, rendered to ``config.pbtxt``.

The spec is the one place a model's serving shape is decided (batching, cache, instances,
versions); ``to_pbtxt()`` renders it and ``parse_pbtxt()`` reads it back with Triton's own
protobuf schema, which the golden-file tests use to prove the text means what the spec says:

    spec = ModelConfigSpec.llm_generate("tinyllm", max_batch_size=8)
    text = spec.with_version_policy(VersionPolicy.specific(1, 2)).to_pbtxt()
    write_text(repo / "tinyllm" / "config.pbtxt", text)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping

from tasks.errors import ConfigError

DTYPES = frozenset({
    "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16",
    "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16",
})
InstanceKind = Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"]
Backend = Literal["python", "onnxruntime"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _quote(s: str) -> str:
    """A protobuf text-format string literal (UTF-8 passes through; quotes and control chars escaped)."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{out}"'


def _check_name(where: str, name: str) -> None:
    # Model names become folder names in the repository and path segments of the HTTP API.
    if not _NAME.match(name or ""):
        raise ConfigError(where, name, "must be non-empty and use only letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor.

    Args:
        name: tensor name as the model code reads it.
        dtype: Triton data type, e.g. ``TYPE_STRING``, ``TYPE_INT32`` (``TYPE_`` may be omitted).
        dims: shape without the batch dimension; ``-1`` marks a variable dimension.
        optional: inputs only; a request may leave the tensor out (default False).
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False

    def __post_init__(self) -> None:
        dtype = self.dtype if self.dtype.startswith("TYPE_") else f"TYPE_{self.dtype}"
        object.__setattr__(self, "dtype", dtype.upper())
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        _check_name("tensor.name", self.name)
        if self.dtype not in DTYPES:
            raise ConfigError(f"tensor {self.name}.dtype", self.dtype, f"must be one of {sorted(DTYPES)}")
        if not self.dims or any(d == 0 or d < -1 for d in self.dims):
            raise ConfigError(f"tensor {self.name}.dims", self.dims, "must be non-empty, each > 0 or -1")


@dataclass(frozen=True)
class DynamicBatching:
    """Server-side batching of concurrent requests into one ``execute`` call.

    Args:
        preferred_batch_size: batch sizes the scheduler tries to form first (default none: it
            forms the largest batch available).
        max_queue_delay_microseconds: how long a request may wait for others to join its batch
            (default 0: batch only what is already queued).
    """

    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_size", tuple(int(b) for b in self.preferred_batch_size))
        if any(b < 1 for b in self.preferred_batch_size):
            raise ConfigError("dynamic_batching.preferred_batch_size", self.preferred_batch_size, "must be >= 1")
        if self.max_queue_delay_microseconds < 0:
            raise ConfigError("dynamic_batching.max_queue_delay_microseconds", self.max_queue_delay_microseconds,
                              "must be >= 0")


@dataclass(frozen=True)
class InstanceGroup:
    """Copies of the model Triton runs side by side.

    Args:
        count: instances (default 1).
        kind: ``KIND_CPU``, ``KIND_GPU`` or ``KIND_AUTO`` (default KIND_CPU).
        gpus: GPU ids for ``KIND_GPU`` (default none: every visible GPU).
    """

    count: int = 1
    kind: InstanceKind = "KIND_CPU"
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(int(g) for g in self.gpus))
        if self.count < 1:
            raise ConfigError("instance_group.count", self.count, "must be >= 1")
        if self.kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
            raise ConfigError("instance_group.kind", self.kind, "must be KIND_CPU, KIND_GPU or KIND_AUTO")
        if self.gpus and self.kind != "KIND_GPU":
            raise ConfigError("instance_group.gpus", self.gpus, "only KIND_GPU instances take gpu ids")


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk Triton serves; build with ``latest``, ``specific`` or ``all``."""

    kind: Literal["latest", "specific", "all"]
    versions: tuple[int, ...] = ()
    num_versions: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", tuple(sorted({int(v) for v in self.versions})))
        if self.kind == "specific" and (not self.versions or min(self.versions) < 1):
            raise ConfigError("version_policy.specific", self.versions, "needs at least one version, each >= 1")
        if self.kind == "latest" and self.num_versions < 1:
            raise ConfigError("version_policy.latest", self.num_versions, "must be >= 1")

    @classmethod
    def latest(cls, n: int = 1) -> "VersionPolicy":
        return cls("latest", num_versions=n)

    @classmethod
    def specific(cls, *versions: int) -> "VersionPolicy":
        return cls("specific", versions=tuple(versions))

    @classmethod
    def all(cls) -> "VersionPolicy":
        return cls("all")

    def pbtxt(self) -> str:
        if self.kind == "latest":
            return f"version_policy: {{ latest: {{ num_versions: {self.num_versions} }} }}"
        if self.kind == "specific":
            return f"version_policy: {{ specific: {{ versions: [ {', '.join(map(str, self.versions))} ] }} }}"
        return "version_policy: { all: {} }"


@dataclass(frozen=True)
class Accelerator:
    """An execution accelerator of the onnxruntime backend (e.g. ``tensorrt`` with ``precision_mode``)."""

    name: str
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfigSpec:
    """Everything ``config.pbtxt`` says about one model.

    Args:
        name: model name, also its folder in the repository.
        backend: ``python`` (the local server has only this one) or ``onnxruntime`` (GPU pools).
        max_batch_size: largest batch the model accepts; 0 disables batching and the batch
            dimension (default 8).
        inputs / outputs: tensors, without the batch dimension.
        dynamic_batching: batch concurrent requests (default None: each request runs alone).
        response_cache: answer repeated identical requests from Triton's cache (default False).
        instance_groups: model instances (default one KIND_CPU instance).
        version_policy: versions served (default None: Triton's default, the latest one).
        parameters: string key/values the model code reads (python backend: ``args["model_config"]``).
        gpu_accelerators / cpu_accelerators: onnxruntime execution accelerators.
        default_model_filename: file in the version folder the onnxruntime backend loads
            (default None: Triton's ``model.onnx``).
        decoupled: the model may send 0..n responses per request (streaming); decoupled models
            are not response-cached (default False).
    """

    name: str
    backend: Backend
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 8
    dynamic_batching: DynamicBatching | None = None
    response_cache: bool = False
    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    version_policy: VersionPolicy | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    gpu_accelerators: tuple[Accelerator, ...] = ()
    cpu_accelerators: tuple[Accelerator, ...] = ()
    default_model_filename: str | None = None
    decoupled: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "instance_groups", tuple(self.instance_groups))
        object.__setattr__(self, "parameters", {str(k): str(v) for k, v in dict(self.parameters).items()})
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` for combinations Triton would reject or silently ignore."""
        _check_name("model.name", self.name)
        if self.backend not in ("python", "onnxruntime"):
            raise ConfigError("model.backend", self.backend, "must be 'python' or 'onnxruntime'")
        if self.max_batch_size < 0:
            raise ConfigError("model.max_batch_size", self.max_batch_size, "must be >= 0")
        if not self.inputs or not self.outputs:
            raise ConfigError("model.inputs/outputs", (len(self.inputs), len(self.outputs)), "need at least one each")
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ConfigError("model.inputs/outputs", names, "tensor names must be unique")
        if any(t.optional for t in self.outputs):
            raise ConfigError("model.outputs", [t.name for t in self.outputs if t.optional],
                              "outputs cannot be optional")
        if self.dynamic_batching is not None:
            if self.max_batch_size == 0:
                raise ConfigError("model.dynamic_batching", self.dynamic_batching, "needs max_batch_size > 0")
            too_big = [b for b in self.dynamic_batching.preferred_batch_size if b > self.max_batch_size]
            if too_big:
                raise ConfigError("dynamic_batching.preferred_batch_size", too_big,
                                  f"must not exceed max_batch_size {self.max_batch_size}")
        if self.response_cache and self.decoupled:
            raise ConfigError("model.response_cache", True, "Triton does not cache responses of decoupled models")
        if (self.gpu_accelerators or self.cpu_accelerators) and self.backend != "onnxruntime":
            raise ConfigError("model.execution_accelerators", self.backend, "only the onnxruntime backend uses them")
        if self.gpu_accelerators and not any(g.kind in ("KIND_GPU", "KIND_AUTO") for g in self.instance_groups):
            raise ConfigError("model.gpu_accelerators", [a.name for a in self.gpu_accelerators],
                              "need a KIND_GPU instance group")
        if self.default_model_filename is not None and "/" in self.default_model_filename:
            raise ConfigError("model.default_model_filename", self.default_model_filename, "must be a file name")

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def llm_generate(cls, name: str, *, max_batch_size: int = 8, max_queue_delay_microseconds: int = 5000,
                     preferred_batch_size: tuple[int, ...] = (), instances: int = 1, response_cache: bool = True,
                     intra_op_threads: int = 1, default_max_tokens: int = 16, max_tokens_limit: int = 256,
                     version_policy: VersionPolicy | None = None) -> "ModelConfigSpec":
        """The text-generation model served by ``serving/triton_models/llm_generate`` (python backend).

        Args:
            name: Triton model name.
            max_batch_size: rows per ``execute`` (default 8).
            max_queue_delay_microseconds: wait for requests to join a batch (default 5000).
            preferred_batch_size: batch sizes to aim for (default none).
            instances: CPU instances, each a python stub process with its own ONNX session (default 1).
            response_cache: cache identical requests (default True).
            intra_op_threads: onnxruntime threads per instance (default 1: two cores are shared).
            default_max_tokens: new tokens when a request does not say (default 16).
            max_tokens_limit: largest ``max_tokens`` a request may ask for (default 256).
            version_policy: versions served (default None: the latest).
        """
        return cls(
            name=name,
            backend="python",
            max_batch_size=max_batch_size,
            inputs=(TensorSpec("text_input", "TYPE_STRING", (1,)),
                    TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=True),
                    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True)),
            outputs=(TensorSpec("text_output", "TYPE_STRING", (1,)),),
            dynamic_batching=(DynamicBatching(tuple(preferred_batch_size), max_queue_delay_microseconds)
                              if max_batch_size > 0 else None),
            response_cache=response_cache,
            instance_groups=(InstanceGroup(count=instances, kind="KIND_CPU"),),
            version_policy=version_policy,
            parameters={"intra_op_threads": str(intra_op_threads), "default_max_tokens": str(default_max_tokens),
                        "max_tokens_limit": str(max_tokens_limit)},
        )

    @classmethod
    def llm_continuous(cls, name: str, *, max_batch: int = 8, max_prefill_tokens: int = 256, max_waiting: int = 256,
                       intra_op_threads: int = 1, default_max_tokens: int = 16, max_tokens_limit: int = 512,
                       prefix_cache_bytes: int = 256 << 20, prefix_block_tokens: int = 16,
                       version_policy: VersionPolicy | None = None) -> "ModelConfigSpec":
        """The streaming model of ``serving/triton_models/llm_continuous`` (decoupled, continuous batching).

        Batching happens inside the model at every decode step, so Triton's dynamic batcher is
        off and each request carries one prompt (``max_batch_size: 1``).

        Args:
            name: Triton model name.
            max_batch: rows decoding together; more requests wait for a free row (default 8).
            max_prefill_tokens: prompt tokens prefilled per step; longer prompts are chunked (default 256).
            max_waiting: requests allowed to wait for a row before new ones are refused (default 256).
            intra_op_threads: onnxruntime threads (default 1: two cores are shared).
            default_max_tokens: new tokens when a request does not say (default 16).
            max_tokens_limit: largest ``max_tokens`` a request may ask for (default 512).
            prefix_cache_bytes: KV bytes kept for shared prompt prefixes; 0 turns the cache off
                (default 256 MiB).
            prefix_block_tokens: prefix granularity of the cache, in tokens (default 16).
            version_policy: versions served (default None: the latest).
        """
        for where, value, low in (("max_batch", max_batch, 1), ("max_prefill_tokens", max_prefill_tokens, 1),
                                  ("max_waiting", max_waiting, 1), ("intra_op_threads", intra_op_threads, 0),
                                  ("default_max_tokens", default_max_tokens, 1),
                                  ("max_tokens_limit", max_tokens_limit, default_max_tokens),
                                  ("prefix_cache_bytes", prefix_cache_bytes, 0),
                                  ("prefix_block_tokens", prefix_block_tokens, 1)):
            if int(value) < low:
                raise ConfigError(f"llm_continuous.{where}", value, f"must be >= {low}")
        return cls(
            name=name,
            backend="python",
            max_batch_size=1,
            inputs=(TensorSpec("text_input", "TYPE_STRING", (1,)),
                    TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=True),
                    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
                    TensorSpec("top_p", "TYPE_FP32", (1,), optional=True),
                    TensorSpec("seed", "TYPE_INT64", (1,), optional=True),
                    TensorSpec("ignore_eos", "TYPE_BOOL", (1,), optional=True),
                    TensorSpec("stop", "TYPE_STRING", (-1,), optional=True)),
            outputs=(TensorSpec("text_output", "TYPE_STRING", (1,)),
                     TensorSpec("finish_reason", "TYPE_STRING", (1,))),
            instance_groups=(InstanceGroup(count=1, kind="KIND_CPU"),),
            version_policy=version_policy,
            decoupled=True,
            parameters={"intra_op_threads": str(intra_op_threads), "max_batch": str(max_batch),
                        "max_prefill_tokens": str(max_prefill_tokens), "max_waiting": str(max_waiting),
                        "default_max_tokens": str(default_max_tokens), "max_tokens_limit": str(max_tokens_limit),
                        "prefix_cache_bytes": str(prefix_cache_bytes),
                        "prefix_block_tokens": str(prefix_block_tokens)},
        )

    @classmethod
    def encoder_embed(cls, name: str, *, embedding_dim: int = -1, max_batch_size: int = 32,
                      dynamic_batching: bool = True, max_queue_delay_microseconds: int = 2000,
                      preferred_batch_size: tuple[int, ...] = (), instances: int = 1, response_cache: bool = True,
                      intra_op_threads: int = 1, max_length: int | None = None,
                      version_policy: VersionPolicy | None = None) -> "ModelConfigSpec":
        """Sentence embeddings served by ``serving/triton_models/encoder_embed`` (python backend, onnxruntime).

        The local/CPU form: text in, tokenised inside the model, every text of a dynamic batch
        padded to the batch's longest and run through one onnxruntime call.

        Args:
            name: Triton model name.
            embedding_dim: size H of the output vector (default -1: left open).
            max_batch_size: texts per ``execute``; 0 removes the batch dimension and batching
                (default 32).
            dynamic_batching: let Triton merge concurrent requests (default True; off with
                ``max_batch_size`` <= 1).
            max_queue_delay_microseconds: wait for requests to join a batch (default 2000).
            preferred_batch_size: batch sizes to aim for (default none).
            instances: CPU instances, each a python stub process with its own session (default 1).
            response_cache: answer repeated texts from Triton's cache (default True).
            intra_op_threads: onnxruntime threads per instance (default 1: two cores are shared).
            max_length: tokens kept per text (default None: the export's metadata, else 256).
            version_policy: versions served (default None: the latest).
        """
        params = {"intra_op_threads": str(intra_op_threads)}
        if max_length is not None:
            params["max_length"] = str(int(max_length))
        return cls(
            name=name,
            backend="python",
            max_batch_size=max_batch_size,
            inputs=(TensorSpec("text", "TYPE_STRING", (1,)),),
            outputs=(TensorSpec("embedding", "TYPE_FP32", (embedding_dim,)),),
            dynamic_batching=(DynamicBatching(tuple(preferred_batch_size), max_queue_delay_microseconds)
                              if dynamic_batching and max_batch_size > 1 else None),
            response_cache=response_cache,
            instance_groups=(InstanceGroup(count=instances, kind="KIND_CPU"),),
            version_policy=version_policy,
            parameters=params,
        )

    @classmethod
    def encoder_onnxruntime_gpu(cls, name: str, *, embedding_dim: int = -1, max_batch_size: int = 64,
                                max_queue_delay_microseconds: int = 500, preferred_batch_size: tuple[int, ...] = (),
                                instances: int = 1, gpus: tuple[int, ...] = (), precision_mode: str = "FP16",
                                max_workspace_size_bytes: int = 1 << 30, max_length: int = 256,
                                opt_batch_size: int = 16, opt_length: int = 64,
                                engine_cache_path: str = "/tmp/trimflow-trt-cache", response_cache: bool = True,
                                gpu_mem_limit_bytes: int | None = None, default_model_filename: str | None = None,
                                version_policy: VersionPolicy | None = None) -> "ModelConfigSpec":
        """The encoder export on a GPU pool: the ``onnxruntime`` backend with TensorRT, CUDA as fallback.

        Production only (the local wheel has no onnxruntime backend). Token ids come in, so a
        tokenising front end (client or python model) must pad requests to shared lengths: Triton's
        dynamic batcher merges only requests of equal shape.

        Args:
            name: Triton model name.
            embedding_dim: size H of ``sentence_embedding`` (default -1: left open).
            max_batch_size: rows per execution (default 64).
            max_queue_delay_microseconds: wait for requests to join a batch (default 500: a GPU
                batch of 64 short texts costs about what one does).
            preferred_batch_size: batch sizes to aim for (default none).
            instances: instances per GPU (default 1).
            gpus: GPU ids (default none: every visible GPU).
            precision_mode: TensorRT precision, ``FP32``/``FP16``/``INT8`` (default FP16).
            max_workspace_size_bytes: TensorRT builder workspace (default 1 GiB).
            max_length / opt_length: longest and typical tokens per text; with ``max_batch_size``
                and ``opt_batch_size`` they form the TensorRT shape profile, so engines are built
                once for the whole range instead of per new shape (defaults 256 / 64; batch 16).
            engine_cache_path: where TensorRT engines are cached across restarts (default
                ``/tmp/trimflow-trt-cache``; mount a volume there in production).
            response_cache: answer repeated requests from Triton's cache (default True).
            gpu_mem_limit_bytes: CUDA EP arena limit (default None: no limit).
            default_model_filename: ONNX file to load (default None: ``model.onnx``).
            version_policy: versions served (default None: the latest).
        """
        if precision_mode not in ("FP32", "FP16", "INT8"):
            raise ConfigError("encoder.precision_mode", precision_mode, "must be FP32, FP16 or INT8")
        if not (1 <= opt_batch_size <= max_batch_size and 1 <= opt_length <= max_length):
            raise ConfigError("encoder.trt_profile", (opt_batch_size, opt_length, max_batch_size, max_length),
                              "need 1 <= opt_batch_size <= max_batch_size and 1 <= opt_length <= max_length")
        names = ("input_ids", "attention_mask", "token_type_ids")

        def shapes(b: int, s: int) -> str:
            return ",".join(f"{n}:{b}x{s}" for n in names)

        tensorrt = Accelerator("tensorrt", {
            "precision_mode": precision_mode, "max_workspace_size_bytes": str(max_workspace_size_bytes),
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": engine_cache_path,
            "trt_profile_min_shapes": shapes(1, 1), "trt_profile_opt_shapes": shapes(opt_batch_size, opt_length),
            "trt_profile_max_shapes": shapes(max_batch_size, max_length)})
        # CUDA runs the nodes TensorRT does not take; with variable sequence lengths an arena that
        # grows by what is asked wastes less memory than power-of-two growth.
        cuda_params = {"arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1"}
        if gpu_mem_limit_bytes is not None:
            cuda_params["gpu_mem_limit"] = str(int(gpu_mem_limit_bytes))
        return cls(
            name=name,
            backend="onnxruntime",
            max_batch_size=max_batch_size,
            inputs=tuple(TensorSpec(n, "TYPE_INT64", (-1,)) for n in names),
            outputs=(TensorSpec("sentence_embedding", "TYPE_FP32", (embedding_dim,)),),
            dynamic_batching=DynamicBatching(tuple(preferred_batch_size), max_queue_delay_microseconds),
            response_cache=response_cache,
            instance_groups=(InstanceGroup(count=instances, kind="KIND_GPU", gpus=tuple(gpus)),),
            version_policy=version_policy,
            gpu_accelerators=(tensorrt, Accelerator("cuda", cuda_params)),
            default_model_filename=default_model_filename,
        )

    @classmethod
    def semantic_gateway(cls, name: str, *, encoder_model: str, llm_model: str,
                         cache_parameters: Mapping[str, str] | None = None, max_batch_size: int = 8,
                         max_queue_delay_microseconds: int = 1000, instances: int = 1, decoupled: bool = True,
                         response_cache: bool = False,
                         version_policy: VersionPolicy | None = None) -> "ModelConfigSpec":
        """The semantic-cache gateway in front of a generation model (``serving/triton_models/semantic_gateway``).

        Same inputs as ``llm_generate`` plus a ``cache_status`` output (hit, miss, guarded, bypass,
        error). It calls ``encoder_model`` and, on a miss, ``llm_model`` through BLS.

        Args:
            name: Triton model name.
            encoder_model / llm_model: the Triton models it calls.
            cache_parameters: ``SemanticCacheConfig(...).to_parameters()`` (default None: the
                config's defaults, embedded store).
            max_batch_size: requests per ``execute`` (default 8).
            max_queue_delay_microseconds: wait for requests to join a batch (default 1000).
            instances: gateway instances; with the embedded store each has its own entries
                (default 1).
            decoupled: answer through the response sender, so a hit is sent while other requests
                of the instance still wait for the LLM; clients then use gRPC streaming (default
                True). Non-decoupled: plain infer calls, but a hit waits for the misses it was
                batched or queued with.
            response_cache: Triton's exact-match cache in front of the gateway; non-decoupled
                only (default False).
            version_policy: versions served (default None: the latest).
        """
        params = {"encoder_model": encoder_model, "llm_model": llm_model, **dict(cache_parameters or {})}
        _check_name("semantic_gateway.encoder_model", encoder_model)
        _check_name("semantic_gateway.llm_model", llm_model)
        return cls(
            name=name,
            backend="python",
            max_batch_size=max_batch_size,
            inputs=(TensorSpec("text_input", "TYPE_STRING", (1,)),
                    TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=True),
                    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True)),
            outputs=(TensorSpec("text_output", "TYPE_STRING", (1,)), TensorSpec("cache_status", "TYPE_STRING", (1,))),
            dynamic_batching=DynamicBatching((), max_queue_delay_microseconds) if max_batch_size > 0 else None,
            response_cache=response_cache,
            instance_groups=(InstanceGroup(count=instances, kind="KIND_CPU"),),
            version_policy=version_policy,
            parameters=params,
            decoupled=decoupled,
        )

    def with_version_policy(self, policy: VersionPolicy | None) -> "ModelConfigSpec":
        return replace(self, version_policy=policy)

    # -- rendering -------------------------------------------------------------------------
    def to_pbtxt(self) -> str:
        """The ``config.pbtxt`` text; deterministic, so equal specs give equal files."""
        lines = [f"name: {_quote(self.name)}", f"backend: {_quote(self.backend)}",
                 f"max_batch_size: {self.max_batch_size}"]
        if self.version_policy is not None:
            lines.append(self.version_policy.pbtxt())
        if self.default_model_filename:
            lines.append(f"default_model_filename: {_quote(self.default_model_filename)}")
        lines += _tensors("input", self.inputs)
        lines += _tensors("output", self.outputs)
        groups = []
        for g in self.instance_groups:
            gpus = f" gpus: [ {', '.join(map(str, g.gpus))} ]" if g.gpus else ""
            groups.append(f"  {{ count: {g.count} kind: {g.kind}{gpus} }}")
        lines.append("instance_group [\n" + ",\n".join(groups) + "\n]")
        if self.dynamic_batching is not None:
            db = self.dynamic_batching
            body = []
            if db.preferred_batch_size:
                body.append(f"  preferred_batch_size: [ {', '.join(map(str, db.preferred_batch_size))} ]")
            body.append(f"  max_queue_delay_microseconds: {db.max_queue_delay_microseconds}")
            lines.append("dynamic_batching {\n" + "\n".join(body) + "\n}")
        if self.response_cache:
            lines.append("response_cache { enable: true }")
        if self.decoupled:
            lines.append("model_transaction_policy { decoupled: true }")
        if self.gpu_accelerators or self.cpu_accelerators:
            acc = []
            for field_name, items in (("gpu_execution_accelerator", self.gpu_accelerators),
                                      ("cpu_execution_accelerator", self.cpu_accelerators)):
                if items:
                    acc.append(f"    {field_name}: [\n" + ",\n".join(_accelerator(a) for a in items) + "\n    ]")
            lines.append("optimization {\n  execution_accelerators {\n" + "\n".join(acc) + "\n  }\n}")
        for key in sorted(self.parameters):
            value = _quote(self.parameters[key])
            lines.append(f"parameters: {{ key: {_quote(key)} value: {{ string_value: {value} }} }}")
        return "\n".join(lines) + "\n"


def _tensors(kind: str, tensors: tuple[TensorSpec, ...]) -> list[str]:
    items = []
    for t in tensors:
        opt = " optional: true" if t.optional else ""
        dims = ", ".join(map(str, t.dims))
        items.append(f"  {{ name: {_quote(t.name)} data_type: {t.dtype} dims: [ {dims} ]{opt} }}")
    return [f"{kind} [\n" + ",\n".join(items) + "\n]"]


def _accelerator(a: Accelerator) -> str:
    params = "".join(f" parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in sorted(a.parameters.items()))
    return f"      {{ name: {_quote(a.name)}{params} }}"


# -- reading back (pipeline environment: needs tritonclient's protobuf schema) -------------------
def parse_pbtxt(text: str):
    """Parse ``config.pbtxt`` text with Triton's own schema; raises ``ConfigError`` on bad text."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError("config.pbtxt", text[:200], f"not a Triton ModelConfig: {e}") from e


def set_version_policy(text: str, policy: VersionPolicy) -> str:
    """``text`` with only its version policy replaced; everything else is kept as it was.

    Rollback uses this to restore the champion-only policy on the config that served the
    champion, rather than on the candidate's (possibly different) spec.
    """
    from google.protobuf import text_format

    cfg = parse_pbtxt(text)
    cfg.ClearField("version_policy")
    if policy.kind == "latest":
        cfg.version_policy.latest.num_versions = policy.num_versions
    elif policy.kind == "specific":
        cfg.version_policy.specific.versions.extend(policy.versions)
    else:
        cfg.version_policy.all.SetInParent()
    return text_format.MessageToString(cfg)


def served_versions(text: str) -> list[int] | None:
    """Versions a ``specific`` policy names; None for ``latest``/``all``/no policy."""
    cfg = parse_pbtxt(text)
    if cfg.version_policy.WhichOneof("policy_choice") == "specific":
        return sorted(int(v) for v in cfg.version_policy.specific.versions)
    return None
