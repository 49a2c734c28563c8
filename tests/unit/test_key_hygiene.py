"""An API key with a line break (a paste gone wrong) is refused early, and no message shows any part of it."""

from __future__ import annotations

import json

import pytest
import requests
from airflow.sdk import Connection

from fullstory_provider.connection import resolve_settings, scrub_key
from fullstory_provider.exceptions import FullStoryConfigError

PARTS = ("na1.SECRETfirst", "SECRETsecond/zz")


def conn(password: str) -> Connection:
    return Connection(
        conn_id="fullstory_default",
        conn_type="http",
        password=password,
        extra=json.dumps({"org_id": "o-1A2B3C-na1", "data_region": "na1"}),
    )


@pytest.mark.parametrize("sep", ["\n", "\r\n", " ", "\t", "\x00", "\u2028"])
def test_a_key_with_whitespace_or_control_characters_is_refused_without_showing_it(sep):
    with pytest.raises(FullStoryConfigError) as info:
        resolve_settings(conn(sep.join(PARTS)))
    text = str(info.value)
    assert "the API key contains" in text and "as one line" in text
    assert not any(p in text for p in PARTS) and "SECRET" not in text
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_surrounding_whitespace_is_still_trimmed():
    assert resolve_settings(conn(f"  {PARTS[0]}\n")).api_key == PARTS[0]


def test_scrub_removes_the_key_as_requests_quotes_it():
    key = "\n".join(PARTS)
    try:
        requests.Session().get("http://127.0.0.1:9/", headers={"Authorization": f"Basic {key}"})
    except ValueError as exc:
        message = f"{type(exc).__name__}: {exc}"
    else:  # pragma: no cover - requests always refuses a header with a line break
        pytest.fail("requests sent a header with a line break")
    assert "SECRET" in message  # what used to reach stats.json and the stop record
    scrubbed = scrub_key(message, key)
    assert "SECRET" not in scrubbed and not any(p in scrubbed for p in PARTS)
    assert scrub_key("nothing here", key) == "nothing here" and scrub_key("x", None) == "x"
