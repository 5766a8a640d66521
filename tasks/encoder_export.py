"""Export a BERT sentence encoder to one ONNX graph that returns the pooled, normalised embedding.

The contract (``trimflow-encoder/1``; served by the Triton encoder model and ``OnnxEncoder``):

* ``model.onnx``: inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [batch, seq]
  (right-padded; dynamic batch and sequence), output ``sentence_embedding`` float32 [batch, H]:
  mean of the last hidden states over ``attention_mask``, then L2-normalised, as
  sentence-transformers computes it (so cosine similarity is a dot product).
* ``tokenizer.json``: the fast tokenizer, set to truncate at ``max_seq_length`` and pad to the
  longest item of a batch; ``Tokenizer.from_file(...).encode_batch(texts)`` gives the inputs.
* ``trimflow_encoder.json``: ``format``, ``onnx_file``, ``inputs``, ``output``, ``embedding_dim``,
  ``num_layers``, ``max_seq_length``, ``pad_token_id``, ``pooling`` (``mean``), ``normalized`` (true),
  ``model_type``, ``opset``.

After export the embeddings of onnxruntime and PyTorch are compared on a padded batch and on a
single item; a difference above ``atol`` raises ``ExportMismatch``.

    result = export_encoder(hf_dir, out_dir, EncoderExportConfig())
    OnnxEncoder(out_dir).embed(["a text"])      # [1, 384] for all-MiniLM-L6-v2
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from tasks.builtin_texts import BUILTIN_TEXTS
from tasks.config import _Frozen
from tasks.encoder_common import (ENCODER_FORMAT, ENCODER_META, INPUT_NAMES, OUTPUT_NAME, TOKENIZER_FILE,
                                  batch_arrays, encoder_tokenizer, load_bert, max_seq_length, pooled_encoder,
                                  require_encoder)
from tasks.errors import ExportMismatch
from tasks.technique import Technique

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
RESULT_FILE = "trimflow_encoder_export.json"


class EncoderExportConfig(_Frozen):
    """ONNX export of a sentence encoder and its parity check.

    Args:
        opset: ONNX opset (default 17).
        atol: largest allowed absolute difference between onnxruntime and PyTorch embedding
            components (default 1e-4; all-MiniLM-L6-v2 differs by ~2e-7).
        max_seq_length: truncation length written into the tokenizer and metadata (default None:
            the folder's ``sentence_bert_config.json``, else 256).
    """

    opset: int = Field(17, ge=14)
    atol: float = Field(1e-4, gt=0)
    max_seq_length: int | None = Field(None, ge=8)


def encoder_meta(config: dict[str, Any], max_len: int, pad_id: int, opset: int,
                 onnx_file: str = ONNX_FILE) -> dict[str, Any]:
    """The ``trimflow_encoder.json`` of a single-graph export."""
    return {
        "format": ENCODER_FORMAT,
        "model_type": config["model_type"],
        "onnx_file": onnx_file,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "embedding_dim": int(config["hidden_size"]),
        "num_layers": int(config["num_hidden_layers"]),
        "max_seq_length": int(max_len),
        "pad_token_id": int(pad_id),
        "pooling": "mean",
        "normalized": True,
        "opset": int(opset),
    }


def write_tokenizer(src: Path, out_dir: Path, max_len: int) -> int:
    """Save ``src``'s tokenizer into ``out_dir`` with the export's truncation and padding; returns the pad id."""
    tok = encoder_tokenizer(src, max_len)
    tok.save(str(Path(out_dir) / TOKENIZER_FILE))
    return int(tok.padding["pad_id"])


def export_encoder(hf_dir: Path, out_dir: Path, cfg: EncoderExportConfig) -> dict[str, Any]:
    """Export ``hf_dir`` (a BERT encoder) to ``out_dir`` per the contract above, then check parity.

    Returns:
        ``onnx_file``, ``size_bytes``, ``export_seconds``, ``parity`` (max |diff| per probe and
        ``atol``), ``meta`` (the metadata written), ``seconds``.

    Raises:
        UnsupportedModelError: not a BERT encoder with mean pooling.
        ExportMismatch: onnxruntime and PyTorch embeddings differ by more than ``cfg.atol``.
    """
    started = time.time()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    conf = require_encoder(hf_dir, "encoder export")
    max_len = cfg.max_seq_length or max_seq_length(hf_dir, conf)
    out_dir.mkdir(parents=True, exist_ok=True)
    pad_id = write_tokenizer(hf_dir, out_dir, max_len)
    model = pooled_encoder(load_bert(hf_dir))
    export_graph(model, out_dir / ONNX_FILE, cfg.opset, int(conf["hidden_size"]))
    export_seconds = time.time() - started
    meta = encoder_meta(conf, max_len, pad_id, cfg.opset)
    (out_dir / ENCODER_META).write_text(json.dumps(meta, indent=2))
    parity = check_encoder_parity(model, out_dir, cfg.atol)
    result = {"onnx_file": ONNX_FILE, "size_bytes": (out_dir / ONNX_FILE).stat().st_size,
              "export_seconds": round(export_seconds, 2), "parity": parity, "meta": meta,
              "seconds": round(time.time() - started, 2)}
    (out_dir / RESULT_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
    return result


def export_graph(module, path: Path, opset: int, dim: int) -> None:
    """Trace ``module`` (ids, mask, types -> embedding [B, ``dim``]) to ``path`` with dynamic batch and sequence."""
    import onnx
    import torch

    # Batch 2 of different lengths (one padded) so no dimension or mask value is specialised.
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 7, 3, 0, 0]], dtype=torch.long)
    am = (ids != 0).long()
    tt = torch.zeros_like(ids)
    dyn = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES} | {OUTPUT_NAME: {0: "batch"}}
    with torch.no_grad():
        # TorchScript tracing of the explicit-mask forward keeps batch and sequence symbolic and takes
        # seconds; the dynamo exporter also matches but takes ~1 min for MiniLM on 2 cores.
        torch.onnx.export(module, (ids, am, tt), str(path), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=dyn, opset_version=opset, dynamo=False)
    # The tracer leaves the embedding width as a made-up symbol; servers size their outputs from it.
    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = dim
    onnx.save(model, str(path))


def check_encoder_parity(model, onnx_dir: Path, atol: float, onnx_file: str | None = None) -> dict[str, float]:
    """Max |embedding diff| between onnxruntime and the PyTorch ``model`` on a padded batch and one item.

    Raises:
        ExportMismatch: a difference above ``atol``.
    """
    import torch

    from tasks.encoder_runtime import OnnxEncoder

    enc = OnnxEncoder(onnx_dir, threads=1, onnx_file=onnx_file)
    # Lengths differ a lot within the batch, so padding and the mask are exercised.
    texts = [BUILTIN_TEXTS[0], BUILTIN_TEXTS[1][:40], "Rain.", " ".join(BUILTIN_TEXTS[2:5])]
    probes = {"padded_batch": texts, "single": texts[1:2]}
    result: dict[str, float] = {}
    for name, batch in probes.items():
        feed = batch_arrays(enc.tokenizer, batch)
        with torch.inference_mode():
            ref = model(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES)).numpy()
        got = enc.embed_arrays(feed)
        result[f"{name}_max_abs_diff"] = float(np.abs(got - ref).max())
    result["atol"] = atol
    worst = max(v for k, v in result.items() if k != "atol")
    if not worst <= atol:  # also catches NaN
        raise ExportMismatch(f"ONNX encoder {onnx_dir / enc.onnx_file} differs from PyTorch: {result} (atol {atol})")
    log.info("encoder export parity: %s", result)
    return result


def _run(cfg: EncoderExportConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    return export_encoder(src, out, cfg)


TECHNIQUES = [Technique("export_encoder_onnx", stage="export", config=EncoderExportConfig, run=_run,
                        kinds=("encoder",), consumes="hf", produces="onnx",
                        description="ONNX sentence-embedding graph (mean pooling + L2 norm inside), checked "
                                    "against PyTorch")]
