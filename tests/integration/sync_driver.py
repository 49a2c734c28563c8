"""Drives the sync DAG's real tasks, in the DAG's order, for exactly-once tests.

Each task is what the DAG's task calls: `pipeline.plan_run` / `parts_stage` / `extract_part_stage` (one per
window part) / `extract_stage` / `map_prepare_stage` / `map_part_stage` (one per part) / `map_stage` /
`FullStoryDeliveryOperator.execute` (one per chunk group, real hook, real HTTP to the emulator) /
`summarise_run`. A run keeps its tasks' return values like XCom does, so a failed task can be retried,
the whole run cleared, or a new run started, exactly as an Airflow user would. A `Killed` raised inside a
task (through `delivery.fault_point` or a patched function) ends it without running its error handlers,
as SIGKILL would.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fullstory_provider.ledger_db import ledger_url
from fullstory_provider.operators import FullStoryDeliveryOperator
from include.datafly_fullstory import pipeline
from include.datafly_fullstory.run import plan_run
from include.datafly_fullstory.state import RunStore

GROUP_SIZE = 2


def _index(name: str) -> int:
    return int(name.rstrip("]").split("[")[1])


class Killed(BaseException):  # noqa: N818 - stands for a SIGKILL: `except Exception` does not catch it
    """The task's process died here."""


class _TI:
    def __init__(self, task_id: str, map_index: int):
        self.task_id, self.map_index = task_id, map_index

    def xcom_push(self, key, value):
        pass


@dataclass
class Run:
    run_id: str
    params: dict[str, Any]
    interval: tuple[datetime, datetime] | None
    xcom: dict[str, Any] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    killed_in: str | None = None
    error: BaseException | None = None

    @property
    def plan(self) -> dict[str, Any]:
        return self.xcom["plan"]


