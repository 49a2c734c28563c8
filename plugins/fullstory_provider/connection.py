"""The FullStory connection: its fields, the data region they agree on, the settings the hook runs with.

Connection (`fullstory_default`, conn_type `fullstory`, or `http` as before: both read the same fields):
  password           Server API key, sent verbatim as `Authorization: Basic <key>` (form: "Server API key")
  extra.org_id       required, e.g. o-1A2B3C-na1 (form: "Org ID")
  extra.data_region  na1 (default) | eu1 (form: "Data region")
  host               optional base URL replacing the regional one (local emulator, proxy; form: "API host")
  extra.ca_bundle    optional CA bundle path (requests' `verify`)
  extra.connect_timeout / extra.read_timeout   optional, seconds

The connection is read when first used (never at DAG parse time or in the hook's __init__), and checked
before the first request: a key, org id and data_region that name different regions are refused with the
reason.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
import requests
from requests.auth import AuthBase

from fullstory_provider.exceptions import FullStoryConfigError

REGIONS = {
    "na1": ("https://api.fullstory.com", "https://app.fullstory.com"),
    "eu1": ("https://api.eu1.fullstory.com", "https://app.eu1.fullstory.com"),
}
DEFAULT_REGION = "na1"
_KEY_PREFIX = re.compile(r"^([a-z]{2}\d)\.")
_ORG_SUFFIX = re.compile(r"-([a-z]{2}\d)$", re.IGNORECASE)
_LOOPBACK = ("127.", "localhost", "[::1]", "0.0.0.0")


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


def scrub_key(text: str, api_key: str | None) -> str:
    """`text` without the key: verbatim, as Python escapes it (an exception quoting a header shows
    `'Basic ab\\ncd'`) and each of its parts around whitespace or control characters (4+ characters)."""
    if not api_key:
        return text
    forms = {api_key, api_key.encode("unicode_escape").decode("ascii"), repr(api_key)[1:-1]}
    forms.update(p for p in re.split(r"[\s\x00-\x1f\x7f]+", api_key) if len(p) >= 4)
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def check_key_characters(api_key: str, conn_id: str | None) -> None:
    """Refuse a key with a line break, space or other control character (a paste gone wrong): HTTP headers
    cannot carry it, and the message says where it is, never what the key is."""
    for position, char in enumerate(api_key, 1):
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            kind = (
                "a line break" if char in "\r\n\x0b\x0c\x85\u2028\u2029" else "a space or control character"
            )
            raise FullStoryConfigError(
                f"connection {conn_id!r}: the API key contains {kind} (character {position} of "
                f"{len(api_key)}); re-enter the Server API key in the connection's password field as one line"
            )


def resolve_settings(conn: Any, timeout: tuple[float, float] | None = None) -> FullStorySettings:
    """Connection -> settings, validated. Raises FullStoryConfigError naming the field to fix."""
    extra = connection_extra(conn)
    api_key = (conn.password or "").strip()
    if not api_key:
        raise FullStoryConfigError(
            f"connection {conn.conn_id!r} has no API key: put the FullStory Server API key in its password field"
        )
    check_key_characters(api_key, conn.conn_id)
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


# ---- the key on the wire, the form in the UI -----------------------------------------------------------


class KeyAuth(AuthBase):
    """`Authorization: Basic <key>` with the key verbatim (not base64 of `key:`, as FullStory documents)."""

    def __init__(self, api_key: str):
        self._api_key = api_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Basic {self._api_key}"
        return request

    def __repr__(self) -> str:
        return "<FullStory key auth>"


def ui_field_behaviour() -> dict[str, Any]:
    """The connection form in Airflow's UI: which standard fields show, under which labels. The same data
    the provider metadata declares (provider_info.py), which Airflow 3.2+ reads without the hook."""
    from fullstory_provider.provider_info import HIDDEN_FIELDS, PLACEHOLDERS, RELABELING

    return {
        "hidden_fields": list(HIDDEN_FIELDS),
        "relabeling": dict(RELABELING),
        "placeholders": dict(PLACEHOLDERS),
    }


# ---- the destination a connection names ----------------------------------------------------------------


def destination_of(org_id: str, data_region: str) -> str:
    """The ledger's name for a FullStory org in a region: exactly once is kept per destination."""
    return f"{org_id}@{data_region}"


def connection_destination(conn_id: str | None, *, dry_run: bool = False) -> str | None:
    """The destination named by a FullStory connection (read and checked as delivery will read it). A dry
    run needs no connection: None then, when it cannot be read."""
    from fullstory_provider.hooks import FullStoryHook  # the hook imports this module

    try:
        settings = FullStoryHook(str(conn_id or FullStoryHook.default_conn_name)).settings
    except Exception:
        if dry_run:
            return None
        raise
    return destination_of(settings.org_id, settings.data_region)
