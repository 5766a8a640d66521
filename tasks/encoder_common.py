"""What every encoder step shares: the ONNX contract's names, folder checks, tokenizer and pooling.

A trimflow encoder turns text into one L2-normalised vector per item, the way sentence-transformers
does it for all-MiniLM-L6-v2: BERT token states, mean-pooled over the attention mask, then
normalised. PyTorch-side steps (distill, early exit, evaluation) and the ONNX graphs use the same
``mean_pool`` and the same tokenizer settings, so their embeddings are comparable.

    conf = require_encoder(model_dir, "distill")          # config.json; raises for non-BERT models
    tok = encoder_tokenizer(model_dir)                     # truncation + batch-longest padding set
    emb = pooled_embeddings(model, ids, mask, types)       # [B, H] normalised (torch)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.errors import SourceError, UnsupportedModelError
from tasks.ingest import ENCODER_TYPES

# The serving contract (also written into every export's metadata file).
ENCODER_META = "trimflow_encoder.json"
ENCODER_FORMAT = "trimflow-encoder/1"
EARLY_EXIT_FORMAT = "trimflow-encoder-early-exit/1"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
TOKENIZER_FILE = "tokenizer.json"
# sentence-transformers' own default when a folder has no sentence_bert_config.json.
DEFAULT_MAX_SEQ_LENGTH = 256


def require_encoder(model_dir: Path, step: str = "this step") -> dict[str, Any]:
    """``config.json`` of ``model_dir`` if it is a supported encoder (BERT) with mean pooling.

    Args:
        model_dir: Hugging Face folder.
        step: named in the error message (default ``"this step"``).

    Raises:
        SourceError: no ``config.json`` or no ``tokenizer.json``.
        UnsupportedModelError: not a BERT encoder, or its sentence-transformers pooling is not mean pooling.
    """
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise SourceError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    config = json.loads(path.read_text())
    mt = config.get("model_type")
    if mt not in ENCODER_TYPES:
        raise UnsupportedModelError(
            f"{step} supports encoders {list(ENCODER_TYPES)}; {model_dir} has model_type {mt!r}")
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        modes = {k for k, v in json.loads(pooling.read_text()).items() if k.startswith("pooling_mode") and v}
        if modes != {"pooling_mode_mean_tokens"}:
            raise UnsupportedModelError(
                f"{step} implements mean pooling only; {pooling} asks for {sorted(modes)}")
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise SourceError(f"{model_dir} has no {TOKENIZER_FILE} (encoder steps tokenize with the fast tokenizer)")
    return config


def max_seq_length(model_dir: Path, config: dict[str, Any] | None = None) -> int:
    """Tokens per item after truncation: ``sentence_bert_config.json``'s ``max_seq_length`` if present,
    else 256 (sentence-transformers' default), never above ``max_position_embeddings``."""
    model_dir = Path(model_dir)
    config = config or json.loads((model_dir / "config.json").read_text())
    limit = int(config.get("max_position_embeddings", 512))
    sbert = model_dir / "sentence_bert_config.json"
    n = DEFAULT_MAX_SEQ_LENGTH
    if sbert.is_file():
        n = int(json.loads(sbert.read_text()).get("max_seq_length") or n)
    return min(n, limit)


def encoder_tokenizer(folder: Path, max_length: int | None = None):
    """The folder's ``tokenizer.json`` set to truncate at ``max_length`` and pad to the batch's longest item.

    Packaged tokenizers often pad every item to a fixed length (all-MiniLM-L6-v2's pads to 128),
    which would time padding instead of text and truncate at the wrong place.

    Args:
        folder: a model folder with ``tokenizer.json`` (HF or trimflow ONNX export).
        max_length: truncation length (default None: the folder's ``max_seq_length``, or the one
            recorded in its ``trimflow_encoder.json``).
    """
    from tokenizers import Tokenizer

    folder = Path(folder)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise SourceError(f"{folder} has no {TOKENIZER_FILE}")
    tok = Tokenizer.from_file(str(path))
    if max_length is None:
        meta = folder / ENCODER_META
        if meta.is_file():
            max_length = int(json.loads(meta.read_text())["max_seq_length"])
        else:
            max_length = max_seq_length(folder)
    pad_id, pad_token = _pad(tok)
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tok


def _pad(tok) -> tuple[int, str]:
    padding = tok.padding
    if padding:
        return int(padding["pad_id"]), str(padding["pad_token"])
    pid = tok.token_to_id("[PAD]")
    if pid is None:
        raise SourceError("tokenizer has no padding set and no [PAD] token")
    return pid, "[PAD]"


def batch_arrays(tok, texts: list[str]) -> dict[str, Any]:
    """int64 numpy ``input_ids`` / ``attention_mask`` / ``token_type_ids`` [B, S] for ``texts``."""
    import numpy as np

    enc = tok.encode_batch(list(texts))
    return {
        "input_ids": np.asarray([e.ids for e in enc], np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in enc], np.int64),
    }


