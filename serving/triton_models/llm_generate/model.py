"""Triton python-backend model: batched text generation with onnxruntime.

Runs inside the Triton python stub with the serving environment (numpy<2, onnxruntime,
tokenizers): it must not import ``serving`` or ``tasks``. The repository writer copies
``generator.py`` beside this file in each version folder.

    inputs : text_input TYPE_STRING [1]; optional max_tokens TYPE_INT32 [1], temperature TYPE_FP32 [1]
    output : text_output TYPE_STRING [1]
    params : intra_op_threads, default_max_tokens, max_tokens_limit, execution_providers (config.pbtxt)
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
try:
    from generator import OnnxCausalLM  # the copy in this version folder
except ImportError:  # the source tree, where generator.py lives in serving/runtime (unit tests)
    from serving.runtime.generator import OnnxCausalLM


class RequestError(ValueError):
    """A problem with one request: it gets an error response, the rest of the batch carries on."""


@dataclass(frozen=True)
class Row:
    request: int  # index of the request in the execute() call
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float


def _param(cfg: dict, key: str, default: str) -> str:
    return cfg.get("parameters", {}).get(key, {}).get("string_value", default) or default


class TritonPythonModel:
    """Greedy/sampled generation; one batched decode per temperature group per ``execute``."""

    NAME = "llm_generate"  # in log lines; llm_early_exit subclasses this model

    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        names = _param(cfg, "execution_providers", "CPUExecutionProvider").split(",")
        providers = [p.strip() for p in names if p.strip()]
        lm = OnnxCausalLM(version_dir, threads=int(_param(cfg, "intra_op_threads", "1")), providers=providers)
        self.setup(lm, default_max_tokens=int(_param(cfg, "default_max_tokens", "16")),
                   max_tokens_limit=int(_param(cfg, "max_tokens_limit", "256")))
        # One real step at load time: a graph that parses but cannot run fails the load, not a user request.
        self.lm.generate_ids([[self.lm.meta.pad_token_id]], max_new_tokens=1)
        pb_utils.Logger.log_info(f"llm_generate {args['model_name']} v{args['model_version']}: "
                                 f"{self.lm.meta.num_layers} layers, {self.lm.meta.max_positions} positions, "
                                 f"providers {providers}")

    def setup(self, lm, default_max_tokens: int = 16, max_tokens_limit: int = 256) -> None:
        """Everything ``initialize`` decides, callable with any generator (tests use a fake one)."""
        self.lm = lm
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit

    # -- request parsing -------------------------------------------------------------------
    def _optional(self, request, name: str, rows: int, default, cast):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return [default] * rows
        values = t.as_numpy().reshape(-1)
        if values.size != rows:
            raise RequestError(f"{name} has {values.size} values for {rows} prompts")
        return [cast(v) for v in values]

    def parse(self, index: int, request) -> list[Row]:
        """The rows of one request (a request may itself carry a batch of prompts).

        Raises:
            RequestError: empty prompt, bad max_tokens/temperature, or too long for the model.
        """
        texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        max_tokens = self._optional(request, "max_tokens", len(texts), self.default_max_tokens, int)
        temps = self._optional(request, "temperature", len(texts), 0.0, float)
        rows = []
        for raw, mt, temp in zip(texts, max_tokens, temps):
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError as e:
                raise RequestError(f"text_input is not UTF-8: {e}") from e
            ids = self.lm.encode(text)
            if not ids:
                raise RequestError("empty prompt: text_input must contain at least one token")
            if not 1 <= mt <= self.max_tokens_limit:
                raise RequestError(f"max_tokens={mt} must be in [1, {self.max_tokens_limit}]")
            if not math.isfinite(temp) or temp < 0:
                raise RequestError(f"temperature={temp} must be a finite number >= 0")
            if len(ids) + mt > self.lm.meta.max_positions:
                raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {mt} exceeds the model's "
                                   f"{self.lm.meta.max_positions} positions")
            rows.append(Row(index, tuple(ids), mt, temp))
        return rows

    # -- execution -------------------------------------------------------------------------
    def run(self, rows: list[Row]) -> dict[int, list[str] | Exception]:
        """Generate for every row; returns per request its texts (in row order) or its error.

        Rows are grouped by temperature only, because the sampler takes one temperature per
        step. Within a group every row decodes up to the group's largest ``max_tokens`` and is
        cut to its own afterwards: one decode loop over the whole batch costs about as much as
        the longest request alone, while splitting by ``max_tokens`` would run a separate loop
        per distinct value. Greedy output is a prefix property, so cutting gives exactly what
        the row would get alone. Short requests do wait for the longest one; continuous
        batching (issue 4) is what lets them leave early.
        """
        groups: dict[float, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.temperature, []).append(i)
        texts: dict[int, str] = {}
        failed: dict[int, Exception] = {}
        for temp, members in groups.items():
            longest = max(rows[i].max_tokens for i in members)
            try:
                out = self.lm.generate_ids([list(rows[i].prompt_ids) for i in members], longest, temperature=temp)
            except Exception as e:  # an onnxruntime failure fails this group's requests, not the server
                pb_utils.Logger.log_error(f"{self.NAME}: batch of {len(members)} failed: {e!r}")
                for i in members:
                    failed.setdefault(rows[i].request, e)
                continue
            for i, ids in zip(members, out):
                texts[i] = self.lm.decode(ids[: rows[i].max_tokens])
        result: dict[int, list[str] | Exception] = {}
        for i, row in enumerate(rows):
            if row.request in failed:
                result[row.request] = failed[row.request]
            else:
                result.setdefault(row.request, []).append(texts[i])  # type: ignore[union-attr]
        return result

    def execute(self, requests):
        rows: list[Row] = []
        errors: dict[int, Exception] = {}
        for index, request in enumerate(requests):
            try:
                rows += self.parse(index, request)
            except RequestError as e:
                errors[index] = e
        results = self.run(rows) if rows else {}
        responses = []
        for index in range(len(requests)):
            outcome = errors.get(index) or results.get(index, [])
            if isinstance(outcome, Exception):
                # pb_utils.TritonError goes back to that client only; the stub and the server stay up.
                bad_input = isinstance(outcome, RequestError)
                code = pb_utils.TritonError.INVALID_ARG if bad_input else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(outcome).__name__}: {outcome}", code)))
                continue
            arr = np.array([[t.encode("utf-8")] for t in outcome], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", arr)]))
        return responses

    def finalize(self) -> None:
        self.lm = None
