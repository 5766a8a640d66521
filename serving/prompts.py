"""Prompt templates with token budgets, prompt compression, and tokens saved at equal quality.

A template renders an instruction, few-shot examples and the user input into one prompt and
counts its tokens with the served model's tokenizer; a prompt over the budget is trimmed by the
template's policy or refused with ``PromptBudgetError`` (naming the budget and the count).
Compression passes shrink a template; ``measure_tokens_saved`` keeps only the passes that leave
answer quality on a small shipped task set unchanged:

    tpl = PromptTemplate.capital_qa()
    prompt = tpl.render("What is the capital of Peru?", lm).text        # lm: OnnxCausalLM or a tokenizer
    report = measure_tokens_saved(lm, tpl, ("whitespace", "dedupe_examples", "short_instruction"))
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np

from tasks.errors import ConfigError, InvalidRequest, PromptBudgetError

Overflow = Literal["refuse", "drop_examples", "truncate_input"]


class Tokenizer(Protocol):
    """Anything with ``encode(text)``: ``OnnxCausalLM`` (ids list) or ``tokenizers.Tokenizer`` (``Encoding``)."""

    def encode(self, text: str) -> Any: ...


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Tokens ``text`` costs with ``tokenizer`` (special tokens not added where the tokenizer allows)."""
    return len(_ids(tokenizer, text))


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    try:
        out = tokenizer.encode(text, add_special_tokens=False)  # tokenizers / transformers
    except TypeError:
        out = tokenizer.encode(text)  # OnnxCausalLM.encode never adds special tokens
    return list(getattr(out, "ids", out))


