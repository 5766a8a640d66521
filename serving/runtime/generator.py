"""Batched text generation over trimflow's exported ONNX decoder with a KV cache.

The ONNX contract (written by ``tasks.export``; metadata in ``trimflow_model.json``):
inputs ``input_ids`` [B,S] int64, ``attention_mask`` [B,P+S] int64, ``position_ids``
[B,S] int64, ``past_key_values.{i}.key|value`` [B,kv_heads,P,head_dim]; outputs ``logits``
[B,S,V] and ``present.{i}.key|value`` [B,kv_heads,P+S,head_dim]. Prompts are left-padded,
so one prefill and then one token per step serve a whole batch.

    lm = OnnxCausalLM(model_dir, threads=2)
    texts = lm.generate_text(["Hello"], max_new_tokens=8)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

META = "trimflow_model.json"


@dataclass(frozen=True)
class ModelMeta:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    max_positions: int
    past_dtype: str = "float32"
    onnx_file: str = "model.onnx"

    @classmethod
    def load(cls, model_dir: Path) -> "ModelMeta":
        d = json.loads((Path(model_dir) / META).read_text())
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class TextIO:
    """Text in and out around ``generate_ids``, for any generator with a ``tokenizers`` tokenizer
    (``OnnxCausalLM`` here, ``EarlyExitLM`` in early_exit.py)."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 32, **kw) -> list[str]:
        ids = self.generate_ids([self.encode(p) for p in prompts], max_new_tokens, **kw)
        return [self.decode(x) for x in ids]


class OnnxCausalLM(TextIO):
    """An exported decoder plus its tokenizer, runnable with onnxruntime alone.

    Args:
        model_dir: folder with the ONNX file, ``tokenizer.json`` and ``trimflow_model.json``.
        threads: onnxruntime intra-op threads (default 0 = onnxruntime decides).
        providers: execution providers (default CPU).
        onnx_file: overrides the ONNX file named in the metadata (e.g. ``model.int8.onnx``).
    """

    def __init__(self, model_dir: str | Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
                 onnx_file: str | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.meta = ModelMeta.load(self.model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = self.model_dir / (onnx_file or self.meta.onnx_file)
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self._past_dtype = np.dtype(self.meta.past_dtype)

    # -- low level -------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.meta
        return [np.zeros((batch, m.num_kv_heads, 0, m.head_dim), self._past_dtype) for _ in range(2 * m.num_layers)]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        for i in range(self.meta.num_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits [B,S,V] for unpadded ``input_ids`` (perplexity)."""
        b, s = input_ids.shape
        am = np.ones((b, s), np.int64)
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
        return self.forward(input_ids, am, pos, self.empty_past(b))[0]

    # -- generation ------------------------------------------------------------------------
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True) -> list[list[int]]:
        """Generate up to ``max_new_tokens`` per prompt; greedy when ``temperature`` is 0.

        Returns the new token ids per prompt, stopping at an EOS token (not included) unless
        ``stop_at_eos`` is False (benchmarks generate a fixed token count for every runtime).
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: at least one token is needed")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.meta.max_positions:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's {self.meta.max_positions} positions")
        rng = np.random.default_rng(seed)
        b = len(prompts)
        pad = self.meta.pad_token_id
        ids = np.array([[pad] * (longest - len(p)) + list(p) for p in prompts], np.int64)
        am = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], np.int64)
        pos = np.clip(np.cumsum(am, axis=1) - 1, 0, None)
        past = self.empty_past(b)
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        eos = set(self.meta.eos_token_ids)
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, am, pos, past)
            nxt = self._pick(logits[:, -1, :], temperature, top_p, rng)
            for i in range(b):
                if done[i]:
                    continue
                if stop_at_eos and int(nxt[i]) in eos:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
            if done.all():
                break
            ids = nxt[:, None].astype(np.int64)
            am = np.concatenate([am, np.ones((b, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
        return out

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
        if temperature <= 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / temperature
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        picks = np.empty(len(p), np.int64)
        for i, row in enumerate(p):
            order = np.argsort(-row)
            keep = order[: max(1, int(np.searchsorted(np.cumsum(row[order]), top_p) + 1))]
            q = row[keep] / row[keep].sum()
            picks[i] = keep[rng.choice(len(keep), p=q)]
        return picks

