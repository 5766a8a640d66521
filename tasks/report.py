"""The run report: what each technique bought, as JSON and Markdown.

    paths = write(report_dict, reports_dir / run_id)     # report.json + report.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.store import write_json_atomic

ROWS = (
    ("perplexity", "held-out perplexity", "{:.2f}"),
    ("size_bytes", "size on disk (MB)", None),
    ("latency_ms_p50", "latency p50 (ms / request)", "{:.1f}"),
    ("latency_ms_p95", "latency p95 (ms / request)", "{:.1f}"),
    ("ttft_ms_p50", "time to first token p50 (ms)", "{:.1f}"),
    ("tokens_per_s", "decode tokens/s (batch 1)", "{:.1f}"),
)


def _fmt(key: str, value: Any, fmt: str | None) -> str:
    if value is None:
        return "–"
    if key == "size_bytes":
        return f"{value / 1e6:.1f}"
    return fmt.format(value) if fmt else str(value)


ENCODER_ROWS = (
    ("quality", "Lee Spearman (quality)", "{:.4f}"),
    ("size_bytes", "size on disk (MB)", None),
    ("latency_ms_p50", "latency p50 (ms / text, batch 1)", "{:.1f}"),
    ("throughput_b16", "throughput (texts/s, batch 16)", "{:.1f}"),
)


def markdown(report: dict[str, Any]) -> str:
    t, c = report["teacher"], report["student"]
    rows = ENCODER_ROWS if t.get("kind") == "encoder" else ROWS
    lines = [f"# trimflow run `{report['run_id']}`", "",
             f"Model source `{report['source']}` · profile `{report['profile']}` · techniques "
             f"{', '.join(report['techniques']) or 'none'}", "",
             f"| metric | teacher ({t.get('runtime', '?')}) | optimized ({c.get('runtime', '?')}) | ratio |",
             "|---|---:|---:|---:|"]
    for key, label, fmt in rows:
        tv, cv = t.get(key), c.get(key)
        ratio = f"{cv / tv:.2f}×" if isinstance(tv, (int, float)) and isinstance(cv, (int, float)) and tv else "–"
        lines.append(f"| {label} | {_fmt(key, tv, fmt)} | {_fmt(key, cv, fmt)} | {ratio} |")
    cost = report.get("cost")
    if cost:
        lines += ["", f"Cost per 1M generated tokens on this machine ({cost['basis']}): teacher "
                      f"${cost['teacher_usd_per_1m_tokens']:.3f}, optimized ${cost['student_usd_per_1m_tokens']:.3f}."]
    lines += ["", "## Quality gates", "", "| gate | measured | allowed | passed |", "|---|---:|---:|:---:|"]
    for g in report.get("gates", {}).get("gates", []):
        lines.append(f"| {g['name']} | {g['measured']:.4g} | {g['op']} {g['allowed']:.4g} | {'yes' if g['passed'] else 'NO'} |")
    steps = report.get("steps", {})
    if steps:
        lines += ["", "## What each step did", ""]
        for name, info in steps.items():
            lines.append(f"- **{name}**: {info}")
    reg, tri, smoke = report.get("registered_model", {}), report.get("triton", {}), report.get("smoke_test", {})
    lines += ["", "## Registry and serving", "",
              f"- MLflow: `{reg.get('name')}` version {reg.get('version')} aliases {reg.get('aliases')}",
              f"- Triton: `{tri.get('model_name')}` version {tri.get('version')} · dynamic batching "
              f"{tri.get('dynamic_batching')} · response cache {tri.get('response_cache')}",
              f"- Smoke test: ok={smoke.get('ok')} · `{smoke.get('text', '')[:120]}`"]
    return "\n".join(lines) + "\n"


def cost_per_million_tokens(metrics: dict[str, Any], usd_per_hour: float) -> float:
    """USD per 1M generated tokens at the measured batch-1 decode rate and a node's hourly price."""
    return usd_per_hour / 3600.0 / metrics["tokens_per_s"] * 1e6


def write(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "report.json", report)
    md = out_dir / "report.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(report))
    tmp.replace(md)
    return {"json": str(out_dir / "report.json"), "markdown": str(md)}


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