@dataclass(frozen=True)
class Example:
    """One few-shot demonstration."""

    input: str
    output: str


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt ready to send.

    Attributes:
        text: the prompt.
        tokens: its token count.
        budget: the template's budget.
        dropped_examples: few-shot examples left out to fit the budget.
        truncated_input_tokens: input tokens cut to fit the budget.
    """

    text: str
    tokens: int
    budget: int
    dropped_examples: int = 0
    truncated_input_tokens: int = 0


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction, few-shot examples and a slot for the input, with a token budget.

    Args:
        name: names the template in errors and reports.
        instruction: text before the examples (a system prompt).
        examples: few-shot demonstrations, in order (default none).
        example_format: how an example is written; ``{input}`` and ``{output}`` are filled in
            (default ``"Q: {input}\\nA: {output}\\n"``).
        query_format: how the input is written; ``{input}`` is filled in (default ``"Q: {input}\\nA:"``).
        separator: between the instruction, the examples block and the query (default ``"\\n"``).
        budget: most prompt tokens; keep ``budget + max_tokens`` within the model's context (default 512).
        overflow: over budget, ``refuse`` raises ``PromptBudgetError``; ``drop_examples`` leaves out
            examples from the first one on, then refuses; ``truncate_input`` drops examples, then cuts
            the input's tail (default ``refuse``).
        short_instruction: a shorter instruction the ``short_instruction`` pass may swap in (default None).
    """

    name: str
    instruction: str
    examples: tuple[Example, ...] = ()
    example_format: str = "Q: {input}\nA: {output}\n"
    query_format: str = "Q: {input}\nA:"
    separator: str = "\n"
    budget: int = 512
    overflow: Overflow = "refuse"
    short_instruction: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(Example(*e) if isinstance(e, (tuple, list)) else e
                                                   for e in self.examples))
        if not self.name:
            raise ConfigError("prompt_template.name", self.name, "must be non-empty")
        if self.budget < 1:
            raise ConfigError(f"prompt_template[{self.name}].budget", self.budget, "must be >= 1")
        if self.overflow not in ("refuse", "drop_examples", "truncate_input"):
            raise ConfigError(f"prompt_template[{self.name}].overflow", self.overflow,
                              "must be refuse, drop_examples or truncate_input")
        if "{input}" not in self.query_format:
            raise ConfigError(f"prompt_template[{self.name}].query_format", self.query_format, "needs {input}")
        if "{input}" not in self.example_format or "{output}" not in self.example_format:
            raise ConfigError(f"prompt_template[{self.name}].example_format", self.example_format,
                              "needs {input} and {output}")

    # -- rendering -------------------------------------------------------------------------
    def text(self, user_input: str, examples: Sequence[Example] | None = None) -> str:
        """The prompt for ``user_input`` with ``examples`` (default: all of the template's)."""
        shots = self.examples if examples is None else examples
        parts = [self.instruction] if self.instruction else []
        if shots:
            parts.append("".join(self.example_format.format(input=e.input, output=e.output) for e in shots))
        parts.append(self.query_format.format(input=user_input))
        return self.separator.join(parts)

    def render(self, user_input: str, tokenizer: Tokenizer) -> RenderedPrompt:
        """The prompt for ``user_input``, within the budget as the overflow policy allows.

        Raises:
            InvalidRequest: the input is empty.
            PromptBudgetError: over budget and the policy cannot (or may not) make it fit.
        """
        if not user_input or not user_input.strip():
            raise InvalidRequest(f"template {self.name!r}: empty input")
        text = self.text(user_input)
        n = count_tokens(tokenizer, text)
        if n <= self.budget:
            return RenderedPrompt(text, n, self.budget)
        if self.overflow == "refuse":
            raise PromptBudgetError(self.name, self.budget, n, "overflow policy is 'refuse'")
        shots = list(self.examples)
        dropped = 0
        while shots and n > self.budget:
            shots.pop(0)
            dropped += 1
            text = self.text(user_input, shots)
            n = count_tokens(tokenizer, text)
        if n <= self.budget:
            return RenderedPrompt(text, n, self.budget, dropped_examples=dropped)
        if self.overflow == "drop_examples":
            raise PromptBudgetError(self.name, self.budget, n, f"still over after dropping all {dropped} examples")
        ids = _ids(tokenizer, user_input)
        fixed = n - len(ids)  # what the prompt costs around the input (approximately: merges at the seams)
        keep = self.budget - fixed
        while keep > 0:
            cut = _decode_prefix(tokenizer, user_input, ids, keep)
            text = self.text(cut, shots)
            n = count_tokens(tokenizer, text)
            if n <= self.budget:
                return RenderedPrompt(text, n, self.budget, dropped_examples=dropped,
                                      truncated_input_tokens=len(ids) - keep)
            keep -= max(1, n - self.budget)
        raise PromptBudgetError(self.name, self.budget, n, "the template alone, without input, exceeds the budget")

    def tokens(self, user_input: str, tokenizer: Tokenizer) -> int:
        """Tokens of the untrimmed prompt for ``user_input``."""
        return count_tokens(tokenizer, self.text(user_input))

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def capital_qa(cls, budget: int = 512, overflow: Overflow = "refuse") -> "PromptTemplate":
        """A deliberately wordy few-shot template of the kind that accumulates in production:
        padded whitespace, a long instruction, and a demonstration pasted twice."""
        instruction = ("You are   a helpful,  knowledgeable and   precise assistant.\n\n\n"
                       "Your task is to answer    the question that follows.   Please read the question "
                       "carefully, think about it, and then give only the short answer, with no explanation, "
                       "no extra words and no punctuation at the end.   \n\n"
                       "Here are some examples of questions   and their correct answers:   \n\n")
        shots = (Example("What is the capital of France?", "Paris"),
                 Example("What is the capital of Japan?", "Tokyo"),
                 Example("What is the  capital of   France?", "Paris"),
                 Example("What is the capital of Italy?", "Rome"),
                 Example("What is the capital of Japan? ", "Tokyo"))
        return cls(name="capital_qa", instruction=instruction, examples=shots,
                   example_format="Question:   {input}\nAnswer: {output}\n\n",
                   query_format="Question:   {input}\nAnswer:", separator="\n\n", budget=budget, overflow=overflow,
                   short_instruction="Answer with the name only.")


