"""A provider-shaped FullStory integration living in the project's plugins folder.

  hooks.py            FullStoryHook: the Server API calls (batch import jobs by kind, events, users, GET /me)
  operators.py        FullStoryDeliveryOperator: wires the delivery core (include/datafly_fullstory) to the hook
  links.py            the "FullStory" extra link, and the "Run report" link on the sync DAG's tasks
  connection.py       the connection's fields, the data region they agree on, the destination they name
  exceptions.py       the errors, and FullStory's 4xx answers -> the narrow error
  retry.py            which answers are retried, and how long to wait
  ledger_db.py        the delivery ledger's database URL from a plan's `ledger` location
  provider_info.py    the provider metadata (the `fullstory` connection type and its form)
  reports.py          where a run's report is and who may read it (plain logic)
  report_app.py       the API server's report pages (a FastAPI app)
  alerts.py           the run alerts: failure, threshold and deadline notifications
  fullstory_plugin.py the Airflow plugin: report app, links, the deadline reference

Installed as a distribution (pyproject.toml), the package registers the `apache_airflow_provider` entry
point, which Airflow reads while starting up: this file and provider_info.py import nothing from Airflow.
Nothing here imports pandas, pyarrow or the pipeline at import time: parsing the DAG loads none of them
(tests/dags/test_dag_integrity.py).
"""

from __future__ import annotations

from fullstory_provider.provider_info import VERSION, get_provider_info

__version__ = VERSION
__all__ = ["__version__", "get_provider_info"]
