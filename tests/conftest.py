"""Test-session set-up shared by every test folder.

Airflow reads AIRFLOW_HOME when it is first imported, so the throwaway home is set here, before any
test module imports airflow; nothing is ever written to ~/airflow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_HOME = Path(tempfile.mkdtemp(prefix="dffs-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME / 'airflow.db'}"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.setdefault("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "plugins")]))

# The FullStory emulator as fixtures: `fullstory_emulator`, `fullstory_emulator_factory`; a real Postgres
# server (`postgres_server`) and a fresh ledger database per test (`ledger_url`, SQLite and Postgres).
pytest_plugins = ["include.fullstory_emulator.pytest_plugin", "tests.db_servers"]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db():
    """An initialised metadata DB (SQLite in the throwaway home), once per test session."""
    from airflow.utils import db

    db.initdb()
    return _HOME


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repo: FullStory's verbatim Swagger specs. A user's clone does not have it: the
    checks against the verbatim specs then skip, saying so; in CI (CI=true), where it is laid beside the
    repo, a missing folder fails them instead."""
    path = Path(os.environ.get("DATAFLY_SHARED_DIR", ROOT.parent / "shared"))
    if not (path / "reference" / "fullstory-api").is_dir():
        missing_specs(path / "reference" / "fullstory-api")
    return path


def missing_specs(path: Path) -> None:
    message = (f"FullStory's verbatim Swagger specs are not at {path}: the checks against them did not run "
               "(set DATAFLY_SHARED_DIR or FULLSTORY_SPEC_DIR to the folder holding them)")
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
