"""The provider's errors. Messages never contain the API key.

Every error is constructible from its message alone, as Airflow re-creates exceptions from their string.
`AirflowFailException` subclasses fail the task without Airflow's retries: retrying cannot help them.
"""

from __future__ import annotations

from typing import Any

import orjson
from airflow.sdk.exceptions import AirflowException, AirflowFailException

# FullStory's troubleshooting words (401 and 404), used by the errors below and the connection Test button.
INVALID_KEY = "Invalid API key: regenerate the Server API key in Settings > API Keys"
WRONG_REGION = "Wrong data region: confirm data_region (na1 vs eu1) matches your org's region"


class FullStoryError(AirflowException):
    """An answer or failure from FullStory: `status` (HTTP status or None), `code` and `message` (the
    fields of FullStory's error body; `message` falls back to the exception's text)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "", detail: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = detail or message


class FullStoryConfigError(AirflowFailException):
    """The connection is unusable as configured (missing field, regions that disagree). Not retried."""


class FullStoryAuthError(AirflowFailException, FullStoryError):
    """401: the key is wrong or revoked. Retrying cannot help, so the task fails without Airflow retries."""


class FullStoryNotFoundError(AirflowFailException, FullStoryError):
    """404 on a route that exists: almost always the wrong data region for the org."""


class FullStoryForbiddenError(AirflowFailException, FullStoryError):
    """403: the key is valid but may not do this (FullStory wants an Admin or Architect key)."""


class FullStoryRequestError(FullStoryError):
    """A final 4xx other than 401/403/404 (bad body, too large). The hook's `refused_error`: delivery
    records the chunk as refused, the task goes on."""


class FullStoryRetryError(FullStoryError):
    """Retries exhausted (5xx, 429, timeouts). Airflow's own task retries may still succeed later."""


# ---- FullStory's error answers -------------------------------------------------------------------------


def error_fields(response: Any) -> tuple[str, str]:
    """`code` and `message` of FullStory's error body (a requests Response); the text's start if not JSON."""
    try:
        data = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        return "", response.text[:200]
    if not isinstance(data, dict):
        return "", ""
    return str(data.get("code") or ""), str(data.get("message") or "")[:500]


def answer_error(
    status: int, code: str, message: str, where: str, data_region: str, base_url: str
) -> FullStoryError:
    """The narrow error for a final 4xx answer to `where` ("METHOD /path"), saying what to fix."""
    said = f"FullStory answered {status} {code}: {message}".rstrip(": ")
    if status == 401:
        return FullStoryAuthError(f"{INVALID_KEY} ({said})", status=status, code=code, detail=message)
    if status == 404:
        return FullStoryNotFoundError(
            f"{where}: {said}. Check data_region ({data_region}, base URL "
            f"{base_url}) against your org's region (na1 vs eu1): the org id's suffix shows it",
            status=status,
            code=code,
            detail=message,
        )
    if status == 403:
        return FullStoryForbiddenError(
            f"{where}: {said}. The key may not do this: use a Server API key with the Admin or "
            "Architect role (Settings > API Keys)",
            status=status,
            code=code,
            detail=message,
        )
    return FullStoryRequestError(f"{where}: {said}", status=status, code=code, detail=message)
