"""FullStoryHook: the FullStory Server API (v2) over a pooled requests Session, with a bounded retry policy.

The connection's fields and how they are checked: connection.py. The errors: exceptions.py. Which answers
are retried and how long to wait: retry.py.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any
from urllib.parse import quote

import orjson
import requests
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException
from requests.adapters import HTTPAdapter

from fullstory_provider.connection import (
    FullStorySettings,
    KeyAuth,
    resolve_settings,
    scrub_key,
    ui_field_behaviour,
)
from fullstory_provider.exceptions import (
    INVALID_KEY,
    WRONG_REGION,
    FullStoryAuthError,
    FullStoryConfigError,
    FullStoryError,
    FullStoryNotFoundError,
    FullStoryRequestError,
    FullStoryRetryError,
    answer_error,
    error_fields,
)
from fullstory_provider.retry import RetryPolicy, retry_after_seconds, retryable

BATCH_KINDS = ("events", "users")


# ---- the hook ------------------------------------------------------------------------------------------


class FullStoryHook(BaseHook):
    """Typed calls to FullStory's Server API: batch import jobs for events and users, single events and
    user upserts, user deletion, `GET /me`. Counts requests, retries and status codes for the run's stats.

    :param fullstory_conn_id: the Airflow connection (its fields: connection.py)
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
        session.auth = KeyAuth(self.settings.api_key)
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
            if not retryable(outcome):
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
        except ValueError as exc:  # requests' own header checks: their message quotes the header (the key)
            raise FullStoryConfigError(
                f"{method} {url}: the request could not be built: {self._scrub(f'{type(exc).__name__}: {exc}')}"
            ) from None
        self.status_counts[str(response.status_code)] += 1
        return response

    def _describe(self, outcome: requests.Response | BaseException) -> str:
        if isinstance(outcome, BaseException):
            return self._scrub(f"{type(outcome).__name__}: {outcome}")
        code, message = error_fields(outcome)
        return self._scrub(f"HTTP {outcome.status_code} {code}: {message}".rstrip(": "))

    def _scrub(self, text: str) -> str:
        return scrub_key(text, self.settings.api_key)

    def _check(self, response: requests.Response, method: str, path: str) -> requests.Response:
        """The response when it is not an error; else the narrow error for its final 4xx."""
        if response.status_code < 400:
            return response
        code, message = (self._scrub(part) for part in error_fields(response))
        where = f"{method} {path}"
        raise answer_error(
            response.status_code, code, message, where, self.settings.data_region, self.base_url
        )

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

    def get_batch_status(self, kind: str, job_id: str) -> dict[str, Any]:
        """GET /v2/<kind>/batch/<job_id> -> {"imports", "errors", "job": {"id", "status", ...}}."""
        return self._json(self._request("GET", f"/v2/{self._kind(kind)}/batch/{quote(job_id, safe='')}"))

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

    def delete_user(self, uid: str) -> dict[str, Any]:
        """DELETE /v2/users?uid=<uid>: FullStory deletes the user and all its data (a right-to-erasure
        request). Retried like every call (429, 5xx, timeouts); 401/403/404 raise the typed errors. Deleting
        is idempotent, so a retry after a lost answer is harmless."""
        if not isinstance(uid, str) or not uid.strip():
            raise ValueError("delete_user needs a non-empty uid")
        return self._json(self._request("DELETE", "/v2/users", params={"uid": uid}))

    def whoami(self) -> dict[str, Any]:
        """GET /me -> {"email", "orgId", "role"}: who the key belongs to."""
        return self._json(self._request("GET", "/me"))

    def test_connection(self) -> tuple[bool, str]:
        """The connection form's Test button: resolve the connection, call GET /me, compare the org ids.
        A refusal is answered in FullStory's troubleshooting words: 401, the key is wrong or revoked; 404,
        the org is not in this region. Nothing here ever shows the key."""
        try:
            me = self.whoami()
        except FullStoryAuthError:
            return False, f"{INVALID_KEY} (FullStory answered 401 to GET /me: the key is wrong or revoked)"
        except FullStoryNotFoundError:
            settings = self.settings
            return False, (
                f"{WRONG_REGION} (FullStory answered 404, org not found, to GET /me at {settings.base_url}; "
                f"this connection says data_region {settings.data_region})"
            )
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
        return ui_field_behaviour()
