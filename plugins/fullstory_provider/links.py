"""The "FullStory" button on delivery tasks: opens the org in FullStory's app (na1 or eu1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink

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
