"""Deletion requests: people whose data FullStory must delete, and whom no run may send anything about again.

Where requests come from: a deletion source (the Variable `datafly_fullstory_deletions_uri`: a Parquet or
CSV file, a local path or fsspec URI, with a `user_id` and/or an `anonymous_id` column) and, for manual
runs, the params `delete_user_ids` / `delete_anonymous_ids`. `deletions_stage` (the DAG's `deletions`
task, before mapping):

1. reads and checks the source (a bad file, row or column fails the task, naming it: the requests could
   not all be recorded, so nothing about the run's people may be mapped yet);
2. records every request in the delivery ledger (`dffs_deletions`, ledger/deletion_ops.py), once per
   destination and person; from then on mapping filters that person's rows (mapping/suppression.py);
3. sends `DELETE /v2/users?uid=` for each user_id not deleted yet, through any client with
   `delete_user(uid)` (the FullStory hook retries 429/5xx/timeouts like delivery). Each answer is recorded:
   `deleted` is final (never sent again), a failure is recorded with its error and tried again by the next
   run; a failure never stops the other deletions or the run's delivery, it is a problem in the summary.

Anonymous ids are only suppressed: FullStory's server API has no anonymous users to delete (an anonymous
visitor's data there is tied to their browser sessions, and deleting it needs the uid they were identified
with). Nothing here imports Airflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from include.datafly_fullstory.errors import InputError, ParamError

COLUMNS = ("user_id", "anonymous_id")
MAX_ID_LENGTH = 512  # the ledger's key column; FullStory's uid limit (256) is checked at DELETE time
PARAM_SOURCE = "param"


class DeletionSourceError(InputError):
    """The deletion source cannot be used; the message names the file, and the row and column."""


class DeleteClient(Protocol):
    def delete_user(self, uid: str) -> Any: ...


# ---- reading the requests ----------------------------------------------------------------------------


def _format_of(uri: str) -> str:
    name = uri.lower().split("?", 1)[0]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise DeletionSourceError(
        f"deletion source {uri}: give a .parquet or .csv file (columns user_id and/or anonymous_id)"
    )


def _read_table(uri: str) -> tuple[list[str], dict[str, list], str]:
    """(column names, columns as Python lists, format)."""
    import fsspec

    kind = _format_of(uri)
    try:
        with fsspec.open(uri, "rb") as fh:
            if kind == "parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(fh)
                _check_parquet_types(uri, table)
                return table.column_names, {c: table.column(c).to_pylist() for c in table.column_names}, kind
            import pandas as pd

            frame = pd.read_csv(fh, dtype=str, keep_default_na=False)
    except DeletionSourceError:
        raise
    except FileNotFoundError as exc:
        raise DeletionSourceError(f"deletion source {uri}: no such file") from exc
    except Exception as exc:  # a corrupt file, a bad CSV: what a person must fix
        raise DeletionSourceError(f"deletion source {uri}: cannot read it as {kind}: {exc}") from exc
    return list(frame.columns), {c: frame[c].tolist() for c in frame.columns}, kind


def _check_parquet_types(uri: str, table) -> None:
    for column in table.column_names:
        kind = str(table.schema.field(column).type)
        if column in COLUMNS and kind not in ("string", "large_string", "null"):
            raise DeletionSourceError(
                f"deletion source {uri}: column {column} is of type {kind}; ids must be text (string)"
            )


def read_deletion_source(uri: str) -> list[tuple[str, str, str]]:
    """The requests of a deletion file: (person kind, id, source). Empty cells are absent; a row with no id
    at all, a column other than user_id / anonymous_id, or an id that is not usable text is an error that
    names the file, the row (1 = the first data row) and the column."""
    names, columns, kind = _read_table(uri)
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise DeletionSourceError(
            f"deletion source {uri}: unknown column(s) {unknown}; a deletion file has the columns "
            f"user_id and/or anonymous_id"
        )
    present = [c for c in COLUMNS if c in names]
    if not present:
        raise DeletionSourceError(f"deletion source {uri}: no user_id or anonymous_id column")
    rows = len(columns[present[0]])
    out: list[tuple[str, str, str]] = []
    for i in range(rows):
        found = 0
        for column in present:
            value = columns[column][i]
            if value is None or value == "":
                continue
            where = f"deletion source {uri}: row {i + 1}" + (f" (line {i + 2})" if kind == "csv" else "")
            _check_id(value, f"{where}, column {column}")
            out.append((column, value, uri))
            found += 1
        if not found:
            where = f"row {i + 1}" + (f" (line {i + 2})" if kind == "csv" else "")
            raise DeletionSourceError(
                f"deletion source {uri}: {where} has neither a user_id nor an anonymous_id "
                f"(columns {', '.join(present)} are empty)"
            )
    return out


def _check_id(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise DeletionSourceError(f"{where}: {type(value).__name__} value; ids must be text")
    if not value.strip():
        raise DeletionSourceError(f"{where}: the id is only whitespace")
    if value != value.strip():
        raise DeletionSourceError(f"{where}: the id has leading or trailing whitespace; give it exactly")
    if len(value) > MAX_ID_LENGTH:
        raise DeletionSourceError(f"{where}: the id is {len(value)} characters long, at most {MAX_ID_LENGTH}")


def param_requests(user_ids: Iterable[Any] | None, anonymous_ids: Iterable[Any] | None) -> list[tuple]:
    """The manual run's params as requests; a bad entry names the param and its position."""
    out = []
    for column, values in (("user_id", user_ids), ("anonymous_id", anonymous_ids)):
        if values is None:
            continue
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise ParamError(f"param delete_{column}s must be a list of strings, not {type(values).__name__}")
        for i, value in enumerate(values):
            try:
                _check_id(value, f"param delete_{column}s[{i}]")
            except DeletionSourceError as exc:
                raise ParamError(str(exc)) from None
            out.append((column, value, PARAM_SOURCE))
    return out


