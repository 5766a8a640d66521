"""Generation-serving figures on the real tritonserver: continuous vs request-level batching, the KV
prefix cache, and prompt compression.

``run(server, model_dir, quick)`` deploys one exported causal LM (``tasks.export`` /
``tasks.quantize`` output) three times into ``server``'s repository and returns (asserting nothing):

    generation.request_level / generation.continuous   tokens_per_s, ttft_ms, latency_ms under one
                                                       mixed prompt/output-length workload
    generation.ratio                                   continuous / request_level tokens_per_s
    prefix_cache.ttft_ratio                            p50 TTFT with the cache on / off (below 1: faster)
    prompt.tokens_saved_ratio                          prompt tokens saved at equal answer quality

    python -m benchmarks.serving_generation --model .trimflow/runs/<run>/quantize     # throwaway server
    python -m benchmarks.serving_generation --model DIR --full --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

REQUEST_LEVEL, CONTINUOUS, NO_CACHE = "bench_gen_request", "bench_gen_continuous", "bench_gen_nocache"
ROWS = 8  # batch rows of both models, and the number of clients keeping requests in flight


@dataclass(frozen=True)
class Workload:
    """Requests sent in this order by ``concurrency`` closed-loop clients.

    Output lengths are skewed the way chat traffic is (mostly short answers, a few long ones):
    that skew is what makes request-level batches wait for their longest member.
    """

    prompts: tuple[str, ...]
    max_tokens: tuple[int, ...]
    concurrency: int = ROWS

    @classmethod
    def mixed(cls, n: int, seed: int = 0, lengths: Sequence[int] = (8, 8, 16, 16, 32, 96)) -> "Workload":
        from tasks.builtin_texts import BUILTIN_TEXTS

        rng = random.Random(seed)
        words = " ".join(BUILTIN_TEXTS).split()
        prompts, max_tokens = [], []
        for i in range(n):
            size = rng.choice((8, 24, 96))  # prompt words
            start = rng.randrange(0, len(words) - size)
            prompts.append(f"[{i}] " + " ".join(words[start:start + size]))  # distinct: no cache can answer
            max_tokens.append(rng.choice(tuple(lengths)))
        return cls(tuple(prompts), tuple(max_tokens))


def _pct(values: Sequence[float], scale: float = 1000.0) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, float) * scale
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "mean": round(float(a.mean()), 2), "n": int(a.size)}


def drive(workload: Workload, one: Callable[[str, int], tuple[str, float]],
          count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """Send ``workload`` with ``concurrency`` closed-loop clients; ``one(prompt, max_tokens)`` returns
    (text, seconds to its first text) and is timed from the call.

    Tokens are counted by encoding each returned text with the model's tokenizer, the same way
    for both batching modes.
    """
    todo: queue.Queue = queue.Queue()
    for item in zip(workload.prompts, workload.max_tokens):
        todo.put(item)
    records: list[tuple[float, float, int]] = []  # ttft, latency, tokens
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                prompt, mt = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            try:
                text, ttft = one(prompt, mt)
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            latency = time.perf_counter() - t0
            with lock:
                records.append((ttft, latency, count_tokens(text)))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(workload.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    tokens = sum(r[2] for r in records)
    return {"requests": len(workload.prompts), "ok": len(records), "failed": len(errors), "errors": errors[:3],
            "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
            "ttft_ms": _pct([r[0] for r in records]), "latency_ms": _pct([r[1] for r in records])}


def _request_level(url: str) -> Callable[[str, int], tuple[str, float]]:
    from serving.client import generate

    def one(prompt: str, max_tokens: int) -> tuple[str, float]:
        t0 = time.perf_counter()
        text = generate(url, REQUEST_LEVEL, prompt, max_tokens=max_tokens, timeout_s=600)
        return text, time.perf_counter() - t0  # the first text comes with the whole answer

    return one


def _streamed(url: str, model: str) -> Callable[[str, int], tuple[str, float]]:
    from serving.client import generate_stream

    def one(prompt: str, max_tokens: int) -> tuple[str, float]:
        t0 = time.perf_counter()
        first, parts = None, []
        for chunk in generate_stream(url, model, prompt, max_tokens=max_tokens, timeout_s=600):
            if first is None and chunk.text:
                first = chunk.received_s - t0
            parts.append(chunk.text)
        return "".join(parts), first if first is not None else time.perf_counter() - t0

    return one


def _deploy(server, model_dir: Path, threads: int) -> list[str]:
    """Write the three benchmark models (a fresh version when one with other content exists) and load them."""
    from serving.model_config import ModelConfigSpec, VersionPolicy
    from serving.repository import ModelRepository
    from serving.runtime.continuous import stage_model_code
    from tasks.errors import DeployError

    repo = ModelRepository(server.config.model_repository)
    specs = {
        # Distinct prompts never repeat, so the response cache is off rather than merely unused.
        REQUEST_LEVEL: ModelConfigSpec.llm_generate(REQUEST_LEVEL, max_batch_size=ROWS, response_cache=False,
                                                    intra_op_threads=threads, max_tokens_limit=512),
        CONTINUOUS: ModelConfigSpec.llm_continuous(CONTINUOUS, max_batch=ROWS, intra_op_threads=threads),
        NO_CACHE: ModelConfigSpec.llm_continuous(NO_CACHE, max_batch=ROWS, intra_op_threads=threads,
                                                 prefix_cache_bytes=0),
    }
    with tempfile.TemporaryDirectory(prefix="continuous-code-") as tmp:
        code = stage_model_code(Path(tmp))
        for name, spec in specs.items():
            kw = {} if name == REQUEST_LEVEL else {"model_code": code}
            version = max(repo.versions(name), default=1)
            try:
                repo.write_version(name, version, model_dir, **kw)
            except DeployError:  # that version holds another model: publish a new one
                version += 1
                repo.write_version(name, version, model_dir, **kw)
            repo.write_config(name, spec.with_version_policy(VersionPolicy.specific(version)).to_pbtxt())
            server.load(name)
    return list(specs)


def generation(server, count_tokens: Callable[[str], int], quick: bool) -> dict[str, Any]:
    """Tokens/s and TTFT of both batching modes under the same workload, same server run."""
    workload = Workload.mixed(24 if quick else 64, seed=0)
    warm = Workload.mixed(2, seed=1, lengths=(4,))
    out: dict[str, Any] = {"workload": {"requests": len(workload.prompts), "concurrency": workload.concurrency,
                                        "max_tokens": sorted(set(workload.max_tokens)),
                                        "mean_max_tokens": round(float(np.mean(workload.max_tokens)), 1)}}
    for key, one in (("request_level", _request_level(server.grpc_url)),
                     ("continuous", _streamed(server.grpc_url, CONTINUOUS))):
        drive(warm, one, count_tokens)  # first-run allocations stay out of the figures
        out[key] = drive(workload, one, count_tokens)
        log.info("generation %s: %s", key, out[key])
    rl, ct = out["request_level"]["tokens_per_s"], out["continuous"]["tokens_per_s"]
    out["ratio"] = round(ct / rl, 3) if rl else None
    return out


def prefix_cache(server, quick: bool) -> dict[str, Any]:
    """TTFT of requests that share a long few-shot prefix, one at a time, with the cache on and off."""
    from serving.prompts import PromptTemplate

    tpl = PromptTemplate.capital_qa()
    questions = [f"What is the capital of {c}?" for c in
                 ("Peru", "Chile", "Kenya", "Norway", "Poland", "Cuba", "Iran", "Nepal", "Mali", "Laos", "Fiji",
                  "Oman")][: 6 if quick else 12]
    out: dict[str, Any] = {"requests": len(questions)}
    for key, model in (("on", CONTINUOUS), ("off", NO_CACHE)):
        one = _streamed(server.grpc_url, model)
        one(tpl.text("What is the capital of Ghana?"), 2)  # the first request fills the cache
        ttft = [one(tpl.text(q), 4)[1] for q in questions]
        out[f"ttft_ms_{key}"] = _pct(ttft)
    on, off = out["ttft_ms_on"]["p50"], out["ttft_ms_off"]["p50"]
    out["ttft_ratio"] = round(on / off, 3) if off else None
    out["ttft_speedup"] = round(off / on, 3) if on else None
    return out


def prompt_compression(model_dir: Path, threads: int) -> dict[str, Any]:
    from serving.prompts import CAPITAL_TASKS, PromptTemplate, measure_tokens_saved
    from serving.runtime.generator import OnnxCausalLM

    lm = OnnxCausalLM(model_dir, threads=threads)
    # All 12 tasks even when quick: on 6, one task's answer moves the mean log-likelihood by more
    # than the tolerance, and passes were accepted or rejected by chance.
    return measure_tokens_saved(lm, PromptTemplate.capital_qa(), tasks=CAPITAL_TASKS)


def run(server, model_dir: Path, quick: bool = True, *, threads: int = 2) -> dict[str, Any]:
    """All generation-serving figures for ``model_dir`` on ``server`` (a running ``LocalTriton``).

    Args:
        server: the running server; its repository receives the benchmark models, which are
            unloaded again at the end.
        model_dir: exported causal LM folder (ONNX file, tokenizer.json, trimflow_model.json).
        quick: 24 requests and 6 prefix-cache requests instead of 64 and 12 (default True).
        threads: onnxruntime intra-op threads of every model (default 2).

    Returns:
        ``generation`` {request_level, continuous: requests, ok, failed, tokens, seconds,
        tokens_per_s, ttft_ms, latency_ms {p50, p95, mean, n}; ratio; workload}, ``prefix_cache``
        {ttft_ms_on, ttft_ms_off, ttft_ratio, ttft_speedup, requests}, ``prompt`` (see
        ``serving.prompts.measure_tokens_saved``), ``model_dir``, ``threads``, ``seconds``.
    """
    from serving.runtime.generator import OnnxCausalLM  # noqa: F401 - fail early without onnxruntime
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def count_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    t0 = time.perf_counter()
    names = _deploy(server, model_dir, threads)
    try:
        report = {"generation": generation(server, count_tokens, quick), "prefix_cache": prefix_cache(server, quick)}
    finally:
        for name in names:
            server.unload(name)
    report["prompt"] = prompt_compression(model_dir, threads)
    report.update(model_dir=str(model_dir), threads=threads, seconds=round(time.perf_counter() - t0, 1))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="exported causal LM folder (tasks.export/quantize)")
    ap.add_argument("--full", action="store_true", help="64 requests and 12 prefix-cache requests")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads per model (default 2)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from serving.server import LocalTriton, TritonConfig

    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        server = LocalTriton(TritonConfig.on_free_ports(Path(tmp) / "models", Path(tmp) / "state"))
        with server:
            report = run(server, args.model, quick=not args.full, threads=args.threads)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
