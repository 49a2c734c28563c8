"""Claims: before anything is mapped, a run takes ownership of its rows in the delivery ledger.

Runs right after the extract stage wrote `validated/`. For each validated row, by `event_id`, in the run's
destination (FullStory org and region):

- nobody has it, or it was never sent (filtered, skipped, quarantined, refused by the mapping earlier):
  this run claims it and maps it;
- it was delivered, rejected or is `unknown`: the row keeps that outcome, with the run that sent it named,
  and is not sent again; `force` replays the recorded chunk instead (same bytes, same key, within
  FullStory's 24 h key memory), `replay_dead_letters` claims rejected rows again, `allow_duplicates`
  claims everything again (and may import duplicates);
- it is in a chunk that was POSTed but has not finished (a run stopped mid-delivery): this run resumes
  that chunk (same bytes, same key) and the row gets the chunk's outcome;
- another run claimed it and has not sent it yet: outcome `pending` naming that run, unless the claim
  is older than the claim lease (that run died): then this run takes it over, and the old chunk is
  abandoned first, so its owner can never POST it.

Writes: the filtered `validated/` parts (rows to map), `outcomes/ledger.parquet` (rows decided here), and
`resume/chunks.json` with `resume/<chunk>.index.parquet` (chunks of earlier runs this run resumes or
replays, and which of this run's rows they carry).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory import chunks, outcomes, validated
from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.errors import ForceRefused
from include.datafly_fullstory.state import RunStore


@dataclass
class ClaimOptions:
    force: bool = False
    replay_dead_letters: bool = False
    allow_duplicates: bool = False
    lease_s: float = lg.DEFAULT_CLAIM_LEASE_S


@dataclass
class ClaimReport:
    claimed: int = 0
    already_delivered: int = 0
    already_rejected: int = 0
    already_unknown: int = 0
    pending_elsewhere: int = 0
    taken_over: int = 0
    replayed_dead_letters: int = 0
    resumed_chunks: int = 0
    replay_chunks: int = 0
    orphaned_chunks: int = 0
    _resume: dict[int, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    _replay: dict[int, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def row_kinds(frame: pd.DataFrame) -> np.ndarray:
    return np.where(frame["type"].to_numpy(dtype=object) == "identify", "user", "event")


def new_items(frame: pd.DataFrame) -> lg.ClaimColumns:
    """Ledger items for the rows of a landing frame (rows without an event_id are not tracked)."""
    has_id = frame["event_id"].notna().to_numpy()
    frame = frame[has_id]
    ts = frame["timestamp"]
    seconds = (ts.astype("int64") / 1e9).where(ts.notna(), None) if len(ts) else ts
    return lg.ClaimColumns(
        frame["event_id"].astype(str).tolist(),
        row_kinds(frame).tolist(),
        frame["user_id"].astype(object).where(frame["user_id"].notna(), None).tolist(),
        [None if v is None or v != v else float(v) for v in seconds.tolist()],
    )


def claim_rows(
    store: RunStore,
    ledger: lg.Ledger,
    destination: str,
    window: tuple[str, str],
    options: ClaimOptions,
    *,
    orphans_since: float | None = None,
) -> ClaimReport:
    """Claim the run's validated rows (see the module docstring). Re-running it is safe: a run's own
    claims stay its own."""
    report = ClaimReport()
    run_id = store.run_id
    if options.force and not options.allow_duplicates:
        _check_force(store, ledger, destination)
    decided: list[pd.DataFrame] = []
    outcomes.remove_partial(store, "ledger")
    store.remove(chunks.RESUME)
    for part in validated.parts(store):
        table = validated.read_part(store, part)
        frame = table.select(["_row", "event_id", "type", "user_id", "timestamp"]).to_pandas()
        keep, rows_decided = _claim_frame(ledger, destination, run_id, window, options, frame, report)
        if rows_decided is not None:
            decided.append(rows_decided)
        if not keep.all():
            validated.replace_part(store, part, table.filter(pa.array(keep)))
    if decided:
        outcomes.write_outcomes(store, "ledger", pd.concat(decided, ignore_index=True))
    now = lg.wall_clock()
    if orphans_since is not None:
        for chunk in ledger.orphaned_chunks(
            destination, since=orphans_since, idle_before=now - options.lease_s
        ):
            report._resume.setdefault(chunk.id, [])
    _write_resume(store, ledger, report, options, now)
    return report


def _claim_frame(ledger, destination, run_id, window, options, frame, report):
    ids = frame["event_id"].astype(object).tolist()
    row_of = frame["_row"].to_numpy(dtype=np.int64)
    claimed_now = ledger.insert_claims(destination, run_id, new_items(frame), window=window)
    if claimed_now == len(ids):  # nobody had any of them: all the run's, nothing to read back
        report.claimed += len(ids)
        return np.ones(len(ids), dtype=bool), None
    found = ledger.lookup(destination, ids)
    now = lg.wall_clock()
    stale_before = now - options.lease_s
    take: dict[tuple, list[str]] = defaultdict(list)  # (from_states, from_run, unsent_chunk_only) -> ids
    abandon: set[int] = set()
    keep = np.zeros(len(frame), dtype=bool)
    verdicts: dict[str, tuple[str, str]] = {}
    for pos, event_id in enumerate(ids):
        item = found.get(event_id)
        if item is None:  # an id the insert could not record (cannot happen for validated rows)
            continue
        state, status = item.state, item.chunk_status
        if state == lg.CLAIMED and status in lg.CHUNK_POSTED:
            report._resume[item.chunk_id].append((int(row_of[pos]), event_id))
        elif state == lg.CLAIMED and item.run_id == run_id:
            keep[pos] = True
        elif state == lg.CLAIMED:
            chunk_idle = (
                status is None or status == lg.C_ABANDONED or (item.chunk_updated_at or 0) < stale_before
            )
            if (
                options.allow_duplicates
                or (item.claimed_at < stale_before and chunk_idle)
                or status == lg.C_ABANDONED
            ):
                if item.chunk_id is not None:
                    abandon.add(item.chunk_id)
                take[((lg.CLAIMED,), item.run_id, True)].append(event_id)
            else:
                verdicts[event_id] = (
                    "pending",
                    f"claimed by run {item.run_id}, which has not sent it yet; "
                    "that run delivers it (its outcome is in that run's stats)",
                )
        elif state in lg.UNSENT_STATES or options.allow_duplicates:
            take[((state,), None, False)].append(event_id)
        elif options.force and state in (lg.DELIVERED, lg.REJECTED) and item.chunk_id is not None:
            report._replay[item.chunk_id].append((int(row_of[pos]), event_id))
        elif state == lg.REJECTED and options.replay_dead_letters:
            take[((lg.REJECTED,), None, False)].append(event_id)
            report.replayed_dead_letters += 1
        else:
            verdicts[event_id] = _earlier(item)
    if abandon:
        ledger.abandon_stale_chunks(
            abandon, updated_before=float("inf") if options.allow_duplicates else stale_before
        )
    owned: set[str] = set()
    for (states, from_run, unsent_only), group in take.items():
        got = ledger.take_over(
            destination,
            run_id,
            group,
            from_states=states,
            from_run=from_run,
            unsent_chunk_only=unsent_only,
            window=window,
        )
        owned |= got
        if from_run is not None:
            report.taken_over += len(got)
        lost = [e for e in group if e not in got]
        if lost:  # another run changed them in the meantime: report what the ledger holds now
            for event_id, item in ledger.lookup(destination, lost).items():
                verdicts[event_id] = (
                    _earlier(item)
                    if item.state in lg.SENT_STATES
                    else ("pending", f"claimed by run {item.run_id} while this run was claiming it")
                )
    if owned:
        keep |= np.fromiter((e in owned for e in ids), dtype=bool, count=len(ids))
    report.claimed += int(keep.sum())
    for outcome, _ in verdicts.values():
        if outcome == "pending":
            report.pending_elsewhere += 1
        else:
            setattr(report, f"already_{outcome}", getattr(report, f"already_{outcome}") + 1)
    if not verdicts:
        return keep, None
    at = [pos for pos, e in enumerate(ids) if e in verdicts and not keep[pos]]
    return keep, outcomes.frame(
        row_of[at],
        [ids[p] for p in at],
        [verdicts[ids[p]][0] for p in at],
        [verdicts[ids[p]][1] for p in at],
        row_kinds(frame)[at],
    )


def _earlier(item: lg.ItemRow) -> tuple[str, str]:
    if item.state == lg.DELIVERED:
        return "delivered", f"delivered earlier by run {item.run_id} (not sent again)"
    if item.state == lg.REJECTED:
        return "rejected", (
            f"rejected earlier by run {item.run_id}: {item.code or ''}: {item.message or ''} "
            "(fix the cause, then run the window with replay_dead_letters)"
        )
    return "unknown", item.message or f"sent by run {item.run_id}; whether FullStory imported it is unknown"


def _write_resume(
    store: RunStore, ledger: lg.Ledger, report: ClaimReport, options: ClaimOptions, now: float
) -> None:
    """`resume/chunks.json`: chunks of the ledger this run delivers again (resume) or replays (force)."""
    entries = []
    wanted = {
        **{c: ("resume", rows) for c, rows in report._resume.items()},
        **{c: ("replay", rows) for c, rows in report._replay.items()},
    }
    rows_of = ledger.chunks_by_id(wanted)
    for chunk_id in sorted(wanted):
        mode, rows = wanted[chunk_id]
        chunk = rows_of[chunk_id]
        if mode == "replay":
            _check_replayable(chunk, now)
        name = f"{chunk.kind}-c{chunk.id:08d}"
        index, kept = chunks.write_resume_index(store, name, chunk.payload_uri, rows)
        entries.append(
            {
                "name": name,
                "kind": chunk.kind,
                "items": chunk.items,
                "bytes": chunk.bytes,
                "sha256": chunk.sha256,
                "idempotency_key": chunk.idempotency_key,
                "payload_uri": chunk.payload_uri,
                "index": index,
                "ledger_chunk_id": chunk.id,
                "mode": mode,
                "origin_run": chunk.run_id,
            }
        )
        if mode == "replay":
            report.replay_chunks += 1
        elif kept:
            report.resumed_chunks += 1
        else:
            report.orphaned_chunks += 1
    chunks.write_resume_manifest(store, entries)


def _check_force(store: RunStore, ledger: lg.Ledger, destination: str) -> None:
    """`force` replays chunks; refuse before claiming anything when one of them cannot be replayed."""
    sent: set[int] = set()
    for part in validated.parts(store):
        ids = validated.read_part(store, part, columns=["event_id"]).column("event_id").to_pylist()
        sent |= {
            item.chunk_id
            for item in ledger.lookup(destination, [i for i in ids if i]).values()
            if item.state in (lg.DELIVERED, lg.REJECTED) and item.chunk_id is not None
        }
    now = lg.wall_clock()
    for chunk in ledger.chunks_by_id(sent).values():
        _check_replayable(chunk, now)


def _check_replayable(chunk: lg.ChunkRow, now: float) -> None:
    when = datetime.fromtimestamp(chunk.first_post_at or 0, UTC).isoformat(timespec="seconds")
    age = chunk.key_age(now)
    if age is None or age > lg.KEY_SAFE_AGE_S:
        raise ForceRefused(
            f"force: chunk {chunk.name} of run {chunk.run_id} was first sent at {when} "
            f"({(age or 0) / 3600:.1f} h ago). FullStory forgets an Idempotency-Key after 24 h, so sending it "
            "again now would import its events a second time. Nothing was sent. To send these rows again "
            "anyway, run with allow_duplicates (FullStory then holds them twice)."
        )


def register_chunks(store: RunStore, ledger: lg.Ledger, destination: str, new: list[dict]) -> list[dict]:
    """Record a run's new chunks (manifest entries from the mapping) in the ledger, each with the items its
    index names; returns the entries with `payload_uri`, `ledger_chunk_id` and `mode` added."""
    registered = []
    for entry in new:
        payload_uri = chunks.payload_uri(store, entry["name"])
        row = ledger.register_chunk(
            destination,
            store.run_id,
            name=entry["name"],
            kind=entry["kind"],
            idempotency_key=entry["idempotency_key"],
            payload_uri=payload_uri,
            sha256=entry["sha256"],
            items_count=entry["items"],
            size=entry["bytes"],
            event_ids=chunks.chunk_event_ids(store, entry["name"]),
        )
        registered.append({**entry, "payload_uri": payload_uri, "ledger_chunk_id": row.id, "mode": "deliver"})
    return registered


def record_quarantine(store: RunStore, ledger: lg.Ledger, destination: str, window: tuple[str, str]) -> None:
    """Quarantined rows with an event id are recorded once (state `quarantined`), so the look-back does
    not read them again every hour; a re-run of their window re-validates them."""
    if not store.exists("quarantine.parquet"):
        return
    table = store.read_table("quarantine.parquet", columns=["event_id", "type", "user_id", "timestamp"])
    table = table.filter(pc.is_valid(table.column("event_id")))
    if table.num_rows:
        ledger.record_unclaimed(
            destination, store.run_id, new_items(table.to_pandas()), lg.QUARANTINED, window=window
        )
