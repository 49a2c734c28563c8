"""Plan-time refusal of locations that only work on one machine, under an executor that may run a run's
tasks on several (Celery, Kubernetes, Edge, ...): a local state folder, a local landing folder, the SQLite
ledger. Each message names the location and the Variable to set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from include.datafly_fullstory.errors import ParamError
from include.datafly_fullstory.run import (
    check_distributed_locations,
    distributed_executor,
    is_local_path,
    plan_run,
)

H = datetime(2026, 11, 26, 7, tzinfo=UTC)


def _plan(*, executor, landing="s3://lake/events", state="s3://ops/state", ledger="ledger_pg", mount=None):
    return plan_run(
        params={},
        run_id="scheduled__2026-11-26T07:00:00+00:00",
        landing_uri=landing,
        state_uri=state,
        airflow_home="/usr/local/airflow",
        data_interval_start=H,
        data_interval_end=H + timedelta(hours=1),
        destination="o-1A2B3C-na1@na1",
        ledger_conn_id=ledger,
        executor=executor,
        shared_mount=mount,
    )


@pytest.mark.parametrize(
    ("setting", "name"),
    [
        ("LocalExecutor", None),
        ("airflow.executors.local_executor.LocalExecutor", None),
        ("", None),
        (None, None),
        ("CeleryExecutor", "CeleryExecutor"),
        ("airflow.providers.celery.executors.celery_executor.CeleryExecutor", "CeleryExecutor"),
        ("KubernetesExecutor", "KubernetesExecutor"),
        ("CeleryKubernetesExecutor", "CeleryKubernetesExecutor"),
        ("airflow.providers.edge3.executors.EdgeExecutor", "EdgeExecutor"),
        # Airflow 3 takes several executors; the DAG's tasks can be sent to any of them.
        ("LocalExecutor,CeleryExecutor", "CeleryExecutor"),
        (
            "LocalExecutor, ecs:airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor",
            "AwsEcsExecutor",
        ),
        ("my_local:airflow.executors.local_executor.LocalExecutor", None),
    ],
)
def test_which_executors_count_as_distributed(setting, name):
    assert distributed_executor(setting) == name


def test_local_paths():
    assert is_local_path("/opt/state") and is_local_path("file:///mnt/state") and is_local_path("state")
    assert (
        not is_local_path("s3://b/state")
        and not is_local_path("gs://b/x")
        and not is_local_path("abfs://c/x")
    )


def test_object_store_state_and_landing_with_a_postgres_ledger_plan_on_celery():
    plan = _plan(executor="CeleryExecutor")
    assert (plan.state_uri, plan.landing_uri, plan.ledger) == (
        "s3://ops/state",
        "s3://lake/events",
        {"conn_id": "ledger_pg"},
    )


def test_a_local_state_folder_on_celery_is_refused_saying_what_to_set():
    with pytest.raises(ParamError) as refused:
        _plan(executor="CeleryExecutor", state="/data/state")
    message = str(refused.value)
    assert message.startswith("the executor is CeleryExecutor, which may run this run's tasks on different")
    assert "the state location /data/state is a folder on the worker's own disk" in message
    assert (
        "datafly_fullstory_state_uri to an object-store URI (s3://bucket/prefix, gs://bucket/prefix)"
        in message
    )
    assert "set the Airflow Variable datafly_fullstory_shared_mount to true" in message
    assert "landing" not in message and "ledger" not in message  # only what is wrong


def test_the_default_state_folder_is_named_as_the_default():
    with pytest.raises(ParamError, match=r"the default state folder /usr/local/airflow/state is a folder"):
        _plan(executor="KubernetesExecutor", state=None)


def test_a_local_landing_on_kubernetes_is_refused():
    with pytest.raises(ParamError) as refused:
        _plan(executor="KubernetesExecutor", landing="landing/events")
    message = str(refused.value)
    assert "the landing /usr/local/airflow/landing/events (datafly_landing_uri) is a folder" in message
    assert "extract task may run on a worker that does not have these files" in message
    assert "datafly_fullstory_shared_mount" in message and "state location" not in message


def test_every_problem_is_named_in_one_message():
    with pytest.raises(ParamError) as refused:
        _plan(executor="CeleryExecutor", landing="/lake", state="file:///data/state", ledger=None)
    message = str(refused.value)
    assert message.count("; and ") == 2
    for part in ("state location file:///data/state", "landing /lake", "datafly_fullstory_ledger_conn_id"):
        assert part in message


def test_a_shared_mount_accepts_local_folders_but_never_the_sqlite_ledger():
    plan = _plan(executor="CeleryExecutor", landing="/mnt/efs/landing", state="/mnt/efs/state", mount="true")
    assert (plan.landing_uri, plan.state_uri) == ("/mnt/efs/landing", "/mnt/efs/state")
    assert (
        _plan(executor="CeleryExecutor", state="/mnt/efs/state", mount=" Yes ").state_uri == "/mnt/efs/state"
    )
    with pytest.raises(ParamError) as refused:
        _plan(executor="CeleryExecutor", state="/mnt/efs/state", mount=True, ledger=None)
    assert "SQLite default" in str(refused.value) and "state location" not in str(refused.value)
    with pytest.raises(ParamError, match="state location"):
        _plan(executor="CeleryExecutor", state="/mnt/efs/state", mount="false")


def test_a_shared_mount_value_that_is_not_a_boolean_is_refused():
    with pytest.raises(ParamError, match=r"datafly_fullstory_shared_mount='maybe' must be true or false"):
        _plan(executor="CeleryExecutor", state="/mnt/efs/state", mount="maybe")


def test_local_executors_keep_local_folders_and_the_sqlite_ledger():
    plan = _plan(executor="LocalExecutor", landing="/lake", state="/data/state", ledger=None)
    assert plan.ledger == {"url": "sqlite:////data/state/ledger.sqlite"}
    check_distributed_locations("/lake", "/data/state", executor=None)  # no executor known: nothing refused
