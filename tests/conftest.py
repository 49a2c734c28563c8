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
    """../shared beside the repo (or DATAFLY_SHARED_DIR): FullStory's verbatim Swagger specs. A user's
    clone does not have it: the checks against the verbatim specs then skip, saying so; in CI (CI=true),
    where it is laid beside the repo, a missing folder fails them instead. The project's own schema
    (include/fullstory_emulator/schema.py) is checked without it."""
    path = Path(os.environ.get("DATAFLY_SHARED_DIR", ROOT.parent / "shared"))
    if not (path / "reference" / "fullstory-api").is_dir():
        missing_specs(path / "reference" / "fullstory-api")
    return path


def spec_folder() -> Path:
    """The folder of the verbatim specs: FULLSTORY_SPEC_DIR, else reference/fullstory-api in the shared folder."""
    if os.environ.get("FULLSTORY_SPEC_DIR"):
        return Path(os.environ["FULLSTORY_SPEC_DIR"])
    return Path(os.environ.get("DATAFLY_SHARED_DIR", ROOT.parent / "shared")) / "reference" / "fullstory-api"


def missing_specs(path: Path) -> None:
    message = (
        f"FullStory's verbatim Swagger specs are not at {path}: the checks against them did not run "
        "(lay the shared folder beside the repo as ../shared, or set DATAFLY_SHARED_DIR to it; "
        "FULLSTORY_SPEC_DIR, the spec folder itself, comes first for the emulator contract test)"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
