"""What this machine can move, and what a decode step must move: the memory-bandwidth bound on tokens/s.

Batch-1 decode reads every weight once per generated token, so on a CPU it is bound by memory
bandwidth long before arithmetic: tokens/s <= bandwidth / bytes read per token. The bench reports
measured tokens/s as a fraction of that bound.

    bw = measure_memory_bandwidth()                   # {"read_gb_s": ..., "copy_gb_s": ...}
    need = weight_bytes_per_token(onnx_dir)           # {"bytes": ..., "by_kind": {...}}
    bound = decode_bound(need["bytes"], bw["read_gb_s"])
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import ConfigError, SourceError

# Ops that read one row of their table per token instead of the whole table.
_ROW_READERS = {"Gather", "GatherBlockQuantized"}
_SUB_BYTE = {"INT4": 0.5, "UINT4": 0.5, "FLOAT4E2M1": 0.5}


def measure_memory_bandwidth(size_mb: int = 256, repeats: int = 5, threads: int = 2) -> dict[str, Any]:
    """Measured main-memory bandwidth: the best of ``repeats`` passes over a buffer far larger than caches.

    ``read`` takes the max of a float32 buffer (only reads; numpy's float32 sum is pairwise and
    compute-bound at ~2 GB/s even in cache, max is vectorized); ``copy`` copies it into a second buffer and counts
    the bytes read plus the bytes written. Work is split over ``threads`` threads (numpy releases
    the GIL in both loops), matching the intra-op threads a decode runs with.

    Args:
        size_mb: buffer size in MB; keep it well above the last-level cache (default 256).
        repeats: timed passes; the best is reported, since other load only ever slows a pass
            (default 5).
        threads: threads reading at once (default 2).

    Returns:
        ``read_gb_s``, ``copy_gb_s`` (decimal GB/s), ``size_mb``, ``repeats``, ``threads``,
        ``read_samples_gb_s`` (every pass, to show the noise), ``seconds``.

    Raises:
        ConfigError: ``size_mb``, ``repeats`` or ``threads`` below 1.
    """
    for name, value in (("size_mb", size_mb), ("repeats", repeats), ("threads", threads)):
        if value < 1:
            raise ConfigError(f"hardware.{name}", value, "must be >= 1")
    started = time.time()
    n = size_mb * 1_000_000 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    parts = [(src[a:b], dst[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def timed(job) -> float:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(job, parts))  # first touch: page faults are not bandwidth
            t0 = time.perf_counter()
            list(pool.map(job, parts))
            return time.perf_counter() - t0

    read = [src.nbytes / timed(lambda p: float(p[0].max())) / 1e9 for _ in range(repeats)]
    copy = [2 * src.nbytes / timed(lambda p: np.copyto(p[1], p[0])) / 1e9 for _ in range(repeats)]
    return {
        "read_gb_s": round(max(read), 2),
        "copy_gb_s": round(max(copy), 2),
        "size_mb": size_mb,
        "repeats": repeats,
        "threads": threads,
        "read_samples_gb_s": [round(x, 2) for x in read],
        "seconds": round(time.time() - started, 2),
    }


def _tensor_bytes(t) -> float:
    from onnx import TensorProto, helper

    count = int(np.prod(t.dims)) if len(t.dims) else 1
    name = TensorProto.DataType.Name(t.data_type)
    if name in _SUB_BYTE:
        return count * _SUB_BYTE[name]
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def weight_bytes_per_token(onnx_dir: Path, onnx_file: str | None = None) -> dict[str, Any]:
    """Bytes of initializers one decode step reads from memory, from the graph alone (no session).

    Every initializer counts in full, except tables that only ``Gather``/``GatherBlockQuantized``
    read (the token embedding): those contribute one row per token. The KV cache is not counted
    here: it grows with the context (``kv_bytes_per_position`` gives its rate).

    Args:
        onnx_dir: a trimflow ONNX export folder, or the ONNX file itself.
        onnx_file: overrides the file named in ``trimflow_model.json`` (default None).

    Returns:
        ``bytes`` (per decode token), ``initializer_bytes`` (all weights stored), ``row_tables``
        (name -> stored bytes of tables read a row at a time), ``by_op`` (bytes read per consuming op
        type), ``kv_bytes_per_position`` (per sequence, when the metadata says the cache shape).

    Raises:
        SourceError: no ONNX file at the given place.
    """
    import onnx

    onnx_dir = Path(onnx_dir)
    meta: dict[str, Any] = {}
    if onnx_dir.is_dir():
        meta_path = onnx_dir / "trimflow_model.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
        path = onnx_dir / (onnx_file or meta.get("onnx_file", "model.onnx"))
    else:
        path = onnx_dir
    if not path.is_file():
        raise SourceError(f"no ONNX file at {path}")
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[tuple[str, int]]] = {name: [] for name in inits}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in consumers:
                consumers[name].append((node.op_type, slot))
    total = stored = 0.0
    by_op: dict[str, float] = {}
    row_tables: dict[str, int] = {}
    for name, t in inits.items():
        size = _tensor_bytes(t)
        stored += size
        uses = consumers[name]
        if not uses:
            continue
        # A table read only a row at a time: its data (slot 0) and, for the block-quantized gather,
        # its per-row scales and zero points (slots 2, 3) cost one row per token.
        if all(op in _ROW_READERS and slot != 1 for op, slot in uses) and t.dims:
            row_tables[name] = int(size)
            size = size / t.dims[0]
        total += size
        op = uses[0][0]
        by_op[op] = by_op.get(op, 0.0) + size
    result = {
        "bytes": int(total),
        "initializer_bytes": int(stored),
        "row_tables": row_tables,
        "by_op": {k: int(v) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "onnx_file": path.name,
    }
    if {"num_layers", "num_kv_heads", "head_dim"} <= meta.keys():
        itemsize = np.dtype(meta.get("past_dtype", "float32")).itemsize
        result["kv_bytes_per_position"] = int(2 * meta["num_layers"] * meta["num_kv_heads"] * meta["head_dim"]
                                              * itemsize)
    return result


def decode_bound(bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Upper bound on batch-1 decode tokens/s when every step reads ``bytes_per_token`` at ``bandwidth_gb_s``.

    Raises:
        ConfigError: a non-positive byte count or bandwidth.
    """
    if bytes_per_token <= 0 or bandwidth_gb_s <= 0:
        raise ConfigError("hardware.decode_bound", (bytes_per_token, bandwidth_gb_s), "both must be positive")
    return bandwidth_gb_s * 1e9 / bytes_per_token
