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
