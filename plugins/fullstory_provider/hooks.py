"""FullStoryHook: the FullStory Server API (v2) over a pooled requests Session, with a bounded retry policy.

Connection (`fullstory_default`, conn_type `http` or `fullstory`):
  password           Server API key, sent verbatim as `Authorization: Basic <key>`
  extra.org_id       required, e.g. o-1A2B3C-na1
  extra.data_region  na1 (default) | eu1
  host               optional base URL replacing the regional one (local emulator, proxy)
  extra.ca_bundle    optional CA bundle path (requests' `verify`)
  extra.connect_timeout / extra.read_timeout   optional, seconds

The connection is read when first used (never at DAG parse time or in __init__), and checked before the
first request: a key, org id and data_region that name different regions are refused with the reason.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
import requests
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase


REGIONS = {
    "na1": ("https://api.fullstory.com", "https://app.fullstory.com"),
    "eu1": ("https://api.eu1.fullstory.com", "https://app.eu1.fullstory.com"),
}
DEFAULT_REGION = "na1"
BATCH_KINDS = ("events", "users")
_KEY_PREFIX = re.compile(r"^([a-z]{2}\d)\.")
_ORG_SUFFIX = re.compile(r"-([a-z]{2}\d)$", re.IGNORECASE)
_LOOPBACK = ("127.", "localhost", "[::1]", "0.0.0.0")
INVALID_KEY = "Invalid API key: regenerate the Server API key in Settings > API Keys"


# ---- errors --------------------------------------------------------------------------------------------


class FullStoryError(AirflowException):
    """An answer or failure from FullStory. Messages never contain the API key.

    Constructible from the message alone, as Airflow re-creates exceptions from their string."""

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
    """A final 4xx other than 401/404 (bad body, too large, forbidden)."""


class FullStoryRetryError(FullStoryError):
    """Retries exhausted (5xx, 429, timeouts). Airflow's own task retries may still succeed later."""


# ---- settings from the connection ----------------------------------------------------------------------


@dataclass(frozen=True)
class FullStorySettings:
    api_key: str = field(repr=False)
    org_id: str
    data_region: str
    base_url: str
    verify: bool | str = True
    timeout: tuple[float, float] = (5.0, 60.0)

    @property
    def app_url(self) -> str:
        """The org's FullStory app home, region-aware (the emulator has no UI, so `host` is ignored)."""
        return f"{REGIONS[self.data_region][1]}/ui/{quote(self.org_id, safe='')}/home"


