"""The delivery ledger's database URL, from a plan's `ledger` location.

`{"url": "sqlite:///..."}` is used as it is (no secret in it). `{"conn_id": "..."}` names an Airflow
connection to a Postgres database, resolved in the task that needs it, so the password never travels
through XCom, a log line or the stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowFailException


def ledger_url(location: Mapping[str, Any] | None) -> str | None:
    if not location:
        return None
    if location.get("url"):
        return str(location["url"])
    conn_id = str(location.get("conn_id") or "")
    conn = BaseHook.get_connection(conn_id)
    if (conn.conn_type or "").lower() not in ("postgres", "postgresql"):
        raise AirflowFailException(
            f"connection {conn_id!r} (datafly_fullstory_ledger_conn_id) is of type {conn.conn_type!r}; the "
            "delivery ledger needs a Postgres connection"
        )
    from sqlalchemy.engine import URL

    extra = conn.extra_dejson or {}
    query = {k: str(v) for k, v in extra.items() if k in ("sslmode", "sslrootcert", "host", "options")}
    url = URL.create(
        "postgresql+psycopg",
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=conn.port or None,
        database=conn.schema or None,
        query=query,
    )
    return url.render_as_string(hide_password=False)
