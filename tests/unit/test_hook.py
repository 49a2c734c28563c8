"""The FullStory provider, pure parts: connection -> settings, region checks, retry policy, auth header,
FullStory's error answers -> errors, the hook's batch calls (delivery's BatchClient contract), secrecy.

HTTP behaviour (retries, 401/404, pagination) is tested against the real emulator in
tests/integration/test_delivery.py.
"""

from __future__ import annotations

import email.utils
import importlib
import json
from datetime import UTC, datetime, timedelta

import pytest
import requests
from airflow.sdk import Connection
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from fullstory_provider import get_provider_info
from fullstory_provider.connection import (
    KeyAuth,
    base_url_for,
    connection_destination,
    destination_of,
    resolve_region,
    resolve_settings,
)
from fullstory_provider.exceptions import (
    INVALID_KEY,
    FullStoryAuthError,
    FullStoryConfigError,
    FullStoryError,
    FullStoryForbiddenError,
    FullStoryNotFoundError,
    FullStoryRequestError,
    FullStoryRetryError,
    answer_error,
    error_fields,
)
from fullstory_provider.hooks import FullStoryHook
from fullstory_provider.retry import RetryPolicy, retry_after_seconds, retryable

KEY = "na1.SECRET-unit-key/abcd"


def conn(password=KEY, extra=None, host=None, schema=None, port=None, conn_type="http"):
    extra = {"org_id": "o-1A2B3C-na1", "data_region": "na1"} if extra is None else extra
    return Connection(
        conn_id="fullstory_default",
        conn_type=conn_type,
        password=password,
        host=host,
        schema=schema,
        port=port,
        extra=extra if isinstance(extra, str) else json.dumps(extra),
    )


# ---- regions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "org", "region", "expected"),
    [
        ("na1.k/x", "o-1-na1", "na1", "na1"),
        ("eu1.k/x", "o-1-eu1", "eu1", "eu1"),
        ("eu1.k/x", "o-1-eu1", None, "eu1"),  # data_region omitted: the key and org agree on eu1
        ("legacykey", "o-1-eu1", "eu1", "eu1"),  # keys made before Aug 2022 have no region prefix
        ("legacykey", "o-1A2B3C", None, "na1"),  # nothing names a region: the default
    ],
)
def test_region_agreement(key, org, region, expected):
    assert resolve_region(key, org, region) == expected


@pytest.mark.parametrize(
    ("key", "org", "region", "named"),
    [
        ("na1.k/x", "o-1-na1", "eu1", ["extra.data_region says eu1", "suffix) says na1", "prefix says na1"]),
        ("eu1.k/x", "o-1-na1", "na1", ["prefix says eu1"]),
        ("legacykey", "o-1-eu1", "na1", ["extra.data_region says na1", "suffix) says eu1"]),
    ],
)
def test_region_mismatch_names_each_source(key, org, region, named):
    with pytest.raises(FullStoryConfigError) as info:
        resolve_region(key, org, region)
    message = str(info.value)
    assert "mismatch" in message
    for part in named:
        assert part in message
    assert key not in message


def test_unknown_region_is_refused():
    with pytest.raises(FullStoryConfigError, match="use na1 or eu1"):
        resolve_region("na1.k/x", "o-1-na1", "us1")


# ---- settings from the connection ----------------------------------------------------------------------


def test_settings_from_http_connection():
    settings = resolve_settings(conn())
    assert settings.base_url == "https://api.fullstory.com"
    assert settings.app_url == "https://app.fullstory.com/ui/o-1A2B3C-na1/home"
    assert settings.verify is True
    assert KEY not in repr(settings)


def test_settings_eu1_and_extra_as_dict():
    c = conn(password="eu1.k/x", extra={"org_id": "o-9-eu1", "data_region": "eu1"})
    c.extra = {"org_id": "o-9-eu1", "data_region": "eu1"}  # some secrets backends hand over a dict
    settings = resolve_settings(c)
    assert settings.base_url == "https://api.eu1.fullstory.com"
    assert settings.app_url.startswith("https://app.eu1.fullstory.com/ui/o-9-eu1")


@pytest.mark.parametrize(
    ("host", "schema", "port", "expected"),
    [
        ("http://127.0.0.1:8089", None, None, "http://127.0.0.1:8089"),
        ("http://127.0.0.1:8089/", None, None, "http://127.0.0.1:8089"),
        ("127.0.0.1:8089", None, None, "http://127.0.0.1:8089"),  # loopback without scheme: plain http
        ("localhost", None, 8089, "http://localhost:8089"),
        ("proxy.internal/fullstory", None, None, "https://proxy.internal/fullstory"),
        ("proxy.internal", "http", 8080, "http://proxy.internal:8080"),
    ],
)
def test_host_override(host, schema, port, expected):
    assert base_url_for(conn(host=host, schema=schema, port=port), "na1") == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"password": ""}, "password field"),
        ({"extra": {"data_region": "na1"}}, "extra.org_id is required"),
        ({"extra": "{not json"}, "not valid JSON"),
        ({"extra": {"org_id": "o-1-na1", "ca_bundle": "/nonexistent/ca.pem"}}, "ca_bundle"),
    ],
)
def test_unusable_connections_say_what_to_fix(kwargs, match):
    with pytest.raises(FullStoryConfigError, match=match):
        resolve_settings(conn(**kwargs))