def connection_extra(conn: Any) -> dict[str, Any]:
    extra = conn.extra
    if not extra:
        return {}
    if isinstance(extra, Mapping):
        return dict(extra)
    try:
        parsed = orjson.loads(extra)
    except orjson.JSONDecodeError as exc:
        raise FullStoryConfigError(f"connection {conn.conn_id!r}: extra is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise FullStoryConfigError(f"connection {conn.conn_id!r}: extra must be a JSON object")
    return parsed


def resolve_region(api_key: str, org_id: str, data_region: str | None) -> str:
    """The one data region the key, the org id and data_region agree on; refuse when they disagree."""
    if data_region and data_region not in REGIONS:
        raise FullStoryConfigError(
            f"extra.data_region {data_region!r} is not a FullStory region; use na1 or eu1"
        )
    key_match = _KEY_PREFIX.match(api_key)
    org_match = _ORG_SUFFIX.search(org_id)
    named = {
        "extra.data_region": data_region,
        f"the org id {org_id!r} (suffix)": org_match.group(1).lower() if org_match else None,
        # Only the region prefix of the key is named, never the key. Keys made before Aug 2022 have none.
        "the API key's prefix": key_match.group(1) if key_match else None,
    }
    present = {source: region for source, region in named.items() if region}
    if len(set(present.values())) > 1:
        said = ", ".join(f"{source} says {region}" for source, region in present.items())
        raise FullStoryConfigError(
            f"FullStory data region mismatch: {said}. They must agree: set data_region to your org's region "
            "(the org id's suffix, Settings > FS Setup) and use a Server API key from that org"
        )
    return next(iter(present.values()), DEFAULT_REGION)


def base_url_for(conn: Any, region: str) -> str:
    host = (conn.host or "").strip()
    if not host:
        return REGIONS[region][0]
    if "://" not in host:
        # A host without scheme: the connection's schema if it names one, plain http only for loopback.
        scheme = conn.schema if conn.schema in ("http", "https") else None
        scheme = scheme or ("http" if host.startswith(_LOOPBACK) else "https")
        host = f"{scheme}://{host}"
    parts = urlsplit(host)
    netloc = parts.netloc
    if conn.port and parts.port is None:
        netloc = f"{netloc}:{conn.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def resolve_settings(conn: Any, timeout: tuple[float, float] | None = None) -> FullStorySettings:
    """Connection -> settings, validated. Raises FullStoryConfigError naming the field to fix."""
    extra = connection_extra(conn)
    api_key = (conn.password or "").strip()
    if not api_key:
        raise FullStoryConfigError(
            f"connection {conn.conn_id!r} has no API key: put the FullStory Server API key in its password field"
        )
    org_id = str(extra.get("org_id") or "").strip()
    if not org_id:
        raise FullStoryConfigError(
            f"connection {conn.conn_id!r}: extra.org_id is required (e.g. o-1A2B3C-na1, from Settings > FS Setup)"
        )
    data_region = str(extra.get("data_region") or "").strip().lower() or None
    region = resolve_region(api_key, org_id, data_region)
    verify: bool | str = True
    if extra.get("ca_bundle"):
        verify = str(extra["ca_bundle"])
        if not Path(verify).is_file():
            raise FullStoryConfigError(
                f"connection {conn.conn_id!r}: extra.ca_bundle {verify!r} is not a file"
            )
    timeout = (
        float(extra.get("connect_timeout") or (timeout or (5.0, 60.0))[0]),
        float(extra.get("read_timeout") or (timeout or (5.0, 60.0))[1]),
    )
    return FullStorySettings(api_key, org_id, region, base_url_for(conn, region), verify, timeout)


# ---- retry policy --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # attempts per call, the first included
    max_elapsed: float = 120.0  # seconds per call, sleeps included
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # a Retry-After beyond this is clamped

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt `attempt + 1`: FullStory's Retry-After when it gave one (clamped, plus a
        little jitter so parallel tasks do not return in lockstep), else equal-jitter exponential backoff."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max) + random.uniform(0.0, 0.25)
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)


def _retryable(outcome: requests.Response | BaseException) -> bool:
    """Connection errors, timeouts, 408, 429 and 5xx except 501 (Not Implemented will not change).

    Also 409: FullStory answers it while a request with the same Idempotency-Key is still executing, which
    with our deterministic keys means our own earlier attempt (say, one that timed out) is in progress."""
    if isinstance(outcome, BaseException):
        if isinstance(outcome, requests.exceptions.SSLError):
            return False  # a certificate problem does not heal by waiting
        return isinstance(outcome, requests.ConnectionError | requests.Timeout)
    status = outcome.status_code
    return status in (408, 409, 429) or (status >= 500 and status != 501)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class _KeyAuth(AuthBase):
    """`Authorization: Basic <key>` with the key verbatim (not base64 of `key:`, as FullStory documents)."""

    def __init__(self, api_key: str):
        self._api_key = api_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Basic {self._api_key}"
        return request

    def __repr__(self) -> str:
        return "<FullStory key auth>"


# ---- the hook ------------------------------------------------------------------------------------------


