"""Config search without a server: candidate space, config rewriting, selection under the SLO.

A fake server loads whatever config the search writes, and a stand-in measurement turns the
loaded shape into throughput and latency, so the selection rule is checked against its own
definition; the real server is exercised in tests/integration/test_triton_search.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import serving.config_search as cs
from serving.config_search import SearchConfig, SearchSpace, search_config, with_serving_shape
from serving.model_config import ModelConfigSpec, TensorSpec, VersionPolicy, parse_pbtxt, served_versions
from serving.repository import ModelRepository
from tasks.errors import ConfigError, DeployError, SloNotMet


def _export(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(b"onnx")
    (path / "tokenizer.json").write_text("{}")
    (path / "trimflow_model.json").write_text(json.dumps({"onnx_file": "model.onnx"}))
    return path


class FakeServer:
    """Loads the config on disk; a candidate whose config says ``instances 3`` fails to load."""

    def __init__(self, repo: ModelRepository) -> None:
        self.repo = repo
        self.config = type("C", (), {"model_control_mode": "explicit", "model_repository": repo.root})()
        self.loaded: dict[str, str] = {}
        self.loads: list[str] = []

    def load(self, name: str) -> None:
        from tasks.errors import ServingError

        text = self.repo.read_config(name)
        if parse_pbtxt(text).instance_group[0].count == 3:
            raise ServingError(f"loading model {name!r} failed: out of memory")
        self.loaded[name] = text
        self.loads.append(name)

    def unload(self, name: str) -> None:
        self.loaded.pop(name, None)

    def index(self) -> list[dict]:
        return [{"name": n, "version": "1", "state": "READY"} for n in self.loaded]

    def ready_versions(self, name: str) -> list[int]:
        return [1] if name in self.loaded else []

    def model_config(self, name: str) -> dict:
        from google.protobuf import json_format

        return json_format.MessageToDict(parse_pbtxt(self.loaded[name]), preserving_proto_field_name=True)

    def urls(self) -> dict:
        return {"grpc": "fake"}

    @property
    def grpc_url(self) -> str:
        return "fake"


def performance(cfg) -> tuple[float, float]:
    """The stand-in's (throughput, p95 ms) of a loaded config: batching helps, waiting costs latency."""
    mbs = cfg.max_batch_size
    delay_ms = cfg.dynamic_batching.max_queue_delay_microseconds / 1000
    inst = cfg.instance_group[0].count
    return 10.0 * min(mbs, 6) * (1 + 0.1 * delay_ms) * inst ** 0.5, 50.0 + 12 * mbs + 9 * delay_ms + 5 * inst


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch):
    repo = ModelRepository(tmp_path / "repo")
    repo.write_version("m", 1, _export(tmp_path / "exp"))
    repo.write_config("m", ModelConfigSpec.llm_generate("m", max_batch_size=2, version_policy=VersionPolicy.specific(1),
                                                        intra_op_threads=1).to_pbtxt())
    server = FakeServer(repo)
    server.load("m")

    def measure(server_, model, version, cfg, texts):
        rps, p95 = performance(parse_pbtxt(server_.loaded[model]))
        return {"ok_rps": rps, "p95_ms": p95, "slo_value_ms": p95, "error_rate": 0.0, "requests": 10, "failed": 0}

    monkeypatch.setattr(cs, "_measure", measure)
    return repo, server


# -- space and rewriting -----------------------------------------------------------------------------------
def test_search_space_keeps_one_delay_for_unbatched_candidates_when_batch_size_is_one() -> None:
    cands = SearchSpace(max_batch_sizes=(1, 4), queue_delays_us=(0, 500, 900), instance_counts=(1, 2)).candidates()
    assert len(cands) == 2 * (1 + 3)
    assert {c["queue_delay_us"] for c in cands if c["max_batch_size"] == 1} == {0}
    assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)


def test_search_space_crosses_model_parameters_when_parameters_are_given() -> None:
    cands = SearchSpace(max_batch_sizes=(1,), queue_delays_us=(0,), instance_counts=(1,),
                        parameters={"max_batch": ("4", "8"), "max_waiting": ("16", "64")}).candidates()
    assert sorted((c["parameters"]["max_batch"], c["parameters"]["max_waiting"]) for c in cands) == [
        ("4", "16"), ("4", "64"), ("8", "16"), ("8", "64")]


def test_search_config_raises_config_error_when_slo_is_missing_or_space_is_empty() -> None:
    with pytest.raises(ConfigError, match="p95_slo_ms"):
        SearchConfig()
    with pytest.raises(ConfigError, match="instance_counts"):
        SearchConfig(p95_slo_ms=10, space={"instance_counts": ()})


def test_with_serving_shape_replaces_batching_and_keeps_everything_else_when_rewritten() -> None:
    base = ModelConfigSpec.llm_generate("m", max_batch_size=2, preferred_batch_size=(2,), response_cache=True,
                                        version_policy=VersionPolicy.specific(3), intra_op_threads=1).to_pbtxt()
    cfg = parse_pbtxt(with_serving_shape(base, max_batch_size=8, queue_delay_us=0, instances=2,
                                         parameters={"intra_op_threads": "2"}))
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0 and list(cfg.dynamic_batching.preferred_batch_size) == [2]
    assert [g.count for g in cfg.instance_group] == [2] and cfg.parameters["intra_op_threads"].string_value == "2"
    assert cfg.response_cache.enable and list(cfg.version_policy.specific.versions) == [3]
    assert cfg.parameters["max_tokens_limit"].string_value == "256" and len(cfg.input) == 3


