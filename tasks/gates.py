"""Quality gates: compare the candidate with the teacher measured in the same run.

Every gate is evaluated and written to the gate report before anything is raised, so a
failing run names all failed gates with measured vs allowed values at once.

    verdict = check(GateConfig(), teacher_metrics, candidate_metrics, report_path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import GateConfig
from tasks.errors import QualityGateFailed
from tasks.store import write_json_atomic


def ratios(teacher: dict[str, Any], candidate: dict[str, Any]) -> dict[str, float]:
    """Candidate relative to teacher: perplexity ratio, decode speedup, size ratio (teacher/candidate).

    For encoders: quality ratio (Spearman, candidate/teacher) and batch-16 throughput speedup.
    """
    if teacher.get("kind") == "encoder":
        return {
            "quality_ratio": candidate["quality"] / teacher["quality"],
            "speedup": candidate["throughput_b16"] / teacher["throughput_b16"],
            "latency_ratio": teacher["latency_ms_p50"] / candidate["latency_ms_p50"],
            "size_ratio": teacher["size_bytes"] / candidate["size_bytes"],
        }
    return {
        "ppl_ratio": candidate["perplexity"] / teacher["perplexity"],
        "speedup": candidate["tokens_per_s"] / teacher["tokens_per_s"],
        "latency_ratio": teacher["latency_ms_p50"] / candidate["latency_ms_p50"],
        "size_ratio": teacher["size_bytes"] / candidate["size_bytes"],
    }


def check(cfg: GateConfig, teacher: dict[str, Any], candidate: dict[str, Any], report_path: Path) -> dict[str, Any]:
    """Evaluate every gate, write the report, raise ``QualityGateFailed`` if any failed.

    Returns:
        ``passed`` (True), ``gates`` (name, measured, allowed, op, passed) and ``ratios``.
    """
    r = ratios(teacher, candidate)
    size_mb = candidate["size_bytes"] / 1e6
    if teacher.get("kind") == "encoder":
        gates = [
            _gate("min_quality_ratio", r["quality_ratio"], ">=", cfg.min_quality_ratio,
                  f"Lee Spearman {candidate['quality']:.4f} vs teacher {teacher['quality']:.4f}"),
            _gate("min_speedup", r["speedup"], ">=", cfg.min_speedup,
                  f"batch-16 {candidate['throughput_b16']:.1f} vs teacher {teacher['throughput_b16']:.1f} items/s"),
        ]
    else:
        gates = [
            _gate("max_ppl_ratio", r["ppl_ratio"], "<=", cfg.max_ppl_ratio,
                  f"held-out perplexity {candidate['perplexity']:.2f} vs teacher {teacher['perplexity']:.2f}"),
            _gate("min_speedup", r["speedup"], ">=", cfg.min_speedup,
                  f"decode {candidate['tokens_per_s']:.1f} vs teacher {teacher['tokens_per_s']:.1f} tokens/s"),
        ]
    gates.append(_gate("max_size_mb", size_mb, "<=", cfg.max_size_mb, f"candidate {size_mb:.1f} MB on disk"))
    failed = [g for g in gates if not g["passed"]]
    report = {"passed": not failed, "gates": gates, "ratios": r, "teacher": teacher, "candidate": candidate}
    write_json_atomic(Path(report_path), report)
    if failed:
        raise QualityGateFailed(
            [f"{g['name']}: measured {g['measured']:.4g} {g['op']} allowed {g['allowed']:.4g} is false ({g['detail']})"
             for g in failed], str(report_path))
    return {"passed": True, "gates": gates, "ratios": r}


def _gate(name: str, measured: float, op: str, allowed: float, detail: str) -> dict[str, Any]:
    ok = measured <= allowed if op == "<=" else measured >= allowed
    return {"name": name, "measured": float(measured), "op": op, "allowed": float(allowed), "passed": bool(ok),
            "detail": detail}
