"""The ledger's consent table `dffs_consent`: per destination and person (`user:<user_id>` or
`anon:<anonymous_id>`), the latest consent state the mapping has seen (`granted` or `denied`), when
(the row's timestamp, epoch seconds), which row and which run recorded it.

A newer state replaces an older one (at equal times a denial wins), whatever order runs see them in, so the
table converges on each person's latest state. The mapping stage records its window's states and reads back
the denials newer than its earliest row: a person who revoked consent in a later (or earlier-run) window stops
their rows that were not sent yet (mapping/consent.py, docs/mapping.md "Consent")."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from include.datafly_fullstory.ledger.engine import LedgerBase
from include.datafly_fullstory.ledger.schema import metadata

consent = sa.Table(
    "dffs_consent",
    metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("person", sa.Text, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # granted | denied
    sa.Column("at", sa.Float, nullable=False),  # the deciding row's timestamp (epoch seconds)
    sa.Column("event_id", sa.Text),  # the deciding row
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
sa.Index("dffs_consent_state", consent.c.destination, consent.c.state, consent.c.at)

CONSENT_STATES = ("granted", "denied")


class ConsentOps(LedgerBase):
    """Operations on `dffs_consent`."""

    def record_consent(
        self, destination: str, run_id: str, entries: Iterable[tuple[str, str, float, str | None]]
    ) -> int:
        """Record (person, state, at, event_id) entries, one per person; a stored state is replaced only by a
        newer one (or, at the same time, by a denial). Set-based through the batch table."""
        rows = []
        for person, state, at, event_id in entries:
            if state not in CONSENT_STATES:
                raise ValueError(f"consent state {state!r} is not one of {CONSENT_STATES}")
            rows.append((person, state, None if event_id is None else str(event_id), None, float(at)))
        if not rows:
            return 0
        sql = sa.text(
            "INSERT INTO dffs_consent (destination, person, state, at, event_id, run_id, updated_at) "
            "SELECT :d, b.event_id, b.a, b.t, b.b, :r, :now FROM dffs_batch b WHERE true "
            "ON CONFLICT (destination, person) DO UPDATE SET state = excluded.state, at = excluded.at, "
            "event_id = excluded.event_id, run_id = excluded.run_id, updated_at = excluded.updated_at "
            "WHERE excluded.at > dffs_consent.at OR (excluded.at = dffs_consent.at "
            "AND excluded.state = 'denied' AND dffs_consent.state <> 'denied')"
        )
        with self._tx() as conn:
            self._load_batch(conn, rows)
            return conn.execute(sql, {"d": destination, "r": run_id, "now": self._now()}).rowcount

    def consent_denials(self, destination: str, *, since: float) -> list[tuple[str, float, str | None]]:
        """(person, at, event_id) of the persons whose latest recorded state is a denial after `since`."""
        query = sa.select(consent.c.person, consent.c.at, consent.c.event_id).where(
            consent.c.destination == destination, consent.c.state == "denied", consent.c.at > since
        )
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]

    def consent_of(self, destination: str, person: str) -> tuple[str, float, str | None, str] | None:
        """(state, at, event_id, run_id) recorded for one person, or None."""
        query = sa.select(consent.c.state, consent.c.at, consent.c.event_id, consent.c.run_id).where(
            consent.c.destination == destination, consent.c.person == person
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else tuple(row)
