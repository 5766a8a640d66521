"""Rollout pieces without a server: the canary router, the config, input checks and the smoke verdict.

The rollout itself (canary load, promotion under load, rollback) runs against the real server
in tests/integration/test_triton_rollout.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import serving.rollout as rollout_mod
from serving.loadgen import Record, Target
from serving.repository import ModelRepository
from serving.rollout import CanaryRouter, RolloutConfig, rollout, smoke_test
from tasks.errors import ConfigError, DeployError


def test_canary_router_sends_exact_share_to_canary_when_share_is_set() -> None:
    r = CanaryRouter(Target("m"))
    r.set_canary(Target("m__canary", "2"), 0.25)
    picks = [r.pick() for _ in range(400)]
    assert picks.count(Target("m__canary", "2")) == 100
    assert all(p == Target("m") for i, p in enumerate(picks) if (i + 1) % 4)
    assert r.counts(Target("m__canary", "2"))["sent"] == 100


def test_canary_router_sends_everything_to_stable_when_canary_ends() -> None:
    r = CanaryRouter(Target("m"))
    r.set_canary(Target("m__canary", "2"), 1.0)
    assert {r.pick() for _ in range(10)} == {Target("m__canary", "2")}
    r.end_canary(Target("m", ""))
    assert {r.pick() for _ in range(10)} == {Target("m")}
    assert r.models() == ("m", "m__canary")


def test_canary_router_counts_outcomes_and_waits_for_in_flight_when_requests_finish() -> None:
    r = CanaryRouter(Target("m"))
    canary = Target("m__canary", "2")
    r.set_canary(canary, 1.0)
    a, b = r.pick(), r.pick()
    assert r.counts(canary)["in_flight"] == 2 and not r.wait_idle(canary, 0.05)
    r.done(a, True, 0.01)
    threading.Timer(0.1, lambda: r.done(b, False, 0.01, "boom")).start()
    t0 = time.monotonic()
    assert r.wait_idle(canary, 5.0) and time.monotonic() - t0 >= 0.05
    c = r.counts(canary)
    assert (c["ok"], c["failed"], c["errors"]) == (1, 1, ["boom"])


def test_rollout_config_raises_config_error_when_share_or_suffix_is_invalid() -> None:
    with pytest.raises(ConfigError, match="canary_share"):
        RolloutConfig(canary_share=0)
    with pytest.raises(ConfigError, match="canary_suffix"):
        RolloutConfig(canary_suffix="/x")
    cfg = RolloutConfig.from_dict({"canary_share": "0.5", "probe": None})
    assert cfg.canary_share == 0.5 and cfg.probe is None


def test_rollout_config_round_trips_through_json_when_dumped() -> None:
    cfg = RolloutConfig(canary_share=0.1, min_canary_requests=3)
    assert RolloutConfig.from_dict(json.loads(cfg.model_dump_json())) == cfg


class _Server:
    def __init__(self, root: Path, mode: str = "explicit") -> None:
        self.config = type("C", (), {"model_repository": str(root), "model_control_mode": mode})()

    def __getattr__(self, name):  # anything beyond the checks means work started
        raise AssertionError(f"rollout touched the server ({name}) before its checks passed")


def _export(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(b"onnx")
    (path / "tokenizer.json").write_text("{}")
    (path / "trimflow_model.json").write_text(json.dumps({"onnx_file": "model.onnx"}))
    return path


def test_rollout_changes_nothing_when_candidate_is_champion_version(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="is the champion version"):
        rollout(_export(tmp_path / "e"), "m", 2, "2", _Server(tmp_path / "repo"))
    assert not (tmp_path / "repo" / "m").exists()


def test_rollout_changes_nothing_when_champion_is_not_in_repository(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="champion version 1 is not in"):
        rollout(_export(tmp_path / "e"), "m", 2, 1, _Server(tmp_path / "repo"))
    assert ModelRepository(tmp_path / "repo").versions("m") == []


def test_rollout_refuses_when_server_polls_repository(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="explicit model control"):
        rollout(_export(tmp_path / "e"), "m", 2, None, _Server(tmp_path / "repo", mode="poll"))


def test_rollout_refuses_router_of_another_model_when_router_is_given(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="not model 'm'"):
        rollout(_export(tmp_path / "e"), "m", 2, None, _Server(tmp_path / "repo"), router=CanaryRouter(Target("x")))


@pytest.mark.parametrize(("ok", "text", "error", "match"), [
    (False, "", "model refused: empty prompt", "failed: model refused"),
    (True, "   ", "", "empty text"),
])
def test_smoke_test_raises_deploy_error_when_request_fails_or_text_is_empty(monkeypatch, ok, text, error,
                                                                           match) -> None:
    rec = Record(0, Target("m"), 1.0, 1.2, ok, error=error, text=text, responses=1)
    monkeypatch.setattr(rollout_mod, "send_one", lambda *a, **k: rec)
    with pytest.raises(DeployError, match=match):
        smoke_test("127.0.0.1:1", "m", 2)


def test_smoke_test_reports_ttft_when_endpoint_is_stream(monkeypatch) -> None:
    rec = Record(0, Target("m"), 10.0, 10.5, True, text=" hello world", responses=2, first_response=10.1)
    seen = {}

    def fake(url, model, prompt, max_tokens, **kw):
        seen.update(kw, model=model)
        return rec

    monkeypatch.setattr(rollout_mod, "send_one", fake)
    out = smoke_test("127.0.0.1:1", "m", endpoint="stream")
    assert seen["mode"] == "stream" and out["ttft_ms"] == pytest.approx(100.0) and out["latency_ms"] == 500.0
    assert out["text"] == " hello world" and out["ok"] is True