def test_with_serving_shape_drops_batcher_cache_and_renames_when_asked() -> None:
    base = ModelConfigSpec.llm_generate("m", max_batch_size=8, preferred_batch_size=(4, 8)).to_pbtxt()
    text = with_serving_shape(base, max_batch_size=1, queue_delay_us=5000, instances=1, name="m__search",
                              response_cache=False, policy=VersionPolicy.specific(7))
    cfg = parse_pbtxt(text)
    assert cfg.name == "m__search" and cfg.max_batch_size == 1
    assert not cfg.HasField("dynamic_batching") and not cfg.response_cache.enable
    assert served_versions(text) == [7]
    shrunk = parse_pbtxt(with_serving_shape(base, max_batch_size=4, queue_delay_us=100, instances=1))
    assert list(shrunk.dynamic_batching.preferred_batch_size) == [4]
    unbatched = replace(ModelConfigSpec.llm_generate("m", max_batch_size=1), dynamic_batching=None).to_pbtxt()
    assert not parse_pbtxt(unbatched).HasField("dynamic_batching")
    regrown = parse_pbtxt(with_serving_shape(unbatched, max_batch_size=4, queue_delay_us=0, instances=1))
    assert regrown.HasField("dynamic_batching") and regrown.dynamic_batching.max_queue_delay_microseconds == 0


def test_search_refuses_batch_sizes_when_model_is_decoupled(setup, tmp_path: Path) -> None:
    repo, server = setup
    spec = ModelConfigSpec(name="s", backend="python", max_batch_size=1, decoupled=True,
                           inputs=(TensorSpec("text_input", "TYPE_STRING", (1,)),),
                           outputs=(TensorSpec("text_output", "TYPE_STRING", (1,)),))
    repo.write_version("s", 1, _export(tmp_path / "s"))
    repo.write_config("s", spec.to_pbtxt())
    with pytest.raises(ConfigError, match="decoupled"):
        search_config(server, "s", SearchConfig(p95_slo_ms=100))


# -- selection -----------------------------------------------------------------------------------------------
def test_search_picks_highest_throughput_within_slo_and_writes_it_with_table_when_candidates_run(setup) -> None:
    repo, server = setup
    space = SearchSpace(max_batch_sizes=(1, 4, 8), queue_delays_us=(0, 2000, 8000), instance_counts=(1, 2),
                        max_candidates=14)
    slo = 150.0
    r = search_config(server, "m", SearchConfig(p95_slo_ms=slo, space=space))
    expected = []
    for c in space.candidates():
        text = with_serving_shape(repo.read_config("m"), max_batch_size=c["max_batch_size"],
                                  queue_delay_us=c["queue_delay_us"], instances=c["instances"])
        rps, p95 = performance(parse_pbtxt(text))
        if p95 <= slo:
            expected.append((rps, c))
    best = max(expected, key=lambda x: x[0])[1]
    assert {k: r["chosen"][k] for k in best} == best
    assert len(r["table"]) == len(space.candidates()) and all("meets_slo" in row for row in r["table"])
    written = parse_pbtxt(repo.read_config("m"))
    assert written.max_batch_size == best["max_batch_size"] and written.instance_group[0].count == best["instances"]
    assert written.response_cache.enable and served_versions(repo.read_config("m")) == [1]
    saved = json.loads(repo.read_text("m", "search.json"))
    assert saved["chosen"] == json.loads(json.dumps(r["chosen"])) and saved["applied"] is True
    assert "m__search" not in server.loaded and not repo.has_model("m__search")
    # every candidate ran on the scratch copy without the response cache
    assert server.loads.count("m__search") == len(space.candidates())


def test_search_raises_slo_not_met_and_leaves_config_when_no_candidate_meets_slo(setup) -> None:
    repo, server = setup
    before = repo.read_config("m")
    with pytest.raises(SloNotMet, match="none of 2 candidates") as e:
        search_config(server, "m", SearchConfig(p95_slo_ms=1.0, space=SearchSpace(max_batch_sizes=(1, 2),
                                                                                 queue_delays_us=(0,),
                                                                                 instance_counts=(1,))))
    assert repo.read_config("m") == before
    saved = json.loads(repo.read_text("m", "search.json"))
    assert saved["chosen"] is None and len(saved["table"]) == 2 and e.value.report_path.endswith("search.json")


def test_search_records_failed_candidate_and_skips_beyond_bounds_when_limits_are_hit(setup) -> None:
    repo, server = setup
    space = SearchSpace(max_batch_sizes=(2,), queue_delays_us=(0,), instance_counts=(1, 3, 2, 4), max_candidates=3)
    r = search_config(server, "m", SearchConfig(p95_slo_ms=1000, space=space))
    failed = [row for row in r["table"] if row.get("error")]
    assert [row["instances"] for row in failed] == [3] and "out of memory" in failed[0]["error"]
    assert [s["instances"] for s in r["skipped"]] == [4] and r["chosen"]["instances"] == 2


def test_search_raises_deploy_error_when_model_has_no_config(setup) -> None:
    repo, server = setup
    with pytest.raises(DeployError, match="deploy 'other'"):
        search_config(server, "other", SearchConfig(p95_slo_ms=10))
