"""`make demo`: the whole sync on a laptop, against the local FullStory emulator.

Initialises a project-local Airflow home (.airflow/, SQLite, no examples), applies
airflow_settings.yaml, generates a sample landing for the last three full hours, starts the emulator,
runs the DAG for each hourly window with `airflow dags test`, prints each run's stats, stops the
emulator and ends with the path of the last run's report (report.html, docs/report.md). Nothing is
written outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("AIRFLOW_HOME", ROOT / ".airflow"))
DAG_ID = "datafly_fullstory_sync"
HOURS = int(os.environ.get("DEMO_HOURS", "3"))
ROWS = int(os.environ.get("DEMO_ROWS", "6000"))
PORT = int(os.environ.get("DEMO_EMULATOR_PORT", "8089"))


def airflow_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(HOME),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME / 'airflow.db'}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
        }
    )
    return env


def run(cmd: list[str], env: dict[str, str], *, quiet: bool = False, timeout: int = 600) -> str:
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"demo: `{' '.join(cmd[:4])} ...` failed with exit code {result.returncode}")
    if not quiet:
        print(result.stdout.strip())
    return result.stdout


def main() -> int:
    env = airflow_env()
    os.environ.update(env)
    HOME.mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).parent / "airflow")
    print(f"Airflow home: {HOME}")
    run([airflow, "db", "migrate"], env, quiet=True)
    run([sys.executable, str(ROOT / "scripts" / "airflow_settings.py")], env)

    from include.datafly_fullstory.sample import generate_landing
    from include.fullstory_emulator.testing import EmulatorProcess

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=HOURS)
    landing = HOME / "demo" / "landing"
    shutil.rmtree(landing, ignore_errors=True)
    # A fresh emulator each time, so a fresh state store too: the delivery registry would otherwise (rightly)
    # refuse to send rows an earlier demo delivered.
    shutil.rmtree(HOME / "state", ignore_errors=True)
    files = generate_landing(landing, ROWS, start, hours=HOURS, seed=7)
    print(f"Sample landing: {ROWS} rows in {len(files)} files under {landing}")

    with EmulatorProcess(port=PORT) as emulator:
        print(f"FullStory emulator: {emulator.base_url} (region na1)")
        if PORT != 8089:  # airflow_settings.yaml points at 8089; an env connection wins over the DB's
            env["AIRFLOW_CONN_FULLSTORY_DEFAULT"] = json.dumps(
                {
                    "conn_type": "fullstory",
                    "host": emulator.base_url,
                    "password": emulator.api_key,
                    "extra": {"org_id": emulator.org_id, "data_region": "na1"},
                }
            )
        for hour in range(HOURS):
            window_end = start + timedelta(hours=hour + 1)
            began = time.monotonic()
            # With an hourly data-interval timetable, a run at T covers the hour that ended at T.
            run([airflow, "dags", "test", DAG_ID, window_end.isoformat()], env, quiet=True, timeout=900)
            print(
                f"  ran window {window_end - timedelta(hours=1):%H:%M}-{window_end:%H:%M} UTC "
                f"in {time.monotonic() - began:.1f}s"
            )
        held = emulator.state()
    last = print_stats_table(HOURS)
    print(f"Emulator holds {held.get('events', '?')} events and {held.get('users', '?')} users.")
    print_report(last)
    return 0


def print_report(stats: dict) -> None:
    """The last line: where the last run's report is (a self-contained page: open it in any browser)."""
    report = stats.get("report") or {}
    if report.get("error"):
        print(f"\nThe last run's report could not be rendered ({report['error']}); its page says so.")
    if not report.get("path") or not Path(report["path"]).is_file():
        raise SystemExit(f"demo: the last run wrote no report (stats.json says {report})")
    print(f"\nRun report of the last window (open it in a browser): {report['path']}")


def _share(stats: dict) -> str:
    """Stitched events as a share of the events mapped into chunks."""
    stitched = stats["identity"]["stitched"] + stats["identity"]["stitched_late"]
    mapped = sum(stats.get("identification", {}).values()) - stats.get("identification", {}).get("skipped", 0)
    return f"{stitched / mapped:.0%}" if mapped else "-"


def print_stats_table(hours: int) -> dict:
    import orjson

    runs = HOME / "state" / "runs"
    # The state folder is this demo's alone: every run in it is one of its windows.
    rows = sorted(
        (orjson.loads(p.read_bytes()) for p in runs.glob("*/stats.json")), key=lambda s: s["window_start"]
    )
    header = (
        "window (UTC)",
        "read",
        "delivered",
        "rejected",
        "quarantined",
        "filtered",
        "skipped",
        "stitched",
        "events",
        "users",
        "requests",
        "batches",
        "secs",
    )
    print("\n" + " | ".join(header))
    print("-+-".join("-" * len(h) for h in header))
    for s in rows:
        r = s["rows"]
        cells = (
            f"{s['window_start'][11:16]}-{s['window_end'][11:16]}",
            r["read"],
            r["delivered"],
            r["rejected"],
            r["quarantined"],
            r["filtered"],
            r["skipped"],
            f"{s['identity']['stitched'] + s['identity']['stitched_late']} ({_share(s)})",
            s["events"]["delivered"],
            s["users"]["delivered"],
            s["http"]["requests"],
            s["batches"],
            f"{s['duration_s']:.1f}",
        )
        print(" | ".join(str(c).rjust(len(h)) for c, h in zip(cells, header, strict=True)))
    if len(rows) < hours:
        raise SystemExit(f"demo: expected {hours} runs' stats under {runs}, found {len(rows)}")
    print_reasons(Path(rows[-1]["artifacts"]))
    print(f"\nRun artifacts (outcomes, quarantine, dead letters, payloads): {runs}")
    print(
        f"Delivery ledger (what reached FullStory, per org; SQL in docs/exactly-once.md): "
        f"{runs.parent / 'ledger.sqlite'}"
    )
    return rows[-1]


def print_reasons(run_dir: Path) -> None:
    """Why rows of the last run were not delivered: every row has an outcome and a reason."""
    import pyarrow.parquet as pq

    table = pq.read_table(run_dir / "outcomes.parquet", columns=["outcome", "reason"]).to_pandas()
    other = table[table["outcome"] != "delivered"]
    # Reasons that name a run, a time or a row are grouped under one line: <run>, <time>, <row>.
    reason = (
        other["reason"]
        .fillna("")
        .str.replace(r"run \S+?(?=:\s|,\s|\)|\s|$)", "run <run>", regex=True)
        .str.replace(r"\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)?", "<time>", regex=True)
        .str.replace(r"\(row [^)]*\)", "(row <row>)", regex=True)
        .str.slice(0, 110)
    )
    counts = other.assign(reason=reason).value_counts().head(10)
    stitched = table["reason"].fillna("").str.startswith("stitched").sum()
    print(f"\nThe last window: {stitched} events delivered stitched (anonymous_id -> user, docs/mapping.md).")
    print(f"Why its other {len(other)} rows were not delivered (top reasons):")
    for (outcome, why), n in counts.items():
        print(f"  {n:>5}  {outcome:<12} {why}")


if __name__ == "__main__":
    sys.exit(main())
