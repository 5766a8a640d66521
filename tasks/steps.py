"""Idempotent, atomically published pipeline steps.

``run_step`` gives a step a private folder, lets it work, writes the config and the
result beside its outputs, and publishes the folder under ``<run_id>/<step>``. A retried
step (same run id, same config digest) returns the published result without redoing
work; a different config under the same key is refused rather than overwritten.

    result = run_step(store, run_id, "prune", cfg.prune, lambda out: prune(cfg.prune, src, out))
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from tasks.errors import ConfigError
from tasks.settings import Settings
from tasks.store import ArtifactStore

log = logging.getLogger(__name__)

RESULT = "_step_result.json"
CONFIG = "_step_config.json"  # not config.json: HF folders have their own
_RUN_ID_OK = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_run_id(run_id: str) -> str:
    """A run id usable as a path segment and S3 key (Airflow's contain ``:`` and ``+``)."""
    if not run_id or not run_id.strip():
        raise ConfigError("run_id", run_id, "must not be empty")
    return _RUN_ID_OK.sub("_", run_id.strip())[:200]


def store_from_settings(settings: Settings | None = None) -> ArtifactStore:
    s = settings or Settings.from_env()
    return ArtifactStore(s.artifact_root, scratch=s.scratch_dir, endpoint_url=s.s3_endpoint_url)


def run_step(
    store: ArtifactStore,
    run_id: str,
    step: str,
    config: BaseModel | dict,
    work: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``work(out_dir)`` once per (run, step) and publish its folder atomically.

    Args:
        store: where the step folder is published.
        run_id: the pipeline run (already made safe with ``safe_run_id``).
        step: the step name; the key is ``<run_id>/<step>``.
        config: the config that determines the output; its digest guards reuse.
        work: does the step's work in the given empty folder; returns a JSON-serializable dict.

    Returns:
        The step's result dict, plus ``uri`` (the published folder) and ``config_digest``.
    """
    key = f"{run_id}/{step}"
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    digest = _digest(cfg)
    if store.exists(key):
        local = store.fetch(key)
        previous = json.loads((local / RESULT).read_text())
        if previous.get("config_digest") != digest:
            raise ConfigError(
                f"{step} config", digest,
                f"run {run_id!r} already published {step} with config {previous.get('config_digest')}; "
                "published artifacts are never overwritten: use a new run id")
        log.info("%s: reusing published result at %s", step, store.uri(key))
        return previous | {"reused": True}
    store.scratch.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"{step.replace('/', '-')}-", dir=store.scratch))
    out = work_dir / "out"
    out.mkdir()
    started = time.time()
    try:
        result = dict(work(out))
        result.update(step=step, run_id=run_id, config_digest=digest,
                      seconds=round(time.time() - started, 3))
        result["uri"] = store.uri(key)
        (out / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (out / RESULT).write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        store.publish(out, key)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result | {"reused": False}


def step_dir(store: ArtifactStore, uri_or_key: str) -> Path:
    """Local folder of a published step, given its URI (as passed between tasks) or key."""
    key = uri_or_key
    if uri_or_key.startswith(store.root + "/"):
        key = uri_or_key[len(store.root) + 1:]
    return store.fetch(key)


def scratch_resume_dir(store: ArtifactStore, run_id: str, step: str) -> Path:
    """A stable local folder for a step's resumable state (checkpoints) outside the temp folder."""
    d = store.scratch / "resume" / run_id / step
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digest(cfg: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
