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
# Executors that run every task on the scheduler's machine. Any other one (Celery, Kubernetes,
# CeleryKubernetes, Edge, ECS, Batch, Astro's, a custom one) may run a run's tasks on different machines.
LOCAL_EXECUTORS = ("LocalExecutor", "SequentialExecutor", "DebugExecutor")
SHARED_MOUNT_VARIABLE = "datafly_fullstory_shared_mount"
SQLITE_LEDGER_PROBLEM = (
    "the delivery ledger is the SQLite default, which serves one machine: tasks on other workers would not "
    "see each other's claims and could send an event twice. Set the Airflow Variable "
    "datafly_fullstory_ledger_conn_id to a Postgres connection"
)


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
    shared_mount: bool | str | None = None,
) -> RunPlan:
    """The run's plan from its params, Variables and Airflow context; refuses what it cannot use.
    `executor` is Airflow's `[core] executor`; `shared_mount` the Variable `datafly_fullstory_shared_mount`
    (see `check_distributed_locations`)."""
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
    landing = resolve_uri(landing_uri, airflow_home)
    check_distributed_locations(
        landing,
        state,
        executor=executor,
        shared_mount=shared_mount,
        ledger_conn_id=ledger_conn_id,
        state_is_default=not (state_uri or "").strip(),
    )
    return RunPlan(
        run_id=run_id,
        window=window,
        scan_start=window.start - timedelta(hours=lookback),
        lookback_hours=lookback,
        landing_uri=landing,
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


def distributed_executor(executor: str | None) -> str | None:
    """The first executor of `[core] executor` that may run tasks on other machines, by class name, or None.
    The setting lists one or more executors, comma-separated, each a name (`CeleryExecutor`), a class path
    or `alias:class.path`; the DAG's tasks can be sent to any of them (a task's `executor` argument, a
    cluster policy), so one distributed executor anywhere in the list counts."""
    for entry in (executor or "").split(","):
        name = entry.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        if name and name not in LOCAL_EXECUTORS:
            return name
    return None


def is_local_path(uri: str) -> bool:
    """A path on the worker's own file system (a plain path or `file://` / `local://`), not an object store."""
    return "://" not in uri or uri.split("://", 1)[0].lower() in ("file", "local")


def check_distributed_locations(
    landing_uri: str,
    state_uri: str,
    *,
    executor: str | None,
    shared_mount: bool | str | None = None,
    ledger_conn_id: str | None = None,
    state_is_default: bool = False,
) -> None:
    """Refuse, at plan time, locations that only work on one machine when the executor may run the run's
    tasks on several: a local state folder (each worker would write its artifacts to its own disk, and the
    next task, on another worker, would not find them), a local landing folder (the extract task may run
    on a worker without the files, or with other files) and the SQLite ledger (each worker would keep its
    own claims: exactly once would hold per machine only). Every problem is named in one message.

    `shared_mount` ("true", "yes", "1", "on" or True; the Variable datafly_fullstory_shared_mount) says the
    local landing and state folders are one mount every worker sees (NFS, EFS, a ReadWriteMany volume):
    they are then accepted. It never accepts the SQLite ledger, which is not safe on a network file system."""
    name = distributed_executor(executor)
    if name is None:
        return
    problems = []
    mount = _truthy(shared_mount, SHARED_MOUNT_VARIABLE)
    if is_local_path(state_uri) and not mount:
        where = "the default state folder" if state_is_default else "the state location"
        problems.append(
            f"{where} {state_uri} is a folder on the worker's own disk: each worker would write the run's "
            "artifacts to its own, and a task on another worker would not find them. Set the Airflow Variable "
            "datafly_fullstory_state_uri to an object-store URI (s3://bucket/prefix, gs://bucket/prefix) every "
            f"worker reaches, or, if {state_uri} is a mount every worker shares, set the Airflow Variable "
            f"{SHARED_MOUNT_VARIABLE} to true"
        )
    if is_local_path(landing_uri) and not mount:
        problems.append(
            f"the landing {landing_uri} (datafly_landing_uri) is a folder on the worker's own disk: the "
            "extract task may run on a worker that does not have these files, or has others. Set "
            "datafly_landing_uri to the object-store URI the events land in (s3://..., gs://...), or, if "
            f"{landing_uri} is a mount every worker shares, set the Airflow Variable {SHARED_MOUNT_VARIABLE} "
            "to true"
        )
    if not ledger_conn_id:
        problems.append(SQLITE_LEDGER_PROBLEM)
    if problems:
        raise ParamError(
            f"the executor is {name}, which may run this run's tasks on different machines, but "
            + "; and ".join(problems)
        )


def _truthy(value: bool | str | None, variable: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("", "false", "no", "0", "off"):
        return False
    raise ParamError(f"the Airflow Variable {variable}={value!r} must be true or false")


def ledger_location(state_uri: str, airflow_home: str, *, conn_id: str | None, executor: str | None) -> dict:
    """Where the delivery ledger lives: `{"conn_id": ...}` (a Postgres connection, for several workers) or
    `{"url": "sqlite:///..."}` (the default: beside a local state folder, or under AIRFLOW_HOME when the
    state is on an object store). A SQLite ledger on a distributed executor is refused: each worker would
    keep its own, and exactly once would hold per machine only."""
    if conn_id:
        return {"conn_id": conn_id}
    name = distributed_executor(executor)
    if name:
        raise ParamError(f"the executor is {name}, but {SQLITE_LEDGER_PROBLEM}")
    if "://" not in state_uri or state_uri.startswith("file://"):
        folder = Path(state_uri.removeprefix("file://"))
    else:
        folder = Path(airflow_home) / "datafly_fullstory"
    return {"url": f"sqlite:///{folder / 'ledger.sqlite'}"}
