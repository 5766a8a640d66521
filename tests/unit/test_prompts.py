"""Prompt templates: token budgets and overflow policies, compression passes, and the measurement
that keeps only passes which leave answer quality unchanged."""

from __future__ import annotations

import pytest

import serving.prompts as prompts
from serving.prompts import (CAPITAL_TASKS, Example, PromptTemplate, Task, collapse_whitespace, compress,
                             count_tokens, dedupe_examples, measure_tokens_saved, score_task, short_instruction)
from tasks.errors import ConfigError, InvalidRequest, PromptBudgetError
from tests.unit.test_continuous import TEXT, ScriptLM


class WordTokenizer:
    """One token per whitespace-separated word (encode takes no keyword arguments, like OnnxCausalLM)."""

    def encode(self, text: str) -> list[str]:
        return text.split()

    def decode(self, words) -> str:
        return " ".join(words)


TOK = WordTokenizer()


def _tpl(**kw) -> PromptTemplate:
    base = dict(name="t", instruction="Answer the question.", examples=(Example("one two", "three"),
                                                                         Example("four five", "six")),
                example_format="Q: {input}\nA: {output}\n", query_format="Q: {input}\nA:", budget=100)
    return PromptTemplate(**{**base, **kw})


def test_template_renders_whole_prompt_with_its_token_count_when_within_budget() -> None:
    r = _tpl().render("who won", TOK)
    assert r.text == "Answer the question.\nQ: one two\nA: three\nQ: four five\nA: six\n\nQ: who won\nA:"
    assert r.tokens == count_tokens(TOK, r.text) == 17 and r.dropped_examples == 0


def test_template_refuses_with_budget_and_count_when_prompt_is_over_budget() -> None:
    with pytest.raises(PromptBudgetError, match=r"template 't' has 17 tokens, over its budget of 16 tokens") as e:
        _tpl(budget=16).render("who won", TOK)
    assert (e.value.budget, e.value.count) == (16, 17) and not e.value.retryable


def test_template_drops_first_examples_when_policy_is_drop_examples() -> None:
    r = _tpl(budget=12, overflow="drop_examples").render("who won", TOK)
    assert r.dropped_examples == 1 and r.tokens <= 12 and "four five" in r.text and "one two" not in r.text
    with pytest.raises(PromptBudgetError, match="still over after dropping all 2 examples"):
        _tpl(budget=5, overflow="drop_examples").render("who won", TOK)


def test_template_cuts_input_tail_when_policy_is_truncate_input() -> None:
    r = _tpl(budget=9, overflow="truncate_input").render("a b c d e f g h i j", TOK)
    assert r.tokens <= 9 and r.dropped_examples == 2 and r.truncated_input_tokens > 0
    assert r.text.startswith("Answer the question.\nQ: a b")


def test_template_raises_invalid_request_when_input_is_empty() -> None:
    with pytest.raises(InvalidRequest, match="empty input"):
        _tpl().render("  ", TOK)


@pytest.mark.parametrize("kwargs, where", [({"budget": 0}, "budget"), ({"overflow": "shrug"}, "overflow"),
                                           ({"query_format": "Q:"}, "query_format"), ({"name": ""}, "name")])
def test_template_raises_config_error_when_field_is_invalid(kwargs, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        _tpl(**kwargs)


def test_whitespace_pass_shrinks_padded_template_when_it_has_runs_of_spaces() -> None:
    tpl = PromptTemplate.capital_qa()
    small = collapse_whitespace(tpl)
    text = small.text("What is the capital of Peru?")
    assert "  " not in text and "\n\n\n\n\n" not in text and len(text) < len(tpl.text("What is the capital of Peru?"))
    assert len(small.examples) == len(tpl.examples)


def test_dedupe_pass_drops_repeated_examples_when_they_differ_only_in_whitespace() -> None:
    assert [e.output for e in dedupe_examples(PromptTemplate.capital_qa()).examples] == ["Paris", "Tokyo", "Rome"]


def test_short_instruction_pass_swaps_variant_when_template_has_one() -> None:
    tpl = PromptTemplate.capital_qa()
    assert short_instruction(tpl).instruction == tpl.short_instruction
    assert short_instruction(_tpl()) == _tpl()


def test_compress_raises_config_error_when_pass_is_unknown() -> None:
    with pytest.raises(ConfigError, match="known passes"):
        compress(_tpl(), ["whitespace", "summarise"])


def test_score_task_ranks_answer_from_prompt_kv_state_when_model_predicts_it() -> None:
    lm = ScriptLM(max_positions=256)
    prompt = TEXT[:5]  # the model continues with " world. the end"
    right = score_task(lm, prompt, Task("q", "world", ("earth", "world")))
    assert right["correct"] == 1.0 and right["answer_logprob"] > -1e-3
    wrong = score_task(lm, prompt, Task("q", "earth", ("world",)))
    assert wrong["correct"] == 0.0 and wrong["answer_logprob"] < -10


def test_measure_keeps_only_passes_that_hold_quality_when_one_pass_hurts(monkeypatch) -> None:
    tokens = {"": 100.0, "w": 90.0, "wd": 80.0, "ws": 60.0}
    quality = {"": (0.8, -1.00), "w": (0.8, -0.99), "wd": (0.7, -1.00), "ws": (0.8, -1.04)}

    def fake_eval(lm, template, tasks):
        key = ("w" if "  " not in template.instruction else "") + \
              ("d" if len(template.examples) < 5 else "") + ("s" if template.instruction.startswith("Answer") else "")
        acc, lp = quality[key]
        return {"prompt_tokens": tokens[key], "accuracy": acc, "answer_logprob": lp}

    monkeypatch.setattr(prompts, "evaluate_template", fake_eval)
    report = measure_tokens_saved(None, PromptTemplate.capital_qa(), tasks=CAPITAL_TASKS[:2])
    assert report["accepted"] == ["whitespace", "short_instruction"] and report["rejected"] == ["dedupe_examples"]
    assert report["tokens_saved_ratio"] == pytest.approx(0.4)
    assert report["quality"]["compressed"]["accuracy"] == 0.8


def test_measure_saves_nothing_when_every_pass_lowers_quality(monkeypatch) -> None:
    calls = iter([0.9] + [0.5] * 3)
    monkeypatch.setattr(prompts, "evaluate_template",
                        lambda lm, t, tasks: {"prompt_tokens": 100.0 - len(t.instruction) % 7, "accuracy": next(calls),
                                              "answer_logprob": -1.0})
    report = measure_tokens_saved(None, PromptTemplate.capital_qa(), tasks=CAPITAL_TASKS[:1])
    assert report["accepted"] == [] and report["tokens_saved_ratio"] == 0.0
