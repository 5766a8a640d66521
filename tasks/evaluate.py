"""Quality and cost of a model, measured by one piece of code for teacher and candidate alike.

A ``Runner`` hides the runtime (PyTorch on a HF folder, onnxruntime on a trimflow export);
``measure`` does the rest identically: the same tokenizer ids, the same perplexity windows,
the same greedy generation of a fixed number of tokens at batch 1, the same thread count.

    teacher = measure(TorchRunner(hf_dir), EvalConfig(), eval_texts, prompts)
    student = measure(OrtRunner(onnx_dir), EvalConfig(), eval_texts, prompts)
    student["perplexity"] / teacher["perplexity"], student["tokens_per_s"] / teacher["tokens_per_s"]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from tasks.config import EvalConfig
from tasks.errors import ConfigError, SourceError
from tasks.modelio import count_parameters, load_causal_lm, require_causal_lm, torch_threads, weights_size_bytes


@runtime_checkable
class Runner(Protocol):
    """What ``measure`` needs from a runtime. Token ids in, logits and timings out."""

    name: str
    eos_token_id: int | None

    def use_threads(self, threads: int) -> None:
        """Run later calls with ``threads`` intra-op threads."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` from the folder's ``tokenizer.json``, no special tokens added."""

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Float32 logits [B, S, V] of unpadded int64 ``ids`` [B, S], without a cache."""

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Greedy-generate exactly ``new_tokens`` (EOS ignored) with the runtime's KV cache.

        Returns the new ids, seconds to the first token, and seconds for the whole request.
        """

    def size_bytes(self) -> int:
        """Bytes of the weights on disk."""

    def num_parameters(self) -> int | None:
        """Parameter count, or None where the runtime cannot tell it honestly."""