def _decode_prefix(tokenizer: Tokenizer, text: str, ids: list[int], keep: int) -> str:
    """The first ``keep`` tokens of ``text`` as text (by characters when the tokenizer cannot decode)."""
    decode = getattr(tokenizer, "decode", None)
    if decode is not None:
        return decode(ids[:keep])
    return text[: max(1, len(text) * keep // max(1, len(ids)))]


# -- compression passes ---------------------------------------------------------------------------
_SPACES = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{3,}")


def _squeeze(s: str) -> str:
    s = _SPACES.sub(" ", s)
    s = "\n".join(line.strip() for line in s.split("\n"))
    return _BLANKS.sub("\n\n", s).strip()


def collapse_whitespace(t: PromptTemplate) -> PromptTemplate:
    """Runs of spaces to one, lines stripped, blank-line runs to one blank line.

    The layout the formats give (one blank line between examples) is kept: the model reads the
    structure, and changing it changes answers more than the tokens it costs.
    """
    return replace(t, instruction=_squeeze(t.instruction),
                   examples=tuple(Example(_squeeze(e.input), _squeeze(e.output)) for e in t.examples),
                   example_format=_SPACES.sub(" ", t.example_format),
                   query_format=_SPACES.sub(" ", t.query_format))


def dedupe_examples(t: PromptTemplate) -> PromptTemplate:
    """Drop examples whose input repeats an earlier one (ignoring case and whitespace)."""
    seen: set[str] = set()
    kept = []
    for e in t.examples:
        key = " ".join(e.input.split()).casefold()
        if key not in seen:
            seen.add(key)
            kept.append(e)
    return replace(t, examples=tuple(kept))


def short_instruction(t: PromptTemplate) -> PromptTemplate:
    """Swap in the template's shorter instruction variant (unchanged when it has none)."""
    return replace(t, instruction=t.short_instruction) if t.short_instruction else t


PASSES: dict[str, Callable[[PromptTemplate], PromptTemplate]] = {
    "whitespace": collapse_whitespace,
    "dedupe_examples": dedupe_examples,
    "short_instruction": short_instruction,
}


def compress(t: PromptTemplate, passes: Sequence[str]) -> PromptTemplate:
    """``t`` with ``passes`` applied in order.

    Raises:
        ConfigError: an unknown pass name.
    """
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ConfigError("prompt.compress.passes", unknown, f"known passes: {sorted(PASSES)}")
    for p in passes:
        t = PASSES[p](t)
    return t


# -- quality at equal footing ----------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A question with its reference answer and the choices it is ranked against."""

    input: str
    answer: str
    choices: tuple[str, ...] = field(default=())


# Shipped task set for the capital_qa template: none of these is among its few-shot examples.
CAPITAL_TASKS: tuple[Task, ...] = tuple(
    Task(f"What is the capital of {country}?", answer, choices)
    for country, answer, choices in (
        ("Germany", "Berlin", ("Berlin", "Munich", "Vienna", "Madrid")),
        ("Spain", "Madrid", ("Madrid", "Barcelona", "Lisbon", "Rome")),
        ("England", "London", ("London", "Paris", "Dublin", "Manchester")),
        ("Russia", "Moscow", ("Moscow", "Kiev", "Warsaw", "Berlin")),
        ("China", "Beijing", ("Beijing", "Shanghai", "Tokyo", "Seoul")),
        ("Egypt", "Cairo", ("Cairo", "Athens", "Baghdad", "Tunis")),
        ("Canada", "Ottawa", ("Ottawa", "Toronto", "Washington", "London")),
        ("Greece", "Athens", ("Athens", "Rome", "Cairo", "Sofia")),
        ("Portugal", "Lisbon", ("Lisbon", "Madrid", "Porto", "Paris")),
        ("Austria", "Vienna", ("Vienna", "Berlin", "Prague", "Zurich")),
        ("Sweden", "Stockholm", ("Stockholm", "Oslo", "Helsinki", "Copenhagen")),
        ("Ireland", "Dublin", ("Dublin", "London", "Belfast", "Edinburgh")),
    ))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score_task(lm, prompt: str, task: Task) -> dict[str, float]:
    """Reference-answer log-likelihood and whether the answer outranks the other choices.

    The prompt runs once; each choice (with a leading space, as the answer follows ``A:``) is
    scored from the prompt's KV state.

    Returns:
        ``answer_logprob`` (mean per answer token), ``correct`` (1.0 when the answer has the
        highest total log-probability among the choices, or is the only choice).
    """
    ids = lm.encode(prompt)
    n = len(ids)
    mask = np.ones((1, n), np.int64)
    logits, past = lm.forward(np.asarray([ids], np.int64), mask, np.arange(n, dtype=np.int64)[None],
                              lm.empty_past(1))
    last = _log_softmax(logits[0, -1])
    scores = {}
    for choice in dict.fromkeys((task.answer,) + tuple(task.choices)):
        cids = lm.encode(" " + choice)
        total = float(last[cids[0]])
        if len(cids) > 1:
            m = len(cids) - 1
            out, _ = lm.forward(np.asarray([cids[:-1]], np.int64), np.ones((1, n + m), np.int64),
                                np.arange(n, n + m, dtype=np.int64)[None], past)
            lp = _log_softmax(out[0])
            total += float(sum(lp[i, cids[i + 1]] for i in range(m)))
        scores[choice] = (total, len(cids))
    best = max(scores, key=lambda c: scores[c][0])
    total, k = scores[task.answer]
    return {"answer_logprob": total / k, "correct": float(best == task.answer)}


def evaluate_template(lm, template: PromptTemplate, tasks: Sequence[Task]) -> dict[str, float]:
    """Mean prompt tokens, accuracy and reference-answer log-likelihood of ``template`` on ``tasks``."""
    rows = [(template.tokens(t.input, lm), score_task(lm, template.text(t.input), t)) for t in tasks]
    return {"prompt_tokens": float(np.mean([n for n, _ in rows])),
            "accuracy": float(np.mean([s["correct"] for _, s in rows])),
            "answer_logprob": float(np.mean([s["answer_logprob"] for _, s in rows]))}


def same_quality(candidate: dict[str, float], reference: dict[str, float], logprob_tolerance: float) -> bool:
    """Equal quality: no lower accuracy, and mean answer log-likelihood at most ``logprob_tolerance`` lower."""
    return (candidate["accuracy"] >= reference["accuracy"]
            and candidate["answer_logprob"] >= reference["answer_logprob"] - logprob_tolerance)


def measure_tokens_saved(lm, template: PromptTemplate, passes: Sequence[str] = tuple(PASSES),
                         tasks: Sequence[Task] = CAPITAL_TASKS, logprob_tolerance: float = 0.05) -> dict[str, Any]:
    """Apply ``passes`` one by one, keeping each only if quality stays equal to the uncompressed template.

    Quality is measured on ``tasks`` with the model itself: accuracy of ranking the reference
    answer above the other choices, and the mean per-token log-likelihood of the reference answer
    (see ``same_quality``). Token counts use the model's tokenizer.

    Args:
        lm: the served model (``OnnxCausalLM``: ``encode``, ``forward``, ``empty_past``).
        template: the template as written.
        passes: compression passes to try, in order (default all of ``PASSES``).
        tasks: the task set (default ``CAPITAL_TASKS``, for ``PromptTemplate.capital_qa``).
        logprob_tolerance: largest drop of the mean answer log-likelihood, in nats per token, that
            still counts as equal (default 0.05).

    Returns:
        ``tokens_full``, ``tokens_compressed`` (mean prompt tokens), ``tokens_saved_ratio``
        (1 - compressed/full, at equal quality), ``accepted``/``rejected`` passes, ``quality``
        (full and compressed: accuracy, answer_logprob), ``tried`` (per pass: tokens, quality,
        kept), ``tasks``, ``seconds``.
    """
    compress(template, passes)  # unknown names fail before any model work
    t0 = time.perf_counter()
    base = evaluate_template(lm, template, tasks)
    current, current_q = template, base
    accepted, rejected, tried = [], [], []
    for name in passes:
        cand = PASSES[name](current)
        q = evaluate_template(lm, cand, tasks)
        keep = q["prompt_tokens"] < current_q["prompt_tokens"] and same_quality(q, base, logprob_tolerance)
        tried.append({"pass": name, "kept": keep, **{k: round(v, 4) for k, v in q.items()}})
        if keep:
            current, current_q = cand, q
            accepted.append(name)
        else:
            rejected.append(name)
    saved = 1.0 - current_q["prompt_tokens"] / base["prompt_tokens"]
    return {"tokens_full": round(base["prompt_tokens"], 2), "tokens_compressed": round(current_q["prompt_tokens"], 2),
            "tokens_saved_ratio": round(saved, 4), "accepted": accepted, "rejected": rejected,
            "quality": {"full": {k: round(base[k], 4) for k in ("accuracy", "answer_logprob")},
                        "compressed": {k: round(current_q[k], 4) for k in ("accuracy", "answer_logprob")},
                        "logprob_tolerance": logprob_tolerance},
            "tried": tried, "tasks": len(tasks), "seconds": round(time.perf_counter() - t0, 2)}
