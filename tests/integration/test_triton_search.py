"""Config search against the real tritonserver: measured candidates, the SLO rule, the written config."""

from __future__ import annotations

import json

import pytest

from serving.config_search import SearchConfig, SearchSpace, search_config
from serving.loadgen import LoadConfig
from serving.model_config import ModelConfigSpec, VersionPolicy, parse_pbtxt, served_versions
from serving.repository import ModelRepository
from tasks.errors import SloNotMet

pytestmark = pytest.mark.integration
MODEL = "tinyllm_search"
LOAD = LoadConfig(concurrency=8, max_requests=32, max_duration_s=20, warmup_requests=1, prompt_words=(4, 12),
                  max_tokens=(8, 16))


@pytest.fixture(scope="module")
def repo(triton_server, tiny_llm_export) -> ModelRepository:
    repo = ModelRepository(triton_server.config.model_repository)
    repo.write_version(MODEL, 1, tiny_llm_export)
    repo.write_config(MODEL, ModelConfigSpec.llm_generate(MODEL, max_batch_size=2, max_queue_delay_microseconds=0,
                                                          version_policy=VersionPolicy.specific(1)).to_pbtxt())
    triton_server.load(MODEL)
    return repo


def test_search_raises_slo_not_met_and_keeps_config_when_slo_is_unreachable(triton_server, repo) -> None:
    before = repo.read_config(MODEL)
    space = SearchSpace(max_batch_sizes=(4,), queue_delays_us=(1000,), instance_counts=(1,))
    with pytest.raises(SloNotMet, match="none of 1 candidates"):
        search_config(triton_server, MODEL, SearchConfig(p95_slo_ms=0.001, space=space, load=LOAD))
    assert repo.read_config(MODEL) == before
    saved = json.loads(repo.read_text(MODEL, "search.json"))
    assert saved["chosen"] is None and saved["table"][0]["ok_rps"] > 0 and saved["table"][0]["meets_slo"] is False
    assert triton_server.model_config(MODEL)["max_batch_size"] == 2


def test_search_writes_and_applies_best_config_meeting_slo_when_candidates_are_measured(triton_server, repo) -> None:
    space = SearchSpace(max_batch_sizes=(1, 8), queue_delays_us=(0, 20000), instance_counts=(1,))
    r = search_config(triton_server, MODEL, SearchConfig(p95_slo_ms=60_000, space=space, load=LOAD))
    table = r["table"]
    assert len(table) == 3 and all(row.get("error") is None and row["failed"] == 0 for row in table)
    assert all(row["requests"] == 32 and row["avg_batch"] >= 1 for row in table)
    assert [row["avg_batch"] for row in table if row["max_batch_size"] == 1] == [1.0]
    best = max((row for row in table if row["meets_slo"]), key=lambda row: row["ok_rps"])
    assert r["chosen"] == best
    written = parse_pbtxt(repo.read_config(MODEL))
    assert written.max_batch_size == best["max_batch_size"] and written.response_cache.enable
    assert served_versions(repo.read_config(MODEL)) == [1]
    running = triton_server.model_config(MODEL)
    assert r["applied"] is True and running["max_batch_size"] == best["max_batch_size"]
    assert json.loads(repo.read_text(MODEL, "search.json"))["chosen"] == json.loads(json.dumps(best))
    # the scratch copy is gone from the repository and from the server
    assert not repo.has_model(f"{MODEL}__search")
    assert not any(m["name"] == f"{MODEL}__search" and m.get("state") == "READY" for m in triton_server.index())
