"""The pipeline's exceptions, in one place.

`InputError` and its subclasses are what a person must fix: a param, a Variable, the landing's content,
the blueprint, a refused `force`, or a run whose figures need a look. A task that raises one fails at once,
without Airflow retries: a retry would meet the same input and fail the same way. Every message says what
and where (the file, row, field or param).

The others may pass on a retry: an object store failing (`LandingError`), delivery stopped part-way
(`DeliveryError`), outcomes that do not add up (`OutcomeError`, a bug to report).
"""

from __future__ import annotations


class InputError(ValueError):
    """Base of every error a person must fix; the message says what and where."""


class ParamError(InputError):
    """A run parameter or Variable the pipeline cannot use."""


class WindowError(InputError):
    """A window the pipeline cannot run."""


class BlueprintError(InputError):
    """A blueprint file that cannot be used; the message names the file and the key."""


class LandingError(RuntimeError):
    """The landing cannot be read as the window needs: names the file and says how to fix it."""


class LandingInputError(InputError, LandingError):
    """A problem with the landing's content (missing, corrupt, unusable columns) that a retry cannot fix;
    a plain LandingError (an object store's I/O failing) may pass on a retry."""


class ForceRefused(InputError):
    """`force` cannot replay a chunk without risking duplicates (its key expired, or its bytes are gone)."""


class RunProblems(InputError):
    """The run finished, but its figures need a person's attention (a threshold tripped, delivery stopped
    part-way, the run stopped before delivery). The message lists every problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class DeliveryError(RuntimeError):
    """Delivery cannot go on; the message says why and what to do. The ledger stays consistent."""


class DeliveryTimeout(DeliveryError):
    """The delivery ran out of time with jobs still processing; a re-run polls them (no resubmission)."""


class OutcomeError(RuntimeError):
    """The outcomes of a run do not account for every input row exactly once."""
