"""Corpus preparation and its Great Expectations suite."""

from __future__ import annotations

import json

import pytest

from tasks.config import DataConfig
from tasks.data import SPLITS, clean, prepare, read_split, split_of
from tasks.data_checks import validate
from tasks.errors import DataValidationError, SourceError


def _write(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n")


def test_prepare_news_is_deterministic_and_disjoint_when_run_twice(tmp_path):
    cfg = DataConfig(max_documents=120)
    a, b = prepare(cfg, tmp_path / "a"), prepare(cfg, tmp_path / "b")
    assert a["data_hash"] == b["data_hash"]
    assert sum(a["counts"].values()) == 120 and all(a["counts"][s] > 0 for s in ("train", "eval"))
    train, ev = set(read_split(tmp_path / "a", "train")), set(read_split(tmp_path / "a", "eval"))
    assert not train & ev


def test_split_of_is_stable_and_roughly_proportional():
    cfg = DataConfig()
    assignments = [split_of(f"doc-{i}", cfg) for i in range(4000)]
    assert assignments == [split_of(f"doc-{i}", cfg) for i in range(4000)]
    assert 0.07 < assignments.count("eval") / 4000 < 0.13


def test_clean_repairs_the_corpus_quote_artifact():
    assert clean('said ""?the council  \n voted') == 'said ""the council voted'
    assert clean('   ') == ""


def test_validate_passes_when_news_splits_are_prepared(tmp_path):
    prepare(DataConfig(max_documents=80), tmp_path)
    out = validate(tmp_path, DataConfig(), tmp_path / "gx.json")
    assert out["statistics"]["unsuccessful_expectations"] == 0
    assert json.loads((tmp_path / "gx.json").read_text())["success"] is True


def test_validate_names_every_failed_expectation_when_user_data_is_bad(tmp_path):
    good = "The council met on Tuesday and voted on the new budget for the town schools. " * 4
    _write(tmp_path / "src", "train", [good, good + " again", None, "short"])
    _write(tmp_path / "src", "eval", [good])
    prepare(DataConfig(source=str(tmp_path / "src")), tmp_path / "out")
    with pytest.raises(DataValidationError) as e:
        validate(tmp_path / "out", DataConfig(), tmp_path / "gx.json")
    text = str(e.value)
    assert "expect_column_values_to_not_be_null" in text and "expect_column_value_lengths_to_be_between" in text
    assert "eval: expect_column_values_to_not_be_in_set" in text  # the eval row is also in train
    assert str(tmp_path / "gx.json") in text and (tmp_path / "gx.json").is_file()


def test_validate_fails_when_eval_split_is_empty(tmp_path):
    good = "The council met on Tuesday and voted on the new budget for the town schools. " * 4
    _write(tmp_path / "src", "train", [good])
    (tmp_path / "src" / "eval.jsonl").write_text("")
    prepare(DataConfig(source=str(tmp_path / "src")), tmp_path / "out")
    with pytest.raises(DataValidationError, match="eval: expect_table_row_count_to_be_between"):
        validate(tmp_path / "out", DataConfig(), tmp_path / "gx.json")


def test_prepare_raises_naming_file_and_line_when_user_jsonl_is_broken(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "src" / "eval.jsonl").write_text('{"text": "ok"}\n')
    with pytest.raises(SourceError, match=r"train.jsonl:2: not JSON"):
        prepare(DataConfig(source=str(tmp_path / "src")), tmp_path / "out")


def test_read_split_raises_when_split_is_unknown(tmp_path):
    with pytest.raises(SourceError, match="unknown split"):
        read_split(tmp_path, "test")
    assert set(SPLITS) == {"train", "eval", "calib"}
