"""Great Expectations suites on the prepared text: bad data stops the run here.

Each split gets its own suite (non-empty, no nulls, length bounds); eval additionally must
share no text with train, because overlap would make held-out perplexity a lie. Every
failure is collected, the full GX result is written beside, then one error is raised.

    summary = validate(data_dir, DataConfig(), report_path)   # raises DataValidationError
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tasks.config import DataConfig
from tasks.errors import DataValidationError
from tasks.store import write_json_atomic

# Importing great_expectations after airflow floods the log with ~200 INFO lines.
logging.getLogger("great_expectations").setLevel(logging.WARNING)


def _frame(folder: Path, split: str):
    import pandas as pd

    path = folder / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
    df = pd.DataFrame(rows, columns=["id", "text"]) if not rows else pd.DataFrame(rows)
    if "text" not in df:
        df["text"] = None
    df["text_hash"] = [hashlib.sha256(t.encode()).hexdigest() if isinstance(t, str) else None for t in df["text"]]
    return df


def build_suite(name: str, cfg: DataConfig, forbidden_hashes: set[str] | None = None, min_rows: int = 1):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=name)
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=min_rows))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="text"))
    suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_chars,
                                                                  max_value=cfg.max_chars))
    if forbidden_hashes is not None:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeInSet(column="text_hash", value_set=sorted(forbidden_hashes)))
    return suite


def validate(folder: Path, cfg: DataConfig, report_path: Path) -> dict[str, Any]:
    """Validate the train/eval/calib splits in ``folder``.

    Args:
        folder: the prepared data (``train.jsonl``, ``eval.jsonl``, ``calib.jsonl``).
        cfg: the data config (length bounds).
        report_path: where the full Great Expectations results are written (JSON).

    Returns:
        Per-split statistics when every expectation passes.

    Raises:
        DataValidationError: naming every failed expectation, its split and observed value.
    """
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # Per-metric progress bars would flood the Airflow task log.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("trimflow_text")
    frames = {s: _frame(folder, s) for s in ("train", "eval", "calib")}
    train_hashes = {h for h in frames["train"]["text_hash"] if isinstance(h, str)}
    full: dict[str, Any] = {}
    failures: list[str] = []
    stats = {"evaluated_expectations": 0, "successful_expectations": 0, "unsuccessful_expectations": 0}
    for split, df in frames.items():
        suite = build_suite(f"{split}_text", cfg, forbidden_hashes=train_hashes if split == "eval" else None)
        asset = source.add_dataframe_asset(split)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
        result = batch.validate(suite)
        full[split] = result.to_json_dict()
        for k in stats:
            stats[k] += int(result.statistics.get(k, 0))
        for r in result.results:
            if not r.success:
                failures.append(f"{split}: {r.expectation_config.type} {_kwargs(r.expectation_config.kwargs)} "
                                f"-> {_observed(r.result)}")
    write_json_atomic(report_path, {"success": not failures, "statistics": stats, "results": full})
    if failures:
        raise DataValidationError(failures, str(report_path), stats)
    return {"statistics": stats, "rows": {s: int(len(df)) for s, df in frames.items()}, "report": str(report_path)}


def _kwargs(kw: dict) -> str:
    shown = {k: v for k, v in kw.items() if k not in ("batch_id", "value_set")}
    if "value_set" in kw:
        shown["value_set"] = f"<{len(kw['value_set'])} train text hashes>"
    return json.dumps(shown, default=str)


def _observed(result: dict) -> str:
    if "observed_value" in result:
        return f"observed {result['observed_value']}"
    n = result.get("unexpected_count")
    if n is not None:
        pct = result.get("unexpected_percent")
        sample = [str(v)[:40] for v in (result.get("partial_unexpected_list") or [])[:3]]
        return f"{n} unexpected ({pct:.1f}%), e.g. {sample}" if pct is not None else f"{n} unexpected"
    return json.dumps(result, default=str)[:200]
