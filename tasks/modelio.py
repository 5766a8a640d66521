"""Small shared helpers of the model-side steps: read and check HF folders, copy tokenizers, sizes.

Kept apart so distill, prune, quantize and evaluate read and write model folders the same way.

    config = require_causal_lm(model_dir)          # dict of config.json; raises for encoders
    copy_tokenizer(model_dir, out_dir)              # tokenizer files only, never weights
    n_bytes = weights_size_bytes(out_dir)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from tasks.errors import SourceError, UnsupportedModelError
# Llama-style decoders: a ``model.layers`` list of blocks with ``self_attn`` and a gated
# ``mlp`` (gate_proj, up_proj, down_proj); the one list lives with ingest.
from tasks.ingest import CAUSAL_LM_TYPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx.data", ".data")


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder as a dict.

    Raises:
        SourceError: the folder has no readable ``config.json``.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise SourceError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    return json.loads(path.read_text())


def require_causal_lm(model_dir: Path, step: str = "this step") -> dict[str, Any]:
    """The config of ``model_dir`` if it is a Llama-style causal LM; raises otherwise.

    Args:
        model_dir: Hugging Face folder.
        step: named in the error message (default ``"this step"``).

    Raises:
        UnsupportedModelError: the architecture is not one of ``CAUSAL_LM_TYPES``.
    """
    config = read_config(model_dir)
    mt = config.get("model_type")
    if mt not in CAUSAL_LM_TYPES:
        raise UnsupportedModelError(
            f"{step} supports Llama-style causal LMs {list(CAUSAL_LM_TYPES)}; {model_dir} has model_type {mt!r}")
    return config


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` into ``dst`` (not config or weights); returns their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise SourceError(f"{src} has no tokenizer (tokenizer.json or tokenizer.model)")
    return copied


def weights_size_bytes(model_dir: Path) -> int:
    """Bytes of weight files (safetensors, bin, onnx and external data) directly in ``model_dir``."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir()
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def count_parameters(model) -> int:
    """Distinct parameters of a torch module (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and cgroup-pinned CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- structurally patched models ---------------------------------------------------------------
# Techniques that change a module's structure (a Linear split in two, a weight stored as a codebook
# shared by the tied embedding and head) write the changes to this sidecar; ``load_causal_lm``
# rebuilds the model from config.json, re-applies them in order and only then loads the weights.
PATCHES_FILE = "trimflow_patches.json"
PATCHES_FORMAT = "trimflow-patches/1"
# Patch kind -> "module:function(model, patch)". A fixed table, never read from the sidecar, so a
# model folder cannot name code to run.
PATCH_APPLIERS = {
    "lowrank": "tasks.compress:apply_lowrank_patch",
    "kmeans": "tasks.compress:apply_kmeans_patch",
}


# Patch kinds whose compact weights the TorchScript exporter would undo: its constant folding turns
# the uint8 codebook indices into an int64 initializer, 8x the bytes of the indices and 2x of fp32.
_NO_EXPORT_CONSTANT_FOLDING = {"kmeans"}


def onnx_export_options(model_dir: Path) -> dict[str, Any]:
    """Extra ``torch.onnx.export`` keyword arguments a patched folder needs (``{}`` for a plain one)."""
    if any(p["kind"] in _NO_EXPORT_CONSTANT_FOLDING for p in read_patches(model_dir)):
        return {"do_constant_folding": False}
    return {}


def read_patches(model_dir: Path) -> list[dict[str, Any]]:
    """The structural patches recorded beside a HF folder's weights (``[]`` for a plain folder).

    Raises:
        SourceError: the sidecar is unreadable, of another format, or names an unknown patch kind.
    """
    path = Path(model_dir) / PATCHES_FILE
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != PATCHES_FORMAT:
        raise SourceError(f"{path}: expected format {PATCHES_FORMAT!r}, got {doc.get('format') if isinstance(doc, dict) else doc!r}")
    patches = doc.get("patches", [])
    unknown = sorted({p.get("kind") for p in patches if p.get("kind") not in PATCH_APPLIERS}, key=str)
    if unknown:
        raise SourceError(f"{path}: unknown patch kind(s) {unknown}; known: {sorted(PATCH_APPLIERS)}")
    return patches


def apply_patches(model, patches: list[dict[str, Any]]) -> None:
    """Re-apply recorded structural patches to a freshly built model, in order."""
    import importlib

    for patch in patches:
        mod_name, fn_name = PATCH_APPLIERS[patch["kind"]].split(":")
        getattr(importlib.import_module(mod_name), fn_name)(model, patch)


def load_causal_lm(model_dir: Path, dtype: str = "float32"):
    """A causal LM from a HF folder, with any trimflow structural patches re-applied; in eval mode.

    A plain folder loads exactly as ``AutoModelForCausalLM.from_pretrained``. A folder with a
    ``trimflow_patches.json`` is rebuilt from its config, patched, and then loaded strictly from
    its safetensors (parameters tied by a patch are stored once).

    Args:
        model_dir: Hugging Face folder.
        dtype: torch dtype name of the weights (default ``float32``).

    Raises:
        SourceError: bad sidecar, or weights that do not match the patched structure.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    torch_dtype = getattr(torch, dtype)
    patches = read_patches(model_dir)
    if not patches:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    apply_patches(model, patches)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{model_dir} has a {PATCHES_FILE} but no .safetensors weights")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied parameter is saved under one of its names; the others come back through the tie.
    aliases = _alias_groups(model)
    missing = [k for k in missing if not any(a in state for a in aliases.get(k, ()))]
    if missing or unexpected:
        raise SourceError(f"{model_dir}: weights do not match the patched model: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''} ({len(patches)} patches in {PATCHES_FILE})")
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def save_causal_lm(model, out_dir: Path, patches: list[dict[str, Any]], source_dir: Path | None = None) -> None:
    """Save a (possibly patched) causal LM so that ``load_causal_lm`` rebuilds it exactly.

    Weights go to ``model.safetensors`` with every shared tensor stored once; the patches go to
    ``trimflow_patches.json`` (written last, and only when there are patches).

    Args:
        model: the torch model.
        out_dir: destination HF folder (created).
        patches: structural patches in the order they were applied (default plain save when empty).
        source_dir: folder whose tokenizer files are copied along (default None: none copied).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not patches:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        state, seen = {}, set()
        for name, tensor in model.state_dict().items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
            state[name] = tensor.detach().contiguous()
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        doc = {"format": PATCHES_FORMAT, "patches": list(patches)}
        (out_dir / PATCHES_FILE).write_text(json.dumps(doc, indent=2))
    if source_dir is not None:
        copy_tokenizer(source_dir, out_dir)


def _alias_groups(model) -> dict[str, tuple[str, ...]]:
    """For each state-dict key, the other keys that hold the very same tensor (ties, shared weights)."""
    by_ptr: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        by_ptr.setdefault(key, []).append(name)
    return {n: tuple(a for a in names if a != n) for names in by_ptr.values() for n in names}