class FullStoryHook(BaseHook):
    """Typed calls to FullStory's Server API: batch import jobs for events and users, single events and
    user upserts, `GET /me`. Counts requests, retries and status codes for the run's stats.

    :param fullstory_conn_id: the Airflow connection (see the module docstring for its fields)
    :param timeout: (connect, read) seconds for every call; the connection's extra may override them
    :param retry: the retry policy for connection errors, timeouts, 408, 429 and 5xx (not 501)
    :param results_wait: seconds to keep asking for a job's imports/errors while FullStory answers 202
    """

    conn_name_attr = "fullstory_conn_id"
    default_conn_name = "fullstory_default"
    conn_type = "fullstory"
    hook_name = "FullStory"
    #: raised by create_batch when FullStory refuses a batch as a whole (delivery's `BatchClient` contract)
    refused_error = FullStoryRequestError

    def __init__(
        self,
        fullstory_conn_id: str = default_conn_name,
        *,
        timeout: tuple[float, float] | None = None,
        retry: RetryPolicy | None = None,
        results_wait: float = 120.0,
        pool_maxsize: int = 8,
    ):
        super().__init__()
        self.fullstory_conn_id = fullstory_conn_id
        self._timeout = timeout
        self.retry = retry or RetryPolicy()
        self.results_wait = results_wait
        self.pool_maxsize = pool_maxsize
        self.status_counts: Counter[str] = Counter()
        self.requests_sent = 0
        self.retries = 0
        self.transport_errors = 0
        self._sleep = time.sleep

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fullstory_conn_id={self.fullstory_conn_id!r})"

    @cached_property
    def connection(self):
        return self.get_connection(self.fullstory_conn_id)

    @cached_property
    def settings(self) -> FullStorySettings:
        settings = resolve_settings(self.connection, self._timeout)
        try:  # keep the key out of task logs even if some library logs it
            from airflow.sdk.log import mask_secret

            mask_secret(settings.api_key)
        except ImportError:  # pragma: no cover - older task SDKs
            pass
        return settings

    @cached_property
    def session(self) -> requests.Session:
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_maxsize, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.auth = _KeyAuth(self.settings.api_key)
        session.verify = self.settings.verify
        session.headers.update(
            {"Accept": "application/json", "User-Agent": "datafly-fullstory/0.1 (airflow)"}
        )
        return session

    def get_conn(self) -> requests.Session:
        return self.session

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    @property
    def app_url(self) -> str:
        return self.settings.app_url

    def close(self) -> None:
        if "session" in self.__dict__:
            self.session.close()

    # ---- HTTP with retries -----------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, body: bytes | None = None, params=None, headers=None
    ) -> requests.Response:
        """One logical call: retried per the policy, then checked (4xx raise the narrow errors)."""
        url = f"{self.base_url}{path}"
        send_headers = (
            {"Content-Type": "application/json", **(headers or {})} if body is not None else headers
        )
        started = time.monotonic()
        for attempt in range(1, self.retry.max_attempts + 1):
            outcome = self._send(method, url, body, params, send_headers)
            if not _retryable(outcome):
                if isinstance(outcome, BaseException):
                    raise FullStoryError(f"{method} {path} failed: {self._describe(outcome)}") from None
                return self._check(outcome, method, path)
            wait = (
                None
                if isinstance(outcome, BaseException)
                else retry_after_seconds(outcome.headers.get("Retry-After"))
            )
            delay = self.retry.delay(attempt, wait)
            spent = time.monotonic() - started
            if attempt == self.retry.max_attempts or spent + delay > self.retry.max_elapsed:
                raise FullStoryRetryError(
                    f"{method} {path}: gave up after {attempt} attempt(s) in {spent:.1f}s; "
                    f"last answer: {self._describe(outcome)}",
                    status=None if isinstance(outcome, BaseException) else outcome.status_code,
                )
            self.retries += 1
            self.log.warning(
                "%s %s: %s; retry %d/%d in %.2fs",
                method,
                path,
                self._describe(outcome),
                attempt,
                self.retry.max_attempts - 1,
                delay,
            )
            self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _send(self, method, url, body, params, headers) -> requests.Response | requests.RequestException:
        self.requests_sent += 1
        try:
            response = self.session.request(
                method,
                url,
                data=body,
                params=params,
                headers=headers,
                timeout=self.settings.timeout,
                # Per request: requests lets REQUESTS_CA_BUNDLE override a Session's verify, not this.
                verify=self.settings.verify,
            )
        except requests.RequestException as exc:
            self.transport_errors += 1
            return exc
        self.status_counts[str(response.status_code)] += 1
        return response

    def _describe(self, outcome: requests.Response | BaseException) -> str:
        if isinstance(outcome, BaseException):
            return self._scrub(f"{type(outcome).__name__}: {outcome}")
        code, message = self._error_fields(outcome)
        return self._scrub(f"HTTP {outcome.status_code} {code}: {message}".rstrip(": "))

    def _scrub(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    @staticmethod
    def _error_fields(response: requests.Response) -> tuple[str, str]:
        try:
            data = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            return "", response.text[:200]
        if not isinstance(data, dict):
            return "", ""
        return str(data.get("code") or ""), str(data.get("message") or "")[:500]

    def _check(self, response: requests.Response, method: str, path: str) -> requests.Response:
        status = response.status_code
        if status < 400:
            return response
        code, message = (self._scrub(part) for part in self._error_fields(response))
        said = f"FullStory answered {status} {code}: {message}".rstrip(": ")
        if status == 401:
            raise FullStoryAuthError(f"{INVALID_KEY} ({said})", status=status, code=code, detail=message)
        if status == 404:
            raise FullStoryNotFoundError(
                f"{method} {path}: {said}. Check data_region ({self.settings.data_region}, base URL "
                f"{self.base_url}) against your org's region (na1 vs eu1): the org id's suffix shows it",
                status=status,
                code=code,
                detail=message,
            )
        if status == 403:
            raise FullStoryForbiddenError(
                f"{method} {path}: {said}. The key may not do this: use a Server API key with the Admin or "
                "Architect role (Settings > API Keys)",
                status=status,
                code=code,
                detail=message,
            )
        raise FullStoryRequestError(f"{method} {path}: {said}", status=status, code=code, detail=message)

    def _json(self, response: requests.Response) -> dict[str, Any]:
        return orjson.loads(response.content) if response.content else {}

    # ---- stats -----------------------------------------------------------------------------------------

    def http_stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests_sent,
            "retries": self.retries,
            "status_counts": dict(self.status_counts),
            "transport_errors": self.transport_errors,
        }

    # ---- typed calls -----------------------------------------------------------------------------------

    @staticmethod
    def _body(payload: bytes | Mapping[str, Any]) -> bytes:
        return payload if isinstance(payload, bytes) else orjson.dumps(payload)

    @staticmethod
    def _kind(kind: str) -> str:
        if kind not in BATCH_KINDS:
            raise ValueError(f"batch kind must be one of {BATCH_KINDS}, not {kind!r}")
        return kind

    def create_batch(
        self, kind: str, body: bytes | Mapping[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        """POST /v2/<kind>/batch -> the job metadata {"id", "status", "created"}."""
        response = self._request(
            "POST",
            f"/v2/{self._kind(kind)}/batch",
            body=self._body(body),
            headers={"Idempotency-Key": idempotency_key},
        )
        job = self._json(response).get("job")
        if not isinstance(job, dict) or not job.get("id"):
            raise FullStoryError(f"POST /v2/{kind}/batch answered {response.status_code} without a job id")
        return job

    def create_events_batch(self, body: bytes | Mapping[str, Any], idempotency_key: str) -> dict[str, Any]:
        return self.create_batch("events", body, idempotency_key)

    def create_users_batch(self, body: bytes | Mapping[str, Any], idempotency_key: str) -> dict[str, Any]:
        return self.create_batch("users", body, idempotency_key)

    def get_batch_status(self, kind: str, job_id: str) -> dict[str, Any]:
        """GET /v2/<kind>/batch/<job_id> -> {"imports", "errors", "job": {"id", "status", ...}}."""
        return self._json(self._request("GET", f"/v2/{self._kind(kind)}/batch/{quote(job_id, safe='')}"))

    def get_events_batch_status(self, job_id: str) -> dict[str, Any]:
        return self.get_batch_status("events", job_id)

    def get_users_batch_status(self, job_id: str) -> dict[str, Any]:
        return self.get_batch_status("users", job_id)

    def iter_batch_results(self, kind: str, job_id: str, view: str) -> Iterator[dict[str, Any]]:
        """Every item of a job's `imports` or `errors`, following next_page_token. While the job is still
        processing FullStory answers 202; wait (bounded by `results_wait`) rather than fail."""
        path = f"/v2/{self._kind(kind)}/batch/{quote(job_id, safe='')}/{view}"
        token, seen_tokens, waited, pause = None, set(), 0.0, 0.5
        while True:
            response = self._request("GET", path, params={"page_token": token} if token else None)
            if response.status_code == 202:
                if waited >= self.results_wait:
                    raise FullStoryRetryError(f"GET {path}: job still processing after {waited:.0f}s")
                self._sleep(pause)
                waited, pause = waited + pause, min(pause * 2, 10.0)
                continue
            page = self._json(response)
            yield from page.get("results") or []
            token = page.get("next_page_token")
            if not token:
                return
            if token in seen_tokens:  # a server repeating a token would loop forever
                raise FullStoryError(f"GET {path}: page token repeated; stopping")
            seen_tokens.add(token)

    def iter_batch_errors(self, kind: str, job_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_batch_results(kind, job_id, "errors")

    def iter_batch_imports(self, kind: str, job_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_batch_results(kind, job_id, "imports")

    def iter_events_batch_imports(self, job_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_batch_results("events", job_id, "imports")

    def iter_events_batch_errors(self, job_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_batch_results("events", job_id, "errors")

    def iter_users_batch_imports(self, job_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_batch_results("users", job_id, "imports")

    def iter_users_batch_errors(self, job_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_batch_results("users", job_id, "errors")

    def create_event(
        self, event: bytes | Mapping[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """POST /v2/events (one event). Without a key one is made up per call, so this call's own retries
        cannot create the event twice."""
        key = idempotency_key or f"dffs-event-{uuid.uuid4()}"
        response = self._request(
            "POST", "/v2/events", body=self._body(event), headers={"Idempotency-Key": key}
        )
        return self._json(response)

    def upsert_user(
        self, user: bytes | Mapping[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """POST /v2/users: create or update (keyed on uid) -> {"id": <FullStory user id>}."""
        key = idempotency_key or f"dffs-user-{uuid.uuid4()}"
        response = self._request("POST", "/v2/users", body=self._body(user), headers={"Idempotency-Key": key})
        return self._json(response)

    def whoami(self) -> dict[str, Any]:
        """GET /me -> {"email", "orgId", "role"}: who the key belongs to."""
        return self._json(self._request("GET", "/me"))

    def test_connection(self) -> tuple[bool, str]:
        """The UI's Test button: resolve the connection, call GET /me, compare the org ids."""
        try:
            me = self.whoami()
        except AirflowException as exc:
            return False, str(exc)
        except Exception as exc:  # the Test button shows any failure as text, without the key
            text = f"{type(exc).__name__}: {exc}"
            return False, self._scrub(text) if "settings" in self.__dict__ else text
        org = me.get("orgId")
        if org and org != self.settings.org_id:
            return False, f"the API key belongs to org {org}, but extra.org_id is {self.settings.org_id}"
        return True, f"Connected to FullStory org {org or self.settings.org_id} ({self.settings.data_region})"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login", "port"],
            "relabeling": {"password": "Server API key", "host": "Base URL override (optional)"},
            "placeholders": {
                "host": "leave empty for api.fullstory.com / api.eu1.fullstory.com",
                "extra": '{"org_id": "o-1A2B3C-na1", "data_region": "na1"}',
            },
        }