def mean_pool(hidden, attention_mask, normalize: bool = True):
    """Mean of ``hidden`` [B, S, H] over unmasked positions, L2-normalised (sentence-transformers' rule).

    The clamp keeps an all-padding row finite instead of dividing by zero, as sentence-transformers does.
    """
    import torch

    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=-1) if normalize else pooled


def additive_mask(attention_mask, dtype):
    """[B, 1, 1, S] additive attention mask: 0 where attended, the dtype's minimum where padded.

    Written out (not via transformers' mask helpers) so the traced graph keeps batch and sequence
    dynamic, and in the classic BERT form that onnxruntime's attention fusion recognises.
    """
    import torch

    ext = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def load_bert(model_dir: Path, eager: bool = True):
    """``BertModel`` in fp32, eval mode; eager attention so the explicit additive mask is honoured."""
    import torch
    from transformers import AutoModel

    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModel.from_pretrained(Path(model_dir), dtype=torch.float32, **kwargs).eval()


def run_layers(bert, input_ids, attention_mask, token_type_ids, layers=None):
    """Embeddings then ``layers`` (default all) of ``bert``; returns the list of hidden states after each.

    Index 0 is the embedding output, index i the output of the i-th layer run.
    """
    h = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    mask = additive_mask(attention_mask, h.dtype)
    states = [h]
    for layer in (bert.encoder.layer if layers is None else layers):
        h = layer(h, mask)
        if isinstance(h, tuple):  # older transformers return (hidden, attn)
            h = h[0]
        states.append(h)
    return states


def pooled_encoder(bert):
    """A ``torch.nn.Module``: (input_ids, attention_mask, token_type_ids) -> normalised [B, H] embedding."""
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.bert = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = run_layers(self.bert, input_ids, attention_mask, token_type_ids)[-1]
            return mean_pool(h, attention_mask)

    return PooledEncoder(bert).eval()


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``trimflow_encoder.json`` of an encoder export.

    Raises:
        SourceError: the folder is not a trimflow encoder export.
    """
    path = Path(folder) / ENCODER_META
    if not path.is_file():
        raise SourceError(f"{folder} is not a trimflow encoder export (no {ENCODER_META})")
    meta = json.loads(path.read_text())
    if meta.get("format") not in (ENCODER_FORMAT, EARLY_EXIT_FORMAT):
        raise SourceError(f"{path} has unknown format {meta.get('format')!r}")
    return meta


def onnx_files(folder: Path, meta: dict[str, Any] | None = None) -> list[str]:
    """The ONNX files an export's metadata names (one model, or the early-exit segments)."""
    meta = meta or read_meta(folder)
    if meta["format"] == EARLY_EXIT_FORMAT:
        return [meta["embed_file"], *meta["layer_files"]]
    return [meta["onnx_file"]]
