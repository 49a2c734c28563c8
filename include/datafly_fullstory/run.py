"""The run contract: `RunPlan`, everything a run's tasks need, fixed once by the `plan` task.

The plan travels between tasks through XCom as a small JSON dict (`to_xcom()` / `from_xcom()`); inside the
pipeline it is a frozen, typed object. Its time facts (the window, the look-back's start, the planning time)
are decided here and never read from the clock again, so a retried or cleared task does what the first try
did. Nothing here imports Airflow or pandas: the DAG's `plan` task stays cheap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from include.datafly_fullstory.errors import ParamError
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.stats import THRESHOLDS
from include.datafly_fullstory.window import Window, parse_instant, resolve_window

DEFAULT_PART_ROWS = 500_000  # rows per window part (parts.py): a task of ~10-20 s per core

DEFAULT_LOOKBACK_HOURS = 24.0
MAX_LOOKBACK_HOURS = 24 * 14
DISTRIBUTED_EXECUTORS = ("CeleryExecutor", "KubernetesExecutor", "CeleryKubernetesExecutor", "EdgeExecutor")


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    window: Window
    scan_start: datetime  # the look-back's start: window.start - lookback_hours
    lookback_hours: float
    landing_uri: str
    state_uri: str
    destination: str | None  # `<org id>@<region>`: the ledger keeps exactly once per destination
    ledger: dict[str, str]  # {"url": "sqlite:///..."} or {"conn_id": ...} (a Postgres connection)
    planned_at: float  # the fixed planning time (epoch seconds): the run's duration counts from it
    dry_run: bool = False
    force: bool = False
    replay_dead_letters: bool = False
    allow_duplicates: bool = False
    fullstory_conn_id: str = "fullstory_default"
    thresholds: dict[str, float] = field(default_factory=dict)
    mapping: dict[str, Any] = field(default_factory=dict)  # MappingSettings fields
    blueprint: str = "retail"  # a bundled variant name or a YAML path (blueprint.load_blueprint)
    part_rows: int = DEFAULT_PART_ROWS  # rows per window part: one extract and one map task each (parts.py)

    @property
    def store(self) -> RunStore:
        """The run's folder under the state location."""
        return RunStore(self.state_uri, self.run_id)

    @property
    def span(self) -> tuple[str, str]:
        """The window as the ledger records it."""
        return self.window.start.isoformat(), self.window.end.isoformat()

    def to_xcom(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "window": self.window.as_dict(),
            "scan_start": self.scan_start.isoformat(),
            "lookback_hours": self.lookback_hours,
            "landing_uri": self.landing_uri,
            "state_uri": self.state_uri,
            "destination": self.destination,
            "ledger": dict(self.ledger),
            "planned_at": self.planned_at,
            "dry_run": self.dry_run,
            "force": self.force,
            "replay_dead_letters": self.replay_dead_letters,
            "allow_duplicates": self.allow_duplicates,
            "fullstory_conn_id": self.fullstory_conn_id,
            "thresholds": dict(self.thresholds),
            "mapping": dict(self.mapping),
            "blueprint": self.blueprint,
            "part_rows": self.part_rows,
        }

    @classmethod
    def from_xcom(cls, data: RunPlan | Mapping[str, Any]) -> RunPlan:
        if isinstance(data, RunPlan):
            return data
        return cls(
            **{
                **data,
                "window": Window.from_dict(data["window"]),
                "scan_start": parse_instant(data["scan_start"], "scan_start"),
                "ledger": dict(data["ledger"]),
                "thresholds": dict(data.get("thresholds") or {}),
                "mapping": dict(data.get("mapping") or {}),
            }
        )