def test_timeouts_from_extra():
    extra = {"org_id": "o-1-na1", "connect_timeout": 2, "read_timeout": 7.5}
    assert resolve_settings(conn(extra=extra)).timeout == (2.0, 7.5)
    assert resolve_settings(conn(), (1.0, 3.0)).timeout == (1.0, 3.0)


def test_ca_bundle_becomes_verify(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = resolve_settings(conn(extra={"org_id": "o-1-na1", "ca_bundle": str(bundle)}))
    assert settings.verify == str(bundle)


# ---- the hook object -----------------------------------------------------------------------------------


def test_hook_reads_connection_lazily(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    hook = FullStoryHook("no_such_conn")  # must not touch the connection (DAG parse time)
    assert "connection" not in hook.__dict__
    with pytest.raises(AirflowException):
        hook.settings  # noqa: B018


def test_hook_attributes_and_repr(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FULLSTORY_DEFAULT",
        json.dumps({"conn_type": "http", "password": KEY, "extra": {"org_id": "o-1-na1"}}),
    )
    hook = FullStoryHook()
    assert (hook.conn_name_attr, hook.default_conn_name, hook.conn_type) == (
        "fullstory_conn_id",
        "fullstory_default",
        "fullstory",
    )
    assert hook.hook_name == "FullStory"
    assert hook.base_url == "https://api.fullstory.com"
    for text in (repr(hook), repr(hook.session.auth), repr(hook.settings)):
        assert KEY not in text
    assert hook.http_stats() == {"requests": 0, "retries": 0, "status_counts": {}, "transport_errors": 0}


def test_ui_form_hides_unused_fields_and_relabels_the_key():
    form = FullStoryHook.get_ui_field_behaviour()
    assert form["hidden_fields"] == ["schema", "login", "port"]
    assert form["relabeling"]["password"] == "Server API key"
    assert "org_id" in form["placeholders"]["extra"]


def test_destination_named_by_a_connection(monkeypatch):
    assert destination_of("o-1-na1", "na1") == "o-1-na1@na1"
    monkeypatch.setenv(
        "AIRFLOW_CONN_FS_EU",
        json.dumps({"conn_type": "http", "password": "eu1.k/x", "extra": {"org_id": "o-9-eu1"}}),
    )
    assert connection_destination("fs_eu") == "o-9-eu1@eu1"  # the region the key and org agree on
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    assert connection_destination("no_such_conn", dry_run=True) is None  # a dry run needs no connection
    with pytest.raises(AirflowException):
        connection_destination("no_such_conn")


def test_auth_header_is_the_key_verbatim():
    prepared = requests.Request("GET", "http://127.0.0.1/me", auth=KeyAuth(KEY)).prepare()
    assert prepared.headers["Authorization"] == f"Basic {KEY}"  # not base64("key:")


# ---- retry policy --------------------------------------------------------------------------------------


def response(status, headers=None):
    r = requests.Response()
    r.status_code = status
    r.headers.update(headers or {})
    return r


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses(status):
    assert retryable(response(status))


@pytest.mark.parametrize("status", [200, 202, 400, 401, 403, 404, 413, 422, 501])
def test_final_statuses(status):
    assert not retryable(response(status))


def test_retryable_transport_errors():
    assert retryable(requests.ConnectionError("reset"))
    assert retryable(requests.ReadTimeout("slow"))
    assert retryable(requests.ConnectTimeout("slow"))
    assert not retryable(requests.exceptions.SSLError("bad certificate"))
    assert not retryable(ValueError("bug"))


def test_retry_after_seconds_and_http_date():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("-4") == 0.0
    later = email.utils.format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert retry_after_seconds(later, now) == pytest.approx(7.0)
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_backoff_is_jittered_exponential_and_bounded():
    policy = RetryPolicy(backoff_base=1.0, backoff_max=8.0, retry_after_max=10.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = {policy.delay(attempt, None) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jitter
    assert 3.0 <= policy.delay(1, 3.0) <= 3.25  # Retry-After honoured
    assert policy.delay(1, 3600.0) <= 10.25  # and clamped


# ---- errors --------------------------------------------------------------------------------------------


def test_error_types():
    assert issubclass(FullStoryAuthError, AirflowFailException)  # no Airflow retries for a bad key
    assert issubclass(FullStoryNotFoundError, AirflowFailException)
    assert issubclass(FullStoryConfigError, AirflowFailException)
    assert not issubclass(FullStoryRetryError, AirflowFailException)  # a later try may succeed
    assert FullStoryHook.refused_error is FullStoryRequestError  # the chunk is refused, not the task
    assert INVALID_KEY.startswith("Invalid API key: regenerate the Server API key in Settings > API Keys")
    # Airflow re-creates exceptions from their message alone.
    assert str(FullStoryAuthError("x")) == "x"


def answer(status, content=b""):
    r = response(status)
    r._content = content
    r.encoding = "utf-8"
    return r


def test_error_fields_of_fullstory_error_bodies():
    assert error_fields(answer(400, b'{"code": "invalid_argument", "message": "bad"}')) == (
        "invalid_argument",
        "bad",
    )
    assert error_fields(answer(400, b"")) == ("", "")
    assert error_fields(answer(400, b"[1]")) == ("", "")
    assert error_fields(answer(502, b"<html>gateway</html>")) == ("", "<html>gateway</html>")
    assert error_fields(answer(400, b'{"message": "' + b"x" * 600 + b'"}'))[1] == "x" * 500


@pytest.mark.parametrize(
    ("status", "kind", "says"),
    [
        (401, FullStoryAuthError, INVALID_KEY),
        (403, FullStoryForbiddenError, "Admin or Architect"),
        (404, FullStoryNotFoundError, "Check data_region (eu1, base URL https://api.eu1.fullstory.com)"),
        (400, FullStoryRequestError, "POST /v2/events/batch: FullStory answered 400 invalid_argument: bad"),
        (413, FullStoryRequestError, "FullStory answered 413"),
    ],
)
def test_final_4xx_answers_become_narrow_errors(status, kind, says):
    error = answer_error(
        status, "invalid_argument", "bad", "POST /v2/events/batch", "eu1", "https://api.eu1.fullstory.com"
    )
    assert type(error) is kind and isinstance(error, FullStoryError)
    assert says in str(error)
    assert (error.status, error.code, error.message) == (
        status,
        "invalid_argument",
        "bad",
    )  # delivery reads them
    assert isinstance(error, FullStoryHook.refused_error) == (kind is FullStoryRequestError)


def test_error_without_fields_keeps_its_text_as_message():
    error = FullStoryRequestError("POST /v2/users/batch: FullStory answered 400", status=400)
    assert (error.status, error.code, error.message) == (
        400,
        "",
        "POST /v2/users/batch: FullStory answered 400",
    )


# ---- the hook's batch calls ----------------------------------------------------------------------------


def test_hook_has_the_batch_client_calls_delivery_uses():
    """Delivery (include/datafly_fullstory/delivery.py) calls the hook as a `BatchClient`: the generic calls
    by kind, with the protocol's parameters. The per-kind aliases are gone."""
    import inspect

    from include.datafly_fullstory.delivery import BatchClient

    for name in ("create_batch", "get_batch_status", "iter_batch_errors", "iter_batch_imports", "http_stats"):
        wanted = list(inspect.signature(getattr(BatchClient, name)).parameters)
        assert list(inspect.signature(getattr(FullStoryHook, name)).parameters) == wanted, name
    assert FullStoryHook.refused_error is FullStoryRequestError
    for kind in ("events", "users"):
        for call in (
            "create_{}_batch",
            "get_{}_batch_status",
            "iter_{}_batch_imports",
            "iter_{}_batch_errors",
        ):
            assert not hasattr(FullStoryHook, call.format(kind))


def test_batch_calls_refuse_an_unknown_kind_before_reading_the_connection(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    hook = FullStoryHook("no_such_conn")
    for call in (
        lambda: hook.create_batch("sessions", b"{}", "key"),
        lambda: hook.get_batch_status("sessions", "job"),
        lambda: list(hook.iter_batch_errors("sessions", "job")),
        lambda: list(hook.iter_batch_imports("sessions", "job")),
    ):
        with pytest.raises(ValueError, match="batch kind must be one of"):
            call()
    assert "connection" not in hook.__dict__


def test_provider_info():
    info = get_provider_info()
    assert info["connection-types"][0]["hook-class-name"] == "fullstory_provider.hooks.FullStoryHook"
    assert info["extra-links"] == ["fullstory_provider.links.FullStoryAppLink"]
    for dotted in (info["connection-types"][0]["hook-class-name"], *info["extra-links"]):
        module, _, name = dotted.rpartition(".")
        assert getattr(importlib.import_module(module), name)