def collect_requests(
    source_uri: str | None, user_ids: Iterable[Any] | None = None, anonymous_ids: Iterable[Any] | None = None
) -> list[tuple[str, str, str]]:
    """The source's requests and the params', without repeats (the first source of a person is kept)."""
    requests = read_deletion_source(source_uri) if source_uri and source_uri.strip() else []
    seen: dict[tuple[str, str], tuple[str, str, str]] = {}
    for request in [*requests, *param_requests(user_ids, anonymous_ids)]:
        seen.setdefault(request[:2], request)
    return list(seen.values())


# ---- running them -------------------------------------------------------------------------------------


def run_deletions(ledger, destination: str, client: DeleteClient, run_id: str) -> dict[str, Any]:
    """Send the DELETE of every user_id due for this destination (pending, or failed before), one at a
    time; each answer is recorded. A uid another run is deleting right now is left to it."""
    deleted, failed, errors = 0, 0, []
    for uid in ledger.deletions_due(destination):
        if not ledger.start_deletion(destination, uid, run_id):
            continue
        try:
            client.delete_user(uid)
        except Exception as exc:  # recorded and reported; the next run tries again
            message = f"{type(exc).__name__}: {exc}"
            ledger.finish_deletion(destination, uid, error=message)
            failed += 1
            if message not in errors:
                errors.append(message)
        else:
            ledger.finish_deletion(destination, uid)
            deleted += 1
    return {"deleted": deleted, "failed": failed, "errors": errors[:3]}


def deletions_stage(
    plan: Mapping[str, Any] | Any,
    ledger_url: str | None,
    client: DeleteClient | None,
    *,
    source_uri: str | None = None,
    user_ids: Sequence[Any] | None = None,
    anonymous_ids: Sequence[Any] | None = None,
    client_destination: str | None = None,
) -> dict[str, Any]:
    """The DAG's `deletions` task: read the requests, record them, send the due deletions. Returns the
    run's `deletions` stats. A dry run reads and checks the requests only (no ledger: nothing recorded,
    nothing sent, and mapping suppresses no one)."""
    from include.datafly_fullstory.ledger import D_DELETED, Ledger
    from include.datafly_fullstory.run import RunPlan

    plan = RunPlan.from_xcom(plan)
    requests = collect_requests(source_uri, user_ids, anonymous_ids)
    stats: dict[str, Any] = {
        "requested": len(requests),
        "recorded": 0,
        "deleted": 0,
        "already_deleted": 0,
        "failed": 0,
        "suppressed_ids": sum(1 for r in requests if r[0] == "anonymous_id"),
        "outstanding": 0,
        "errors": [],
        "dry_run": plan.dry_run,
    }
    if plan.dry_run:
        return stats
    if not ledger_url:
        raise ParamError("no ledger URL: the task could not resolve the plan's ledger location")
    destination = plan.destination
    if client_destination is not None and client_destination != destination:
        raise ParamError(
            f"connection {plan.fullstory_conn_id!r} now names {client_destination}, but this run is for "
            f"{destination}; no deletion was sent. Start a new run for the new org"
        )
    ledger = Ledger(ledger_url)
    done_before = {r.person_key for r in ledger.deletion_rows(destination) if r.status == D_DELETED}
    stats["already_deleted"] = sum(1 for r in requests if r[0] == "user_id" and r[1] in done_before)
    stats["recorded"] = ledger.request_deletions(destination, requests)
    if ledger.deletions_due(destination):
        if client is None:
            raise ParamError("deletions are due but the task has no FullStory client")
        stats.update(run_deletions(ledger, destination, client, plan.run_id))
    stats["outstanding"] = sum(
        1 for r in ledger.deletion_rows(destination) if r.person_kind == "user_id" and r.status != D_DELETED
    )
    return stats


def deletion_problems(stats: Mapping[str, Any] | None) -> list[str]:
    """What the run's summary reports about its deletions: each failed DELETE is a problem for a person."""
    if not stats or not stats.get("failed"):
        return []
    errors = "; ".join(stats.get("errors") or [])
    return [
        f"{stats['failed']} deletion request(s) failed at FullStory ({errors}). Their people stay "
        "suppressed (nothing about them is sent) and the next run tries again; see the ledger's "
        "dffs_deletions rows with status 'failed'"
    ]
