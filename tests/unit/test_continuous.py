"""The continuous batcher: joins, leaves, cancellation, stop sequences, limits, failures.

Two models: ``ScriptLM`` (numpy; its KV cache stores positions, and every forward checks that
the mask and padding the batcher built line each row's past up in order) for the scheduling
logic, and a tiny random Llama exported to ONNX for numerical equality with solo generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from serving.runtime.continuous import BatcherConfig, ContinuousBatcher, RequestError, SamplingParams
from serving.runtime.generator import OnnxCausalLM

TEXT = "hello world. the end\x00 and more words after the end"


@dataclass
class _Meta:
    num_layers: int = 1
    num_kv_heads: int = 1
    head_dim: int = 1
    eos_token_ids: tuple[int, ...] = (0,)
    pad_token_id: int = 0
    max_positions: int = 64
    past_dtype: str = "float32"


class ScriptLM:
    """Characters are tokens; the token after position ``p`` is ``TEXT[(p + 1) % len(TEXT)]``.

    The KV cache holds ``position + 1`` per token (0 marks padding), so a forward can verify
    that each row's unmasked past is exactly its positions 0..p-1 in order.
    """

    def __init__(self, max_positions: int = 64, fail_on_batch: int | None = None) -> None:
        self.meta = _Meta(max_positions=max_positions)
        self.fail_on_batch = fail_on_batch
        self.calls: list[tuple[int, int]] = []  # (rows, new tokens) per forward

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, 1, 0, 1), np.float32) for _ in range(2)]

    def forward(self, ids, mask, pos, past):
        b, s = ids.shape
        self.calls.append((b, s))
        if self.fail_on_batch is not None and b == self.fail_on_batch:
            self.fail_on_batch = None
            raise RuntimeError("onnxruntime exploded")
        assert mask.shape == (b, past[0].shape[2] + s), (mask.shape, past[0].shape, s)
        new = (pos + 1).astype(np.float32)[:, None, :, None]
        present = [np.concatenate([p, new], axis=2) for p in past]
        for r in range(b):
            kv = present[0][r, 0, :, 0]
            assert np.array_equal(kv[mask[r] == 0], np.zeros(int((mask[r] == 0).sum()))), "padding must be zeros"
            assert np.array_equal(kv[mask[r] == 1], np.arange(1, pos[r, -1] + 2)), f"row {r} past out of order"
        logits = np.full((b, s, 128), -10.0, np.float32)
        for r in range(b):
            for j in range(s):
                logits[r, j, ord(TEXT[(int(pos[r, j]) + 1) % len(TEXT)])] = 10.0
        return logits, present


def _drain(batcher: ContinuousBatcher, max_steps: int = 500) -> dict[str, list]:
    out: dict[str, list] = {}
    for _ in range(max_steps):
        if not batcher.has_work():
            return out
        for ev in batcher.step():
            out.setdefault(ev.request_id, []).append(ev)
    raise AssertionError("batcher did not finish")


def _text(events) -> str:
    return "".join(e.text for e in events)


def test_continuous_streams_position_script_when_one_request_runs_alone() -> None:
    b = ContinuousBatcher(ScriptLM())
    b.submit("a", [ord("x")] * 3, SamplingParams(max_tokens=5))
    events = _drain(b)["a"]
    assert _text(events) == TEXT[3:8]
    assert [e.finished for e in events] == [False] * 4 + [True]
    assert events[-1].finish_reason == "length"


def test_continuous_admits_request_into_running_batch_when_it_arrives_mid_decode() -> None:
    lm = ScriptLM()
    b = ContinuousBatcher(lm, BatcherConfig(max_batch=4))
    b.submit("long", [1, 2], SamplingParams(max_tokens=12, ignore_eos=True))
    for _ in range(3):
        assert {e.request_id for e in b.step()} == {"long"}
    b.submit("short", [1, 2, 3, 4, 5], SamplingParams(max_tokens=2))
    joined = b.step()
    assert {e.request_id for e in joined} == {"long", "short"}
    assert b.stats()["joined_running"] == 1 and max(e.batch_rows for e in joined) == 2
    rest = _drain(b)
    short = [e for e in joined if e.request_id == "short"] + rest.get("short", [])
    assert _text(short) == TEXT[5:7] and short[-1].finished
    assert not any(e.finished for e in rest["long"][:-1]) and rest["long"][-1].finished
    # The short request left while the long one kept decoding: the last forwards ran one row.
    assert lm.calls[-1] == (1, 1)


def test_continuous_matches_each_script_when_rows_of_different_lengths_share_the_batch() -> None:
    b = ContinuousBatcher(ScriptLM(), BatcherConfig(max_batch=3, max_prefill_tokens=4))
    prompts = {"a": 1, "b": 9, "c": 4, "d": 15, "e": 2}
    pending = list(prompts)
    out: dict[str, list] = {}
    while pending or b.has_work():
        if pending:  # one arrival per step
            rid = pending.pop(0)
            b.submit(rid, [ord("x")] * prompts[rid], SamplingParams(max_tokens=6, ignore_eos=True))
        for ev in b.step():
            out.setdefault(ev.request_id, []).append(ev)
    for rid, n in prompts.items():
        want = "".join(TEXT[(p + 1) % len(TEXT)] for p in range(n - 1, n + 5))
        assert _text(out[rid]) == want, rid
    assert b.stats()["max_rows"] == 3


def test_continuous_prefills_long_prompt_in_chunks_when_over_step_budget() -> None:
    lm = ScriptLM()
    b = ContinuousBatcher(lm, BatcherConfig(max_batch=2, max_prefill_tokens=4))
    b.submit("run", [7], SamplingParams(max_tokens=10, ignore_eos=True))
    b.step()
    b.submit("long", [7] * 10, SamplingParams(max_tokens=2))
    per_step = [{e.request_id for e in b.step()} for _ in range(3)]
    # The running row got a token every step while the 10-token prompt went in as 4 + 4 + 2.
    assert all("run" in s for s in per_step)
    assert [s for r, s in lm.calls if r == 1 and s > 1] == [4, 4, 2]
    assert "long" in per_step[2] and "long" not in per_step[1]


def test_continuous_finishes_with_stop_when_eos_token_comes() -> None:
    b = ContinuousBatcher(ScriptLM())
    b.submit("a", [ord("x")] * TEXT.index("the end"), SamplingParams(max_tokens=30))
    events = _drain(b)["a"]
    assert _text(events) == "the end" and events[-1].finish_reason == "stop"


@pytest.mark.parametrize("stop, text", [(("world",), "hello "), (("xyz", ". t"), "hello world"),
                                        (("wor", "d."), "hello ")])
def test_continuous_cuts_text_before_stop_sequence_when_it_appears(stop, text: str) -> None:
    b = ContinuousBatcher(ScriptLM(max_positions=256))
    b.submit("a", [ord("x")] * len(TEXT), SamplingParams(max_tokens=30, stop=stop))
    events = _drain(b)["a"]
    # Equality also proves that no held-back piece of the stop sequence was streamed.
    assert _text(events) == text and events[-1].finish_reason == "stop"


def test_continuous_releases_held_text_when_stop_prefix_does_not_complete() -> None:
    b = ContinuousBatcher(ScriptLM(max_positions=256))
    b.submit("a", [ord("x")] * len(TEXT), SamplingParams(max_tokens=9, stop=("worx",)))
    events = _drain(b)["a"]
    streamed = [e.text for e in events]
    assert _text(events) == "hello wor" and events[-1].finish_reason == "length"
    assert streamed[6:8] == ["", ""]  # "w", "o" held: they might have begun "worx"


def test_continuous_frees_row_for_waiting_request_when_running_one_is_cancelled() -> None:
    b = ContinuousBatcher(ScriptLM(), BatcherConfig(max_batch=1))
    b.submit("a", [1], SamplingParams(max_tokens=40, ignore_eos=True))
    b.step()
    b.submit("b", [1], SamplingParams(max_tokens=5))
    for _ in range(3):
        assert {e.request_id for e in b.step()} == {"a"}  # b waits: the only row is taken
    assert b.waiting == ["b"]
    assert b.cancel("a")
    events = b.step()
    assert [(e.request_id, e.finish_reason) for e in events if e.finished][0] == ("a", "cancelled")
    assert "b" in {e.request_id for e in events} and b.running == ["b"]
    assert b.stats()["cancelled"] == 1 and not b.cancel("a")


def test_continuous_cancels_waiting_request_when_asked_before_it_runs() -> None:
    b = ContinuousBatcher(ScriptLM(), BatcherConfig(max_batch=1))
    b.submit("a", [1], SamplingParams(max_tokens=3))
    b.submit("b", [1], SamplingParams(max_tokens=3))
    b.cancel("b")
    out = _drain(b)
    assert [e.finish_reason for e in out["b"]] == ["cancelled"] and out["a"][-1].finish_reason == "length"


@pytest.mark.parametrize("prompt, params, problem", [
    ([], SamplingParams(), "empty prompt"),
    ([1] * 60, SamplingParams(max_tokens=5), "exceeds the model's 64 positions"),
    ([1], SamplingParams(max_tokens=33), "exceeds the limit 32"),
])
def test_continuous_refuses_request_when_input_is_bad(prompt, params, problem: str) -> None:
    b = ContinuousBatcher(ScriptLM(), BatcherConfig(max_tokens_limit=32))
    with pytest.raises(RequestError, match=problem):
        b.submit("x", prompt, params)
    assert not b.has_work()


@pytest.mark.parametrize("kwargs, problem", [
    ({"max_tokens": 0}, "max_tokens=0"), ({"temperature": -1.0}, "temperature=-1.0"),
    ({"temperature": float("nan")}, "temperature=nan"), ({"top_p": 0.0}, "top_p=0.0"),
    ({"stop": ("",)}, "non-empty"),
])
def test_sampling_params_raise_request_error_when_value_is_out_of_range(kwargs, problem: str) -> None:
    with pytest.raises(RequestError, match=problem):
        SamplingParams(**kwargs)


def test_continuous_refuses_request_when_queue_is_full_or_id_in_flight() -> None:
    b = ContinuousBatcher(ScriptLM(), BatcherConfig(max_waiting=2))
    b.submit("a", [1])
    with pytest.raises(RequestError, match="already in flight"):
        b.submit("a", [1])
    b.submit("b", [1])
    with pytest.raises(RequestError, match="2 requests already waiting"):
        b.submit("c", [1])


def test_continuous_fails_batch_rows_and_keeps_serving_when_decode_raises() -> None:
    b = ContinuousBatcher(ScriptLM(fail_on_batch=2), BatcherConfig(max_batch=2))
    b.submit("a", [1], SamplingParams(max_tokens=5))
    b.submit("b", [1], SamplingParams(max_tokens=5))
    out = _drain(b)
    assert [out[r][-1].finish_reason for r in "ab"] == ["error", "error"]
    assert "onnxruntime exploded" in out["a"][-1].error
    b.submit("c", [1], SamplingParams(max_tokens=3))
    assert _drain(b)["c"][-1].finish_reason == "length"


# -- numerical equality on a real (tiny, random) exported decoder ----------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> OnnxCausalLM:
    from tasks.config import ExportConfig
    from tasks.export import export_causal_lm
    from tests.tiny import make_tiny_llm

    root = tmp_path_factory.mktemp("tiny-continuous")
    export_causal_lm(make_tiny_llm(root / "hf", layers=2), root / "export", ExportConfig())
    return OnnxCausalLM(root / "export", threads=1)


PROMPTS = ["The city council voted on Tuesday to", "Shares of the company rose",
           "Heavy rain caused flooding in several towns, and officials", "The president said",
           "Scientists announced a new study on climate and ocean temperatures this year."]


def test_continuous_matches_solo_greedy_generation_when_requests_join_at_different_steps(tiny_lm) -> None:
    prompts = [tiny_lm.encode(p) for p in PROMPTS]
    max_tokens = [12, 5, 20, 3, 9]
    solo = [tiny_lm.generate_ids([p], m)[0] for p, m in zip(prompts, max_tokens)]
    b = ContinuousBatcher(tiny_lm, BatcherConfig(max_batch=3, max_prefill_tokens=16))
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    pending = list(range(len(prompts)))
    while pending or b.has_work():
        if pending:
            i = pending.pop(0)
            b.submit(str(i), prompts[i], SamplingParams(max_tokens=max_tokens[i]))
        for ev in b.step():
            got[int(ev.request_id)] += list(ev.token_ids)
    assert [got[i] for i in range(len(prompts))] == solo
    assert b.stats()["joined_running"] >= 2


def test_continuous_samples_same_tokens_when_seeded_request_runs_alone_or_in_batch(tiny_lm) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)

    def run(others: int) -> list[int]:
        b = ContinuousBatcher(tiny_lm, BatcherConfig(max_batch=4))
        for k in range(others):
            b.submit(f"o{k}", tiny_lm.encode(PROMPTS[k]), SamplingParams(max_tokens=8, temperature=1.0, seed=k))
        b.submit("me", tiny_lm.encode(PROMPTS[4]), params)
        return [t for e in _drain(b)["me"] for t in e.token_ids]

    alone = run(0)
    assert run(3) == alone and len(alone) == 10
    b = ContinuousBatcher(tiny_lm)
    b.submit("other-seed", tiny_lm.encode(PROMPTS[4]), SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [t for e in _drain(b)["other-seed"] for t in e.token_ids] != alone
