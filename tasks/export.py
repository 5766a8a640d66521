"""Export a Hugging Face causal LM to ONNX with a KV cache, and prove it matches PyTorch.

The exported graph follows the contract in ``serving.runtime.generator`` (one prefill,
then one token per step). After export, logits from onnxruntime are compared with
PyTorch on a prefill and on a decode step; a difference above ``atol`` raises
``ExportMismatch`` and nothing is published.

    info = export_causal_lm(hf_dir, out_dir, ExportConfig())   # out_dir/model.onnx + tokenizer + meta
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.technique import Technique
from tasks.config import ExportConfig
from tasks.errors import ExportMismatch

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class DecoderWithPast(torch.nn.Module):
        """Flat tensors in and out: ONNX has no notion of a Cache object."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers[:n_layers]:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return DecoderWithPast(model)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask", "position_ids"]
    ins += [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ins, outs


def model_meta(config, generation_config=None) -> dict[str, Any]:
    """The ``trimflow_model.json`` a runtime needs to drive the exported graph."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "format": "trimflow-causal-lm-kv/1",
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        "head_dim": int(head_dim),
        "vocab_size": int(config.vocab_size),
        "eos_token_ids": eos_ids,
        "pad_token_id": int(pad),
        "max_positions": int(getattr(config, "max_position_embeddings", 2048)),
        "past_dtype": "float32",
        "onnx_file": "model.onnx",
    }


def export_causal_lm(hf_dir: Path, out_dir: Path, cfg: ExportConfig) -> dict[str, Any]:
    """Export ``hf_dir`` to ``out_dir/model.onnx`` with tokenizer and metadata, then check parity.

    Returns:
        ``onnx_file``, ``size_bytes``, ``export_seconds``, ``parity`` (max abs logit diffs).
    """
    import torch

    from tasks.modelio import load_causal_lm, onnx_export_options

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model = load_causal_lm(hf_dir)  # re-applies structural patches (low-rank, codebooks) of compress steps
    c = model.config
    meta = model_meta(c, getattr(model, "generation_config", None))
    n, kv, hd = meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]
    ins, outs = io_names(n)
    # Trace with batch 2, 3 past and 4 new tokens so no dimension is specialised to 1.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (2, 4), generator=g)
    am = torch.ones(2, 7, dtype=torch.long)
    pos = torch.arange(3, 7).expand(2, 4)
    past = [torch.randn(2, kv, 3, hd, generator=g) for _ in range(2 * n)]
    dyn: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                      "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    dyn.update({name: {0: "batch", 2: "past"} for name in ins[3:]})
    dyn.update({name: {0: "batch", 2: "total"} for name in outs[1:]})
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    t0 = time.time()
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter traces the HF cache code reliably in torch 2.13.
        torch.onnx.export(_wrapper(model), (ids, am, pos, *past), str(onnx_path), input_names=ins,
                          output_names=outs, dynamic_axes=dyn, opset_version=cfg.opset, dynamo=False,
                          **onnx_export_options(hf_dir))
    seconds = time.time() - t0
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    (out_dir / "trimflow_model.json").write_text(json.dumps(meta, indent=2))
    parity = check_parity(model, out_dir, atol=cfg.atol)
    return {"onnx_file": onnx_path.name, "size_bytes": onnx_path.stat().st_size,
            "export_seconds": round(seconds, 2), "parity": parity, "meta": meta}


def check_parity(model, onnx_dir: Path, atol: float, onnx_file: str = "model.onnx") -> dict[str, float]:
    """Compare onnxruntime and PyTorch logits on a left-padded prefill and a decode step.

    Raises:
        ExportMismatch: when the largest absolute difference exceeds ``atol``.
    """
    import torch

    from serving.runtime.generator import OnnxCausalLM

    lm = OnnxCausalLM(onnx_dir, onnx_file=onnx_file)
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, v, (2, 9), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0  # left padding on the second row, as the generator pads
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True)
    got, present = lm.forward(ids.numpy(), am.numpy(), pos.numpy(), lm.empty_past(2))
    keep = am.numpy().astype(bool)  # padded positions' logits are meaningless
    prefill = float(np.abs(got - ref.logits.numpy())[keep].max())
    nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
    am2 = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
    pos2 = pos[:, -1:] + 1
    with torch.no_grad():
        ref2 = model(input_ids=nxt, attention_mask=am2, position_ids=pos2, past_key_values=ref.past_key_values)
    got2, _ = lm.forward(nxt.numpy(), am2.numpy(), pos2.numpy(), present)
    decode = float(np.abs(got2 - ref2.logits.numpy()).max())
    result = {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode, "atol": atol}
    if max(prefill, decode) > atol:
        raise ExportMismatch(
            f"ONNX export of {onnx_dir / onnx_file} differs from PyTorch: prefill max |diff| {prefill:.3g}, "
            f"decode max |diff| {decode:.3g} > atol {atol}")
    log.info("export parity: prefill %.2e decode %.2e (atol %g)", prefill, decode, atol)
    return result


def _run(cfg: ExportConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    return export_causal_lm(src, out, cfg)


TECHNIQUES = [Technique("export_onnx", stage="export", config=ExportConfig, run=_run, kinds=("causal_lm",),
                        consumes="hf", produces="onnx",
                        description="ONNX export with KV cache, logits checked against PyTorch")]