class _FolderTokenizer:
    """The ``tokenizer.json`` of a model folder: both runners tokenize through this, so ids match."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise SourceError(f"{folder} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


class TorchRunner:
    """PyTorch fp32 on a Hugging Face folder; generation uses the model's own KV cache.

    Args:
        hf_dir: Hugging Face folder of a causal LM with ``tokenizer.json``.
        threads: torch intra-op threads (default 2; ``measure`` sets ``EvalConfig.threads``).
    """

    def __init__(self, hf_dir: Path, threads: int = 2) -> None:
        self.hf_dir = Path(hf_dir)
        conf = require_causal_lm(self.hf_dir, "evaluation")
        self.tokenizer = _FolderTokenizer(self.hf_dir)
        self.threads = threads
        with torch_threads(threads):
            self.model = load_causal_lm(self.hf_dir)  # structural patches of compress steps re-applied
        eos = conf.get("eos_token_id")
        self.eos_token_id = eos[0] if isinstance(eos, list) else eos
        self.name = "torch-fp32"

    def use_threads(self, threads: int) -> None:
        self.threads = threads

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch_threads(self.threads), torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), use_cache=False).logits.numpy()

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        import torch

        with torch_threads(self.threads), torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=torch.tensor([list(prompt)], dtype=torch.long), use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ttft = time.perf_counter() - t0
            ids = [int(nxt)]
            cache = out.cache
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=nxt, cache=cache, use_cache=True)
                cache = out.cache
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                ids.append(int(nxt))
            return ids, ttft, time.perf_counter() - t0

    def size_bytes(self) -> int:
        return weights_size_bytes(self.hf_dir)

    def num_parameters(self) -> int | None:
        return count_parameters(self.model)


class OrtRunner:
    """onnxruntime on a trimflow export (fp32 or int8), through ``serving``'s ``OnnxCausalLM``.

    Args:
        onnx_dir: folder with the ONNX file, ``trimflow_model.json`` and ``tokenizer.json``.
        threads: onnxruntime intra-op threads (default 2; ``measure`` sets ``EvalConfig.threads``).
        onnx_file: overrides the ONNX file named in the metadata (default None).
    """

    def __init__(self, onnx_dir: Path, threads: int = 2, onnx_file: str | None = None) -> None:
        from serving.runtime.generator import META

        self.onnx_dir = Path(onnx_dir)
        if not (self.onnx_dir / META).is_file():
            raise SourceError(f"{onnx_dir} is not a trimflow ONNX export (no {META})")
        self.tokenizer = _FolderTokenizer(self.onnx_dir)
        self._onnx_file = onnx_file
        self.threads = threads
        self.lm = self._load(threads)
        eos = self.lm.meta.eos_token_ids
        self.eos_token_id = eos[0] if eos else None
        self.name = f"onnxruntime:{self.lm.meta.onnx_file if onnx_file is None else onnx_file}"

    def _load(self, threads: int):
        from serving.runtime.generator import OnnxCausalLM

        return OnnxCausalLM(self.onnx_dir, threads=threads, onnx_file=self._onnx_file)

    def use_threads(self, threads: int) -> None:
        if threads != self.threads:  # an onnxruntime session's thread pool is fixed at creation
            self.lm = self._load(threads)
            self.threads = threads

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.lm.logits(np.asarray(ids, np.int64))

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        lm = self.lm
        t0 = time.perf_counter()
        ids = np.asarray([list(prompt)], np.int64)
        am = np.ones_like(ids)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, past = lm.forward(ids, am, pos, lm.empty_past(1))
        nxt = logits[:, -1].argmax(-1)
        ttft = time.perf_counter() - t0
        out = [int(nxt[0])]
        for _ in range(new_tokens - 1):
            am = np.concatenate([am, np.ones((1, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            logits, past = lm.forward(nxt[:, None].astype(np.int64), am, pos, past)
            nxt = logits[:, -1].argmax(-1)
            out.append(int(nxt[0]))
        return out, ttft, time.perf_counter() - t0

    def size_bytes(self) -> int:
        path = self.onnx_dir / (self._onnx_file or self.lm.meta.onnx_file)
        extra = [p for p in self.onnx_dir.glob(path.name + "*") if p != path and p.is_file()]
        return path.stat().st_size + sum(p.stat().st_size for p in extra)

    def num_parameters(self) -> int | None:
        # ONNX initializers double-count tied embeddings and add quantization scales: not a parameter count.
        return None


def perplexity_windows(runner: Runner, texts: Sequence[str], n: int, length: int) -> np.ndarray:
    """Up to ``n`` non-overlapping ``[length]`` windows of the texts' tokens joined by EOS, in order.

    Raises:
        ConfigError: the texts do not fill a single window.
    """
    sep = [runner.eos_token_id] if runner.eos_token_id is not None else []
    stream: list[int] = []
    for t in texts:
        stream += runner.encode(t) + sep
        if len(stream) >= n * length:
            break
    got = min(n, len(stream) // length)
    if got == 0:
        raise ConfigError("eval.window_len", length,
                          f"the {len(texts)} eval texts hold {len(stream)} tokens, less than one window")
    return np.asarray(stream[: got * length], np.int64).reshape(got, length)


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each next token: ``logits`` [S, V] predict ``ids[1:]``."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logz = np.log(np.exp(z).sum(-1))
    return logz - z[np.arange(len(z)), ids[1:]]


def measure(runner: Runner, cfg: EvalConfig, eval_texts: Sequence[str], prompts: Sequence[str]) -> dict[str, Any]:
    """Perplexity, size, generation latency and throughput of ``runner``; identical for every runtime.

    Args:
        runner: ``TorchRunner`` or ``OrtRunner`` (anything satisfying ``Runner``).
        cfg: windows, window length, prompts, new tokens, repeats, threads.
        eval_texts: held-out texts; the first ``cfg.ppl_windows`` windows of ``cfg.window_len``
            tokens are scored.
        prompts: generation prompts; the first ``cfg.latency_prompts`` are timed ``cfg.repeats``
            times each after one warm-up request.

    Returns:
        ``runtime``, ``threads``, ``perplexity``, ``ppl_windows`` and ``ppl_tokens`` (actually
        scored), ``size_bytes``, ``num_parameters`` (None for ONNX), ``latency_ms_p50``,
        ``latency_ms_p95`` (a request of ``new_tokens`` greedy tokens, batch 1), ``ttft_ms_p50``,
        ``tokens_per_s`` (decode throughput: tokens after the first over the time after the first
        token; with ``new_tokens=1``, whole-request tokens per second), ``new_tokens``,
        ``latency_samples``, ``prompt_tokens_mean``, ``seconds``.

    Raises:
        ConfigError: no prompts, an empty prompt, or eval texts shorter than one window.
    """
    started = time.time()
    runner.use_threads(cfg.threads)
    windows = perplexity_windows(runner, eval_texts, cfg.ppl_windows, cfg.window_len)
    nll = np.concatenate([token_nll(runner.logits(w[None])[0], w) for w in windows])

    chosen = [runner.encode(p) for p in list(prompts)[: cfg.latency_prompts]]
    if not chosen:
        raise ConfigError("prompts", list(prompts), "at least one latency prompt is needed")
    if any(len(p) == 0 for p in chosen):
        raise ConfigError("prompts", list(prompts), "a latency prompt encodes to zero tokens")
    runner.generate(chosen[0], cfg.new_tokens)  # warm-up: first-call allocations and lazy init
    latency, ttft, decode_s, decode_tokens = [], [], 0.0, 0
    for prompt in chosen:
        for _ in range(cfg.repeats):
            ids, first, total = runner.generate(prompt, cfg.new_tokens)
            latency.append(total)
            ttft.append(first)
            if cfg.new_tokens > 1:
                decode_s += total - first
                decode_tokens += len(ids) - 1
            else:
                decode_s += total
                decode_tokens += len(ids)
    return {
        "runtime": runner.name,
        "threads": cfg.threads,
        "perplexity": float(np.exp(nll.mean())),
        "ppl_windows": int(len(windows)),
        "ppl_tokens": int(nll.size),
        "size_bytes": int(runner.size_bytes()),
        "num_parameters": runner.num_parameters(),
        "latency_ms_p50": _ms(np.percentile(latency, 50)),
        "latency_ms_p95": _ms(np.percentile(latency, 95)),
        "ttft_ms_p50": _ms(np.percentile(ttft, 50)),
        "tokens_per_s": round(decode_tokens / decode_s, 2),
        "new_tokens": cfg.new_tokens,
        "latency_samples": len(latency),
        "prompt_tokens_mean": round(float(np.mean([len(p) for p in chosen])), 1),
        "seconds": round(time.time() - started, 2),
    }


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000.0, 3)
