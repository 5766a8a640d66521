"""Serving-cache figures on the real tritonserver: dynamic batching + response cache, semantic cache.

``run(server, quick)`` deploys the packaged all-MiniLM-L6-v2 encoder into ``server``'s repository
and returns (asserting nothing):

    dynamic.unbatched / dynamic.batched_cached   throughput_rps, p50_ms, p95_ms at concurrency 32
    dynamic.ratio                                batched_cached / unbatched throughput
    cache.response_hit_p50_ms                    Triton response-cache hit, one client, gRPC
    cache.semantic.hit_rate / wrong_hit_rate     serving/data/paraphrases.jsonl, test split

    python -m benchmarks.serving_caches            # starts a throwaway server, prints JSON
    python -m benchmarks.serving_caches --full     # longer streams
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PARAPHRASES = REPO / "serving" / "data" / "paraphrases.jsonl"
CONCURRENCY = 32
# Share of requests that repeat an earlier text in the batched_cached stream. Web-search and
# assistant query logs repeat roughly a third to a half of queries (popular questions, retries,
# UI refreshes); 0.4 sits in that range. The unbatched stream is the very same list.
REPEAT_RATE = 0.4


# -- encoder export -------------------------------------------------------------------------------
def export_encoder(src: Path, out: Path) -> Path:
    """``tasks.encoder.export_encoder`` into ``out`` unless a finished export is already there."""
    from tasks.encoder import ENCODER_META, EncoderExportConfig
    from tasks.encoder import export_encoder as export

    out = Path(out)
    if not (out / ENCODER_META).is_file():
        export(Path(src), out, EncoderExportConfig())
    return out


# -- semantic cache on the paraphrase set ---------------------------------------------------------
def load_pairs(path: Path = PARAPHRASES, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def semantic_eval(pairs: Sequence[dict], embed: Callable[[list[str]], np.ndarray], threshold: float,
                  guard: bool = True) -> dict:
    """Hit and wrong-hit rates of a populated cache on ``pairs``.

    Every distinct first prompt (``a``) is cached with its fact as the answer; then every second
    prompt (``b``) is looked up. A paraphrase is a correct hit only when answered with its own fact;
    any answer to a negated or number-changed prompt is a wrong hit (its meaning is not cached).
    """
    from serving.semantic_cache import SemanticCache, SemanticCacheConfig

    cache = SemanticCache(SemanticCacheConfig(threshold=threshold, guard=guard, ttl_s=0))
    firsts = sorted({(r["a"], r["group"]) for r in pairs})
    texts = [a for a, _ in firsts] + [r["b"] for r in pairs]
    vectors = embed(texts)
    for (a, group), v in zip(firsts, vectors):
        cache.insert("eval", a, v, group)
    counts: dict[str, dict[str, int]] = {}
    for r, v in zip(pairs, vectors[len(firsts):]):
        found = cache.lookup("eval", r["b"], v)
        c = counts.setdefault(f"{r['kind']}/{r['variant']}", {"n": 0, "hit": 0, "wrong": 0, "guarded": 0})
        c["n"] += 1
        c["guarded"] += found.status == "guarded"
        if found.status == "hit":
            right = r["kind"] == "paraphrase" and found.response == r["group"]
            c["hit" if right else "wrong"] += 1

    def total(kinds: tuple[str, ...], key: str) -> int:
        return sum(c[key] for k, c in counts.items() if k.split("/")[0] in kinds)

    para, flips = ("paraphrase",), ("negation", "number")
    return {
        "threshold": threshold, "guard": guard, "pairs": len(pairs),
        "hit_rate": round(total(para, "hit") / max(1, total(para, "n")), 4),
        "wrong_hit_rate": round(total(flips, "wrong") / max(1, total(flips, "n")), 4),
        "paraphrase_wrong_entry_rate": round(total(para, "wrong") / max(1, total(para, "n")), 4),
        "by_kind": {k: dict(v) for k, v in sorted(counts.items())},
    }


def semantic(server, encoder: str, threshold: float | None = None) -> dict:
    """Semantic-cache quality with embeddings from the served ``encoder``: test split at the
    configured threshold (the reported figures), plus the dev split and the test split without the
    guard for comparison."""
    from serving.semantic_cache import SemanticCacheConfig, embed_texts

    threshold = SemanticCacheConfig().threshold if threshold is None else threshold
    memo: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in memo})
        if todo:
            memo.update(zip(todo, embed_texts(server.grpc_url, encoder, todo)))
        return np.stack([memo[t] for t in texts])

    test, dev = load_pairs(split="test"), load_pairs(split="dev")
    report = semantic_eval(test, embed, threshold)
    report.update(split="test", dev=_headline(semantic_eval(dev, embed, threshold)),
                  no_guard=_headline(semantic_eval(test, embed, threshold, guard=False)))
    return report


def _headline(r: dict) -> dict:
    return {k: r[k] for k in ("threshold", "guard", "pairs", "hit_rate", "wrong_hit_rate",
                              "paraphrase_wrong_entry_rate")}


# -- response cache and dynamic batching ----------------------------------------------------------
UNBATCHED, BATCHED = "bench_enc_unbatched", "bench_enc_batched_cached"


def _deploy(server, encoder_dir: Path, threads: int) -> list[str]:
    from serving.model_config import ModelConfigSpec
    from serving.repository import ModelRepository
    from serving.semantic_cache import write_encoder_version

    meta = json.loads((encoder_dir / "trimflow_encoder.json").read_text())
    dim = int(meta.get("embedding_dim", -1))
    repo = ModelRepository(server.config.model_repository)
    specs = [ModelConfigSpec.encoder_embed(UNBATCHED, embedding_dim=dim, max_batch_size=0, response_cache=False,
                                           intra_op_threads=threads),
             ModelConfigSpec.encoder_embed(BATCHED, embedding_dim=dim, max_batch_size=CONCURRENCY,
                                           max_queue_delay_microseconds=2000, response_cache=True,
                                           intra_op_threads=threads)]
    for spec in specs:
        write_encoder_version(repo, spec.name, 1, encoder_dir)
        repo.write_config(spec.name, spec.to_pbtxt())
        server.load(spec.name)
    return [s.name for s in specs]


def _load(server, model: str, requests: int, duration_s: float) -> dict:
    from serving.loadgen import LoadConfig, run_load

    # Same seed for both models: the very same request stream, repeats at the same positions.
    cfg = LoadConfig(concurrency=CONCURRENCY, max_requests=requests, max_duration_s=duration_s,
                     request_timeout_s=60, prompt_words=(8, 16, 32), repeat_share=REPEAT_RATE, seed=0,
                     warmup_requests=4, text_input="text",
                     # The embedding is not decoded: client CPU would compete with the server on 2 cores.
                     text_output="")
    r = run_load(server.grpc_url, cfg, model=model)
    lat = r["latency_ms"] or {}
    return {"throughput_rps": r["ok_rps"], "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"),
            "requests": r["requests"], "failed": r["failed"], "stopped_by": r["stopped_by"],
            "duration_s": r["duration_s"], "client_repeats": r["client_repeats"],
            "avg_batch": r["triton"]["avg_batch"], "cache_hit_rate": r["triton"]["cache_hit_rate"],
            "executions": r["triton"]["execution_count"], "queue_ms_avg": r["triton"]["queue_ms_avg"],
            "compute_infer_ms_avg": r["triton"]["compute_infer_ms_avg"]}


def dynamic(server, quick: bool) -> dict:
    """Throughput and p95 of the unbatched and the batched+cached encoder under one request stream."""
    requests, duration = (600, 60.0) if quick else (3000, 240.0)
    out = {"unbatched": _load(server, UNBATCHED, requests, duration),
           "batched_cached": _load(server, BATCHED, requests, duration)}
    base = out["unbatched"]["throughput_rps"]
    out["ratio"] = round(out["batched_cached"]["throughput_rps"] / base, 2) if base else None
    out["workload"] = {"concurrency": CONCURRENCY, "requests": requests, "repeat_rate": REPEAT_RATE,
                       "prompt_words": [8, 16, 32], "seed": 0}
    return out


def response_cache_hit(server, model: str, n: int) -> dict:
    """Latency of Triton response-cache hits: one client repeating one text over gRPC."""
    import tritonclient.grpc as g

    from serving.client import model_statistics

    inp = g.InferInput("text", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"The city council approved the budget on Tuesday."]], dtype=np.object_))
    client = g.InferenceServerClient(server.grpc_url)
    try:
        client.infer(model, [inp])  # the miss that fills the cache
        stats = lambda: model_statistics(server.grpc_url, model)["model_stats"][0]["inference_stats"]  # noqa: E731
        before = stats().get("cache_hit", {})
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.infer(model, [inp])
            times.append(time.perf_counter() - t0)
        after = stats().get("cache_hit", {})
    finally:
        client.close()
    hits = int(after.get("count", 0)) - int(before.get("count", 0))
    ns = int(after.get("ns", 0)) - int(before.get("ns", 0))
    ms = np.asarray(times) * 1000
    return {"client_p50_ms": round(float(np.percentile(ms, 50)), 3), "client_p95_ms": round(float(np.percentile(ms, 95)), 3),
            "requests": n, "triton_cache_hits": hits,
            "triton_hit_ms_avg": round(ns / hits / 1e6, 4) if hits else None}


def run(server, quick: bool = True, *, encoder_dir: Path | None = None, threads: int = 2) -> dict:
    """All serving-cache figures on ``server`` (a running ``LocalTriton``); asserts nothing.

    Args:
        server: the running server; two encoder models are written into its repository and
            unloaded again at the end.
        quick: 600 requests per load run and 200 cache probes instead of 3000 and 1000 (default True).
        encoder_dir: an encoder export (default None: the packaged all-MiniLM-L6-v2, exported
            with ``tasks.encoder`` into the cache folder once).
        threads: onnxruntime intra-op threads of both encoder models (default 2).

    Returns:
        ``dynamic`` {unbatched, batched_cached: throughput_rps, p50_ms, p95_ms, avg_batch,
        cache_hit_rate, ...; ratio; workload}, ``cache`` {response_hit_p50_ms, response_hit {...},
        semantic {hit_rate, wrong_hit_rate, paraphrase_wrong_entry_rate, threshold, by_kind, dev,
        no_guard}}, ``encoder``, ``threads``, ``seconds``.
    """
    t0 = time.perf_counter()
    if encoder_dir is None:
        from tasks.ingest import materialize
        from tasks.settings import Settings

        cache = Settings.from_env().cache_dir
        encoder_dir = export_encoder(materialize("minilm", cache)[0], cache / "serving-caches" / "minilm-encoder")
    encoder_dir = Path(encoder_dir)
    names = _deploy(server, encoder_dir, threads)
    try:
        report: dict = {"dynamic": dynamic(server, quick)}
        hit = response_cache_hit(server, BATCHED, 200 if quick else 1000)
        report["cache"] = {"response_hit_p50_ms": hit["client_p50_ms"], "response_hit": hit,
                           "semantic": semantic(server, BATCHED)}
    finally:
        for name in names:
            server.unload(name)
    report.update(encoder=str(encoder_dir), threads=threads, seconds=round(time.perf_counter() - t0, 1))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="3000 requests per load run, 1000 cache probes")
    ap.add_argument("--encoder", type=Path, help="encoder export (default: packaged all-MiniLM-L6-v2)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads per model (default 2)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from serving.server import LocalTriton, TritonConfig

    with tempfile.TemporaryDirectory(prefix="bench-caches-") as tmp:
        server = LocalTriton(TritonConfig.on_free_ports(Path(tmp) / "models", Path(tmp) / "state"))
        with server:
            report = run(server, quick=not args.full, encoder_dir=args.encoder, threads=args.threads)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