def plan_run(
    *,
    params: Mapping[str, Any],
    run_id: str,
    landing_uri: str | None,
    state_uri: str | None,
    airflow_home: str,
    data_interval_start: datetime | None = None,
    data_interval_end: datetime | None = None,
    run_after: datetime | None = None,
    destination: str | None = None,
    ledger_conn_id: str | None = None,
    executor: str | None = None,
    blueprint: str | None = None,
) -> RunPlan:
    """The run's plan from its params, Variables and Airflow context; refuses what it cannot use."""
    window = resolve_window(
        window_start=params.get("window_start") or None,
        window_end=params.get("window_end") or None,
        data_interval_start=data_interval_start,
        data_interval_end=data_interval_end,
        run_after=run_after,
    )
    manual_window = bool(params.get("window_start") or params.get("window_end"))
    lookback = params.get("lookback_hours")
    lookback = (0.0 if manual_window else DEFAULT_LOOKBACK_HOURS) if lookback is None else float(lookback)
    if not 0 <= lookback <= MAX_LOOKBACK_HOURS:
        raise ParamError(f"param lookback_hours={lookback!r} must be between 0 and {MAX_LOOKBACK_HOURS}")
    dry_run = bool(params.get("dry_run", False))
    if not dry_run and not destination:
        raise ParamError(
            "no FullStory destination: the connection's org id and region are needed to keep "
            "exactly once per org"
        )
    state = resolve_uri(state_uri, airflow_home, default="state")
    part_rows = params.get("part_rows")
    part_rows = DEFAULT_PART_ROWS if part_rows is None else part_rows
    if not isinstance(part_rows, int) or isinstance(part_rows, bool) or part_rows < 1:
        raise ParamError(f"param part_rows={part_rows!r} must be a whole number of rows, at least 1")
    return RunPlan(
        run_id=run_id,
        window=window,
        scan_start=window.start - timedelta(hours=lookback),
        lookback_hours=lookback,
        landing_uri=resolve_uri(landing_uri, airflow_home),
        state_uri=state,
        destination=destination,
        ledger=ledger_location(state, airflow_home, conn_id=ledger_conn_id, executor=executor),
        planned_at=time.time(),
        dry_run=dry_run,
        force=bool(params.get("force", False)),
        replay_dead_letters=bool(params.get("replay_dead_letters", False)),
        allow_duplicates=bool(params.get("allow_duplicates", False)),
        fullstory_conn_id=str(params.get("fullstory_conn_id") or "fullstory_default"),
        thresholds=_thresholds(params),
        blueprint=resolve_blueprint(params.get("blueprint") or blueprint, airflow_home),
        part_rows=part_rows,
        mapping={
            "event_types": [str(t) for t in (params.get("event_types") or []) if str(t).strip()],
            "require_explicit_consent": bool(params.get("require_explicit_consent", False)),
        },
    )


def _thresholds(params: Mapping[str, Any]) -> dict[str, float]:
    thresholds = {}
    for name, (_, default, _) in THRESHOLDS.items():
        value = params.get(name, default)
        value = default if value is None else value
        limit = float("inf") if name.endswith("_rows") else 1
        try:
            ok = 0 <= float(value) <= limit
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ParamError(f"param {name}={value!r} must be a number between 0 and {limit}")
        thresholds[name] = float(value)
    return thresholds


def resolve_blueprint(value: str | None, airflow_home: str) -> str:
    """The run's blueprint (the `blueprint` param, else the Variable `datafly_fullstory_blueprint`): a bundled
    variant name stays as it is, a YAML path is taken under AIRFLOW_HOME when relative. It is loaded and
    checked here, so a wrong name or a broken file fails the plan task, naming the file and key."""
    from include.datafly_fullstory.blueprint import load_blueprint

    value = str(value or "retail").strip()
    if value.endswith((".yaml", ".yml")):
        path = Path(os.path.expanduser(value))
        value = str(path if path.is_absolute() else Path(airflow_home) / path)
    load_blueprint(value)
    return value


def resolve_uri(value: str | None, airflow_home: str, *, default: str | None = None) -> str:
    """A landing or state URI from an Airflow Variable: URIs stay as they are, relative paths are taken
    under AIRFLOW_HOME (so one airflow_settings.yaml serves a laptop and an Astro image)."""
    value = (value or default or "").strip()
    if not value:
        raise ParamError(
            "no landing URI: set the Airflow Variable datafly_landing_uri (a folder, s3:// or gs:// URI)"
        )
    if "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = Path(airflow_home) / path
    return str(path)


def ledger_location(state_uri: str, airflow_home: str, *, conn_id: str | None, executor: str | None) -> dict:
    """Where the delivery ledger lives: `{"conn_id": ...}` (a Postgres connection, for several workers) or
    `{"url": "sqlite:///..."}` (the default: beside a local state folder, or under AIRFLOW_HOME when the
    state is on an object store). A SQLite ledger on a distributed executor is refused: each worker would
    keep its own, and exactly once would hold per machine only."""
    if conn_id:
        return {"conn_id": conn_id}
    if executor and executor.rsplit(".", 1)[-1] in DISTRIBUTED_EXECUTORS:
        raise ParamError(
            f"the executor is {executor.rsplit('.', 1)[-1]}, but the delivery ledger is the SQLite default, which "
            "serves one machine: tasks on other workers would not see each other's claims and could send "
            "an event twice. Set the Airflow Variable datafly_fullstory_ledger_conn_id to a Postgres connection"
        )
    if "://" not in state_uri or state_uri.startswith("file://"):
        folder = Path(state_uri.removeprefix("file://"))
    else:
        folder = Path(airflow_home) / "datafly_fullstory"
    return {"url": f"sqlite:///{folder / 'ledger.sqlite'}"}
