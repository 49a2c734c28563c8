"""A demo run for the report tests, made once per session (only when a report test asks for it).

The sample landing (include/datafly_fullstory/sample) over three hours, run window by window through the
DAG's real tasks (tests/integration/sync_driver.py: plan, extract, map, the delivery operator with the real
hook, summarise) against the session's FullStory emulator over HTTP, with the SQLite ledger. The last
window meets a 429 storm (two answers) and FullStory rejects its `purchase` events, so every part of the
report has something to show.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing
from tests.integration.sync_driver import SyncDriver

H10 = datetime(2026, 11, 20, 10, tzinfo=UTC)
HOURS = 3
ROWS = 900  # about 300 a window: several chunks of 60 items each


@pytest.fixture(scope="session")
def report_demo(tmp_path_factory, fullstory_emulator_session):
    """(driver, runs, api key): three scheduled runs, oldest first; their run folders stay for the session."""
    emu = fullstory_emulator_session
    emu.reset()
    root = tmp_path_factory.mktemp("report-demo")
    table = generate_table(
        LandingSpec(rows=ROWS, start=H10, end=H10 + timedelta(hours=HOURS), seed=11, bad_fraction=0.02)
    )
    write_landing(table, root / "landing")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AIRFLOW_CONN_FULLSTORY_DEFAULT", "AIRFLOW_CONN_DFFS_LEDGER"):
            mp.delenv(name, raising=False)  # the driver sets the connection; restored after the runs
        driver = SyncDriver(landing=root / "landing", state=root / "state", airflow_home=root, emulator=emu)
        runs = []
        try:
            for hour in range(HOURS):
                start = H10 + timedelta(hours=hour)
                if hour == HOURS - 1:
                    emu.set_faults(throttle_next=2, retry_after=0, reject_event_names=["purchase"])
                run = driver.go(driver.new_run(f"scheduled__{start.isoformat()}", hour=start))
                assert run.error is None and "summarise" in run.done, run.error
                runs.append(run)
        finally:
            emu.reset()
            lg.dispose_engines()
    return driver, runs, emu.api_key
