"""DAG policy over a real DagBag: no import errors, tags, retries, parsing that touches nothing and loads
neither the pipeline (include.*) nor pandas, pyarrow, numpy or great_expectations."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def dagbag():
    return _dagbag()


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}, "\n".join(f"{k}: {v}" for k, v in dagbag.import_errors.items())
    assert "datafly_fullstory_sync" in dagbag.dags


@pytest.mark.parametrize("dag_id", ["datafly_fullstory_sync"])
def test_tags_retries_and_docs(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags, f"{dag_id} has no tags"
    assert dag.doc_md and "FullStory" in dag.doc_md
    for t in dag.tasks:
        assert t.retries >= 2, f"{dag_id}.{t.task_id} has retries={t.retries}; the policy is >= 2"


def test_hourly_data_interval_timetable_utc(dagbag):
    from airflow.timetables.interval import CronDataIntervalTimetable

    dag = dagbag.dags["datafly_fullstory_sync"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.summary in ("@hourly", "0 * * * *")
    assert str(dag.timezone) in ("UTC", "Timezone('UTC')")
    assert dag.catchup is False
    assert dag.max_active_runs >= 1


def test_params_are_typed_with_titles(dagbag):
    dag = dagbag.dags["datafly_fullstory_sync"]
    for name in (
        "window_start",
        "window_end",
        "dry_run",
        "event_types",
        "replay_dead_letters",
        "force",
        "fullstory_conn_id",
    ):
        param = dag.params.get_param(name)
        assert param.schema.get("type"), f"param {name} has no type"
        assert param.schema.get("title") and param.description, (
            f"param {name} needs a title and a description"
        )


def test_parsing_does_no_io(monkeypatch):
    """Parse with no connection and no variable set, with network and non-code file access recorded."""
    for key in list(os.environ):
        if key.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_")):
            monkeypatch.delenv(key)
    import airflow.dag_processing.dagbag  # noqa: F401  (import cost outside the audited window)
    import airflow.sdk  # noqa: F401

    seen: list[str] = []
    code_suffixes = (".py", ".pyc", ".so", ".pth", ".json", ".yaml", ".yml", ".cfg", ".txt", ".typed")

    def audit(event, args):
        if event == "socket.connect":
            seen.append(f"socket.connect {args[1]!r}")
        elif event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            if any(c in mode for c in "wax+"):
                seen.append(f"write {path}")
            elif not path.endswith(code_suffixes) and not os.path.isdir(path) and "/proc/" not in path:
                seen.append(f"read {path}")

    active = [True]
    sys.addaudithook(lambda e, a: audit(e, a) if active[0] else None)
    original_connect = socket.socket.connect
    try:
        bag = _dagbag()
    finally:
        active[0] = False
    assert socket.socket.connect is original_connect
    assert bag.import_errors == {}
    assert "datafly_fullstory_sync" in bag.dags
    assert [s for s in seen if "socket" in s or s.startswith("write")] == []
    assert [s for s in seen if str(ROOT) not in s and "site-packages" not in s and "/usr/" not in s] == []


# ---- what parsing loads ------------------------------------------------------------------------------


HEAVY = ("pandas", "pyarrow", "numpy", "great_expectations")  # the pipeline's, loaded by tasks only
PROVIDER_MODULES = ("hooks", "operators", "links", "ledger_db", "exceptions", "connection", "retry")
MARK = "LOADED-MODULES:"


def _loaded_after(code: str, home: Path, watched: tuple[str, ...]) -> list[str]:
    """Run `code` in a fresh interpreter set up as tests/conftest.py sets this session up, and return the
    loaded modules whose top-level package is in `watched`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "PYTHON"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
    )
    script = (
        f"{code}\nimport sys\n"
        f"print({MARK!r}, sorted(m for m in sys.modules if m.split('.')[0] in {watched!r}), flush=True)\n"
    )
    # cwd is the empty home, so nothing but PYTHONPATH puts the project on sys.path.
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=home, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    line = next(line for line in done.stdout.splitlines() if line.startswith(MARK))
    return ast.literal_eval(line[len(MARK) :].strip())


def _named(loaded: list[str]) -> str:
    """include.* modules by name, the others as package (module count)."""
    tops = sorted({m.split(".")[0] for m in loaded} - {"include"})
    own = [m for m in loaded if m.split(".")[0] == "include"]
    return ", ".join(
        [*own, *(f"{top} ({sum(m.split('.')[0] == top for m in loaded)} modules)" for top in tops)]
    )


PARSE_THE_DAG = f"""
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
import fullstory_provider
{"".join(f"import fullstory_provider.{name}{chr(10)}" for name in PROVIDER_MODULES)}
bag = DagBag(dag_folder={str(DAGS)!r})
assert bag.import_errors == {{}}, bag.import_errors
assert "datafly_fullstory_sync" in bag.dags, sorted(bag.dags)
"""


def test_parsing_the_dag_loads_no_pandas_pyarrow_numpy_or_pipeline(tmp_path):
    """The provider and the DAG file load none of the pipeline's heavy libraries nor the pipeline itself
    (include.*) when the DAG is parsed: every task imports them inside execute."""
    loaded = _loaded_after(PARSE_THE_DAG, tmp_path, (*HEAVY, "include"))
    if loaded:
        # Say whether Airflow alone already loads them (then the test must compare against that baseline).
        baseline = _loaded_after(
            "import airflow.sdk\nfrom airflow.dag_processing.dagbag import DagBag", tmp_path, HEAVY
        )
        pytest.fail(
            f"parsing the DAG loaded {_named(loaded)}; Airflow alone loads {_named(baseline) or 'none'}"
        )


@pytest.mark.parametrize("module", PROVIDER_MODULES)
def test_provider_modules_import_nothing_from_include(tmp_path, module):
    loaded = _loaded_after(f"import fullstory_provider.{module}", tmp_path, (*HEAVY, "include"))
    assert not loaded, f"importing fullstory_provider.{module} loaded {_named(loaded)}"
