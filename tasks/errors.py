"""The one error hierarchy of trimflow.

Every failure a user can act on is a ``TrimflowError`` subclass whose message names
what is wrong and where (the step, the field, the file). Callers catch
``TrimflowError`` to tell "bad input / failed gate" from a crash.

    raise ConfigError("prune.ratio", 1.2, "must be in [0, 1)")
"""

from __future__ import annotations

from typing import Any


class TrimflowError(Exception):
    """Base class of every error trimflow raises on purpose.

    ``retryable`` tells an orchestrator whether running the same step again could succeed:
    bad input and failed verdicts are final; an unreachable server may come back.
    """

    retryable = False


class ConfigError(TrimflowError, ValueError):
    """A configuration value is invalid; raised before any work starts."""

    def __init__(self, where: str, value: Any, problem: str) -> None:
        self.where, self.value, self.problem = where, value, problem
        super().__init__(f"invalid config {where}={value!r}: {problem}")


class SourceError(TrimflowError):
    """A model or data source cannot be resolved or read."""

    retryable = True  # S3 or the registry may be briefly unreachable


class UnsupportedModelError(TrimflowError):
    """The model architecture is not one trimflow knows how to optimize."""


class DataValidationError(TrimflowError):
    """The data failed its Great Expectations suite.

    Attributes:
        failures: one line per failed expectation.
        report_path: where the full validation result was written.
    """

    def __init__(self, failures: list[str], report_path: str, statistics: dict | None = None) -> None:
        self.failures, self.report_path, self.statistics = failures, report_path, statistics or {}
        stats = ""
        if statistics:
            stats = (f" ({statistics.get('unsuccessful_expectations', len(failures))} of "
                     f"{statistics.get('evaluated_expectations', '?')} expectations failed)")
        lines = "\n  - ".join(failures)
        super().__init__(f"data validation failed{stats}:\n  - {lines}\nfull result: {report_path}")


class QualityGateFailed(TrimflowError):
    """One or more quality gates failed; nothing is registered or deployed."""

    def __init__(self, failures: list[str], report_path: str) -> None:
        self.failures, self.report_path = failures, report_path
        lines = "\n  - ".join(failures)
        super().__init__(f"{len(failures)} quality gate(s) failed:\n  - {lines}\nfull report: {report_path}")


class ExportMismatch(TrimflowError):
    """An exported model disagrees with its PyTorch source beyond the stated tolerance."""


class RegistryError(TrimflowError):
    """The MLflow registry refused or lost an operation."""

    retryable = True


class DeployError(TrimflowError):
    """Deployment or the post-deploy smoke test failed; the previous version keeps serving."""


class RolloutFailed(DeployError):
    """A rollout stopped at a stage and rolled back.

    Attributes:
        report: JSON-able: ``stage``, ``cause``, ``rollback`` notes, ``rollback_ok`` (the previous
            version answers again), ``served_versions``, stage timings and canary counts.
    """

    def __init__(self, message: str, report: dict) -> None:
        self.report = report
        super().__init__(message)


class SloNotMet(TrimflowError):
    """No serving configuration in a search met the latency SLO; nothing was changed.

    Attributes:
        report_path: where the search table (every candidate's measurements) was written.
    """

    def __init__(self, message: str, report_path: str) -> None:
        self.report_path = report_path
        super().__init__(f"{message}\nfull search table: {report_path}")


class ServingError(TrimflowError):
    """The local serving runtime (Triton) could not be started or reached."""

    retryable = True


class InvalidRequest(ServingError, ValueError):
    """A serving request that cannot succeed as sent (a model name with a path separator, an empty
    prompt); raised before anything is sent, and never worth retrying."""

    retryable = False


class PromptBudgetError(InvalidRequest):
    """A rendered prompt has more tokens than its template's budget and the policy is to refuse.

    Attributes:
        template: the template's name.
        budget: the token budget.
        count: tokens the prompt would have had.
    """

    def __init__(self, template: str, budget: int, count: int, detail: str = "") -> None:
        self.template, self.budget, self.count = template, budget, count
        super().__init__(f"prompt for template {template!r} has {count} tokens, over its budget of {budget} tokens"
                         + (f": {detail}" if detail else ""))
