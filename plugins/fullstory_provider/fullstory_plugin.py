"""The Airflow plugin of the FullStory integration (Airflow loads it from the plugins folder).

- `fastapi_apps`: the run report pages, mounted by the API server at `/datafly-fullstory` (report_app.py);
  built only when the API server asks for them, so other components never import FastAPI for it.
- `global_operator_extra_links`: "Run report" on every task of `datafly_fullstory_sync` (links.py).
- `operator_extra_links`: "FullStory" (the org in FullStory's app) for the UI of serialized DAGs.
- `deadline_references`: the window-end reference of the sync's finish deadline (alerts.py), which the
  scheduler must find to evaluate the DAG's DeadlineAlert.

This is the package's only AirflowPlugin class, and nothing imports this module: Airflow executes each
file of the plugins folder and registers the plugin classes it finds, so a second import would register
it twice.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from fullstory_provider.alerts import WindowEndDeadline
from fullstory_provider.links import FullStoryAppLink, RunReportLink


class FullStoryProviderPlugin(AirflowPlugin):
    name = "fullstory_provider"
    operator_extra_links = [FullStoryAppLink()]
    global_operator_extra_links = [RunReportLink()]
    deadline_references = [WindowEndDeadline]

    @property
    def fastapi_apps(self) -> list[dict]:
        from fullstory_provider.report_app import app_spec

        return [app_spec()]
