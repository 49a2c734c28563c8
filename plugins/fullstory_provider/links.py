"""Extra links: "FullStory" on delivery tasks (the org in FullStory's app, na1 or eu1) and "Run report" on
every task of the sync DAG (the run's HTML report, served by the API server: report_app.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink

from fullstory_provider.reports import DAG_ID, report_url

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

XCOM_APP_URL = "fullstory_app_url"


class FullStoryAppLink(BaseOperatorLink):
    """Reads the URL the operator pushes before it starts waiting, so the link works on failed tries too."""

    name = "FullStory"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=XCOM_APP_URL) or ""


class RunReportLink(BaseOperatorLink):
    """The run's report, on every task of `datafly_fullstory_sync` (the delivery tasks, `summarise`, the
    others) and on no other DAG's: a global link (the plugin registers it), so the DAG file and the
    `@task` functions need nothing. The API server computes it when the UI asks, from the task instance's
    key alone: it exists for running and failed tries too; the page says when the report is not written
    yet."""

    name = "Run report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        if ti_key.dag_id != DAG_ID:
            return ""
        from airflow.configuration import conf

        return report_url(ti_key.run_id, conf.get("api", "base_url", fallback=None))
