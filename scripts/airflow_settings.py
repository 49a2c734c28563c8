"""Apply airflow_settings.yaml (the Astro CLI's schema) to a plain Airflow metadata database.

For people not on Astro: `astro dev start` applies the file itself. Running this twice leaves the same
state: connections, variables and pools are upserted by their ids, nothing is duplicated.

    AIRFLOW_HOME=... python scripts/airflow_settings.py [airflow_settings.yaml]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """airflow_settings.yaml does not follow the Astro CLI schema."""


def load_settings(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Read and check the file; returns {"connections": [...], "pools": [...], "variables": [...]}."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
    section = doc.get("airflow") or {}
    out = {key: list(section.get(key) or []) for key in ("connections", "pools", "variables")}
    for i, conn in enumerate(out["connections"]):
        if not conn.get("conn_id") or not conn.get("conn_type"):
            raise SettingsError(f"{path}: airflow.connections[{i}] needs conn_id and conn_type")
    for i, pool in enumerate(out["pools"]):
        if not pool.get("pool_name") or not isinstance(pool.get("pool_slot"), int) or pool["pool_slot"] <= 0:
            raise SettingsError(f"{path}: airflow.pools[{i}] needs pool_name and a pool_slot > 0")
    for i, var in enumerate(out["variables"]):
        if not var.get("variable_name") or var.get("variable_value") in (None, ""):
            raise SettingsError(
                f"{path}: airflow.variables[{i}] needs variable_name and a non-empty variable_value"
            )
    return out


def _extra_json(extra: Any) -> str | None:
    if extra in (None, ""):
        return None
    if isinstance(extra, str):
        json.loads(extra)  # a JSON string must be valid JSON
        return extra
    return json.dumps(extra, sort_keys=True)


def apply_settings(path: Path) -> dict[str, int]:
    """Upsert everything in the file into the metadata DB of the current AIRFLOW_HOME."""
    # The ORM models on purpose: this writes the metadata DB directly, outside any task, where the
    # Task SDK's Connection / Variable (API clients for running tasks) do not apply.
    from airflow.models import Connection, Pool, Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    settings = load_settings(path)
    with create_session() as session:
        for spec in settings["connections"]:
            conn = session.scalar(select(Connection).filter_by(conn_id=spec["conn_id"]))
            if conn is None:
                conn = Connection(conn_id=spec["conn_id"])
                session.add(conn)
            conn.conn_type = spec["conn_type"]
            conn.host = spec.get("conn_host") or None
            conn.schema = spec.get("conn_schema") or None
            conn.login = spec.get("conn_login") or None
            conn.set_password(spec.get("conn_password") or None)
            conn.port = spec.get("conn_port") or None
            conn.set_extra(_extra_json(spec.get("conn_extra")))
        for spec in settings["pools"]:
            Pool.create_or_update_pool(
                spec["pool_name"],
                spec["pool_slot"],
                spec.get("pool_description") or "",
                include_deferred=False,
                session=session,
            )
        for spec in settings["variables"]:
            Variable.set(spec["variable_name"], str(spec["variable_value"]), session=session)
    return {key: len(items) for key, items in settings.items()}


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else ROOT / "airflow_settings.yaml"
    counts = apply_settings(path)
    print(
        f"applied {path.name}: {counts['connections']} connections, {counts['pools']} pools, "
        f"{counts['variables']} variables"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
