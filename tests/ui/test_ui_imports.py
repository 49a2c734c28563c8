"""What the new provider modules load when imported, each in a fresh interpreter.

- The entry-point modules (the package, provider_info) import nothing from Airflow: Airflow imports them
  while its own configuration is starting, so an Airflow import there would be circular.
- Airflow executes every file of the plugins folder in every component, and the DAG imports alerts.py at
  parse time: none of them loads the pipeline (include.*), pandas, pyarrow, numpy, great_expectations, or
  FastAPI (built by the API server only, on first use).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARK = "LOADED:"
HEAVY = ("include", "pandas", "pyarrow", "numpy", "great_expectations", "fastapi")


def _loaded(code: str, home: Path, watched: tuple[str, ...]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
    )
    script = f"{code}\nimport sys\nprint({MARK!r}, sorted(m for m in sys.modules if m.split('.')[0] in {watched!r}))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=home, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
    line = next(line for line in done.stdout.splitlines() if line.startswith(MARK))
    return ast.literal_eval(line[len(MARK) :].strip())


@pytest.mark.parametrize("module", ["fullstory_provider", "fullstory_provider.provider_info"])
def test_entry_point_modules_import_nothing_from_airflow(tmp_path, module):
    assert _loaded(f"import {module}", tmp_path, ("airflow", *HEAVY)) == []


@pytest.mark.parametrize("module", ["reports", "report_app", "alerts", "links", "fullstory_plugin"])
def test_provider_modules_load_nothing_heavy(tmp_path, module):
    assert _loaded(f"import airflow.sdk\nimport fullstory_provider.{module}", tmp_path, HEAVY) == []


def test_loading_the_plugins_folder_builds_no_app(tmp_path):
    """As the scheduler, DAG processor and workers load plugins: the report app stays unbuilt."""
    code = (
        "from airflow import plugins_manager\n"
        "links = plugins_manager.get_global_operator_extra_links()\n"
        "refs = plugins_manager.get_deadline_references_plugins()\n"
        "assert [type(link).__name__ for link in links] == ['RunReportLink'], links\n"
        "assert list(refs) == ['fullstory_provider.alerts.WindowEndDeadline'], refs\n"
    )
    assert _loaded(code, tmp_path, HEAVY) == []
