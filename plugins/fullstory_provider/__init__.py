"""A provider-shaped FullStory integration living in the project's plugins folder.

  hooks.py       FullStoryHook: the Server API calls (batch import jobs by kind, events, users, GET /me)
  operators.py   FullStoryDeliveryOperator: wires the delivery core (include/datafly_fullstory) to the hook
  links.py       the "FullStory" extra link
  connection.py  the connection's fields, the data region they agree on, the destination they name
  exceptions.py  the errors, and FullStory's 4xx answers -> the narrow error
  retry.py       which answers are retried, and how long to wait
  ledger_db.py   the delivery ledger's database URL from a plan's `ledger` location

Nothing here imports pandas, pyarrow or the pipeline at import time: parsing the DAG loads none of them
(tests/dags/test_dag_integrity.py). The plugin below registers the link so the UI can show it on
serialized DAGs.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from fullstory_provider.links import FullStoryAppLink

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata in the shape Airflow's providers manager reads, for packaging this as a provider."""
    return {
        "package-name": "datafly-fullstory-provider",
        "name": "FullStory (Datafly)",
        "description": "FullStory Server API: batch import jobs for events and users.",
        "versions": [__version__],
        "connection-types": [
            {"hook-class-name": "fullstory_provider.hooks.FullStoryHook", "connection-type": "fullstory"}
        ],
        "extra-links": ["fullstory_provider.links.FullStoryAppLink"],
    }


class FullStoryProviderPlugin(AirflowPlugin):
    name = "fullstory_provider"
    operator_extra_links = [FullStoryAppLink()]