class SyncDriver:
    def __init__(
        self,
        *,
        landing: Path,
        state: Path,
        airflow_home: Path,
        emulator,
        max_items: int = 60,
        postgres_url: str | None = None,
        part_rows: int = 100,
    ):
        """`postgres_url`: keep the ledger in that Postgres database, reached as deployments do, through an
        Airflow connection named by `datafly_fullstory_ledger_conn_id` (else the SQLite default)."""
        import os

        self.landing, self.state, self.home, self.max_items = landing, state, airflow_home, max_items
        self.part_rows = part_rows  # small parts: the tests' windows run as several parts where files allow
        self.ledger_conn_id = None
        self.ledger_db_url = f"sqlite:///{state / 'ledger.sqlite'}"
        if postgres_url:
            import sqlalchemy as sa

            url = sa.engine.make_url(postgres_url)
            conn = {
                "conn_type": "postgres",
                "login": url.username,
                "password": url.password or "",
                "schema": url.database,
                "host": url.host or "",
                "port": url.port,
                "extra": {"host": url.query["host"]} if "host" in url.query else {},
            }
            os.environ["AIRFLOW_CONN_DFFS_LEDGER"] = json.dumps(conn)
            self.ledger_conn_id = "dffs_ledger"
            self.ledger_db_url = ledger_url({"conn_id": "dffs_ledger"})
        self.use(emulator)

    def use(self, emulator, monkeypatch=None) -> None:
        """Point the fullstory_default connection at an emulator (its org is the run's destination)."""
        import os

        conn = {
            "conn_type": "http",
            "host": emulator.base_url,
            "password": emulator.api_key,
            "extra": {"org_id": emulator.org_id, "data_region": emulator.region},
        }
        os.environ["AIRFLOW_CONN_FULLSTORY_DEFAULT"] = json.dumps(conn)
        self.destination = f"{emulator.org_id}@{emulator.region}"

    def new_run(
        self,
        run_id: str,
        *,
        hour: datetime | None = None,
        window: tuple[datetime, datetime] | None = None,
        **params,
    ) -> Run:
        """A run as scheduled (`hour`: the data interval [hour, hour+1h)) or manual (`window` params)."""
        if window is not None:
            params = {"window_start": window[0].isoformat(), "window_end": window[1].isoformat(), **params}
        return Run(run_id, params, (hour, hour + timedelta(hours=1)) if hour is not None else None)

    # ---- tasks -------------------------------------------------------------------------------------------

    def tasks(self, run: Run) -> list[str]:
        names = ["plan", "plan_parts"]
        names += [f"extract_part[{i}]" for i in range(len(run.xcom.get("plan_parts", ())))]
        names += ["extract", "map_prepare"]
        names += [f"map_part[{i}]" for i in range(len((run.xcom.get("map_prepare") or {}).get("parts", ())))]
        names += ["map"]
        if "map" in run.xcom:
            chunks = run.xcom["map"]["chunks"]
            for kind in ("users", "events"):
                for i, _ in enumerate(pipeline.group_chunks(chunks, kind, GROUP_SIZE)):
                    names.append(f"deliver_{kind}[{i}]")
        return [*names, "summarise"]

    def execute(self, run: Run, name: str) -> Any:
        if name == "plan":
            plan = plan_run(
                params={"part_rows": self.part_rows, **run.params},
                run_id=run.run_id,
                landing_uri=str(self.landing),
                state_uri=str(self.state),
                airflow_home=str(self.home),
                data_interval_start=run.interval[0] if run.interval else None,
                data_interval_end=run.interval[1] if run.interval else None,
                run_after=datetime.now().astimezone(),
                destination=self.destination,
                ledger_conn_id=self.ledger_conn_id,
            )
            # several chunks per window
            return dataclasses.replace(plan, mapping={**plan.mapping, "max_items": self.max_items}).to_xcom()
        url = ledger_url(run.plan["ledger"])
        if name == "plan_parts":
            return pipeline.parts_stage(run.plan)
        if name.startswith("extract_part["):
            return pipeline.extract_part_stage(run.plan, run.xcom["plan_parts"][_index(name)])
        if name == "extract":
            parts = [run.xcom[f"extract_part[{i}]"] for i in range(len(run.xcom["plan_parts"]))]
            return pipeline.extract_stage(run.plan, url, part_results=parts)
        if name == "map_prepare":
            return pipeline.map_prepare_stage(run.plan, run.xcom["extract"], url)
        if name.startswith("map_part["):
            prepared = run.xcom["map_prepare"]
            return pipeline.map_part_stage(run.plan, prepared, prepared["parts"][_index(name)])
        if name == "map":
            return pipeline.map_stage(run.plan, run.xcom["extract"], url, prepared=run.xcom["map_prepare"])
        if name.startswith("deliver_"):
            kind, index = name.removeprefix("deliver_").rstrip("]").split("[")
            group = pipeline.group_chunks(run.xcom["map"]["chunks"], kind, GROUP_SIZE)[int(index)]
            operator = FullStoryDeliveryOperator(
                task_id=f"deliver_{kind}",
                state_uri=run.plan["state_uri"],
                run_id=run.run_id,
                chunks=group,
                dry_run=run.plan["dry_run"],
                ledger=run.plan["ledger"],
                destination=run.plan["destination"],
                poll_interval=0.02,
                timeout=120,
            )
            return operator.execute({"ti": _TI(f"deliver_{kind}", int(index))})
        if name == "summarise":
            stats = [v for k, v in run.xcom.items() if k.startswith("deliver_")]
            run_stats = pipeline.summarise_run(run.plan, run.xcom["extract"], run.xcom["map"], stats, url)
            return {"stats": run_stats.asdict(), "problems": run_stats.problems}
        raise ValueError(name)

    def go(self, run: Run, *, start: str | None = None) -> Run:
        """Run the tasks in order from `start` (default: the first not done), as the scheduler would. A
        task that raises ends the run there (its XCom stays unset)."""
        run.killed_in, run.error = None, None
        names = self.tasks(run)
        at = (
            names.index(start)
            if start
            else next((i for i, n in enumerate(names) if n not in run.done), len(names))
        )
        i = at
        while i < len(names):
            name = names[i]
            try:
                run.xcom[name] = self.execute(run, name)
            except Killed:
                run.killed_in = name
                return run
            except Exception as exc:  # a failed task: Airflow would record it and stop the downstream
                run.error = exc
                run.killed_in = name
                if not name.startswith("deliver_"):
                    return run
                run.xcom.pop(name, None)
            else:
                if name not in run.done:
                    run.done.append(name)
            names = self.tasks(run)  # delivery groups appear once mapping has run
            i += 1
        return run

    def go_through(self, run: Run, last: str) -> Run:
        """Run the tasks in order up to and including `last` (which must succeed)."""
        while last not in run.done:
            name = next(n for n in self.tasks(run) if n not in run.done)
            run.xcom[name] = self.execute(run, name)
            run.done.append(name)
        return run

    def retry(self, run: Run) -> Run:
        """The failed task runs again (a retry, or a clear of that task), then what had not run."""
        failed = run.killed_in
        run.done = [n for n in run.done if n != failed]
        return self.go(run, start=failed)

    def clear(self, run: Run) -> Run:
        """The whole run is cleared: every task runs again, same run id."""
        run.xcom.clear()
        run.done.clear()
        return self.go(run, start="plan")

    def store(self, run: Run) -> RunStore:
        return RunStore(str(self.state), run.run_id)


def driver_for(request, tmp_path: Path, emulator, monkeypatch, *, max_items: int = 60) -> SyncDriver:
    """A driver over the landing already written to `tmp_path/landing`, with a fresh state and ledger:
    SQLite, or with `request.param == "postgres"` a new database of the session's Postgres server."""
    import uuid

    for name in ("AIRFLOW_CONN_FULLSTORY_DEFAULT", "AIRFLOW_CONN_DFFS_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    postgres_url = None
    if request.param == "postgres":
        postgres_url = request.getfixturevalue("postgres_server").new_database(f"sd_{uuid.uuid4().hex[:12]}")
    return SyncDriver(
        landing=tmp_path / "landing",
        state=tmp_path / "state",
        airflow_home=tmp_path,
        emulator=emulator,
        postgres_url=postgres_url,
        max_items=max_items,
    )
