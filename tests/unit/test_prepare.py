"""`prepare.prepare_window` reads the validated parts once for the consent revocations and the identity
pairs; it must give exactly what `consent.revocations` and `identity.window_pairs` give reading them apart."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from include.datafly_fullstory import sample, validated
from include.datafly_fullstory.blueprint import load_blueprint
from include.datafly_fullstory.mapping import MappingSettings
from include.datafly_fullstory.mapping.consent import SCAN_COLUMNS, collapse, revocations
from include.datafly_fullstory.mapping.identity import window_pairs
from include.datafly_fullstory.mapping.prepare import prepare_window
from include.datafly_fullstory.state import RunStore
from tests.mapping_rows import NOW


@pytest.fixture
def store(tmp_path) -> RunStore:
    spec = sample.LandingSpec(rows=12_000, start=NOW - timedelta(hours=2), end=NOW, seed=3, bad_fraction=0.0)
    table = sample.generate_table(spec)
    rows = table.num_rows
    table = table.append_column("_row", pa.array(np.arange(rows), type=pa.int64())).append_column(
        "_file", pa.array(np.full(rows, "landing/part-0.parquet"), type=pa.string())
    )
    store = RunStore(str(tmp_path / "state"), "run")
    validated.write_parts(store, table, 5_000)
    return store


def history(latest: pd.DataFrame, earliest_ns: int) -> pd.DataFrame:
    """A ledger's answer: this window's states plus an earlier run's denial of one person."""
    earlier = pd.DataFrame(
        {
            "person": ["user:user-7"],
            "at_ns": np.array([earliest_ns + 10**9], dtype=np.int64),
            "state": ["denied"],
            "event_id": ["evt-earlier"],
        }
    )
    return collapse(pd.concat([latest, earlier], ignore_index=True))


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("with_history", [False, True])
def test_one_pass_gives_what_the_two_passes_give(store, explicit, with_history):
    bp = load_blueprint()
    settings = MappingSettings(require_explicit_consent=explicit, batch_rows=3_000)
    kept = history if with_history else None
    facts = prepare_window(store, bp, settings, kept)
    apart = revocations(validated.iter_frames(store, settings.batch_rows, columns=SCAN_COLUMNS), bp, kept)
    assert len(apart) > 10  # the sample denies consent for some people
    assert facts.revocations.at_ns == apart.at_ns
    assert facts.revocations.event_id == apart.event_id
    pairs = window_pairs(store, bp, settings)
    assert len(pairs) > 1000
    pd.testing.assert_frame_equal(facts.pairs, pairs)
    without = prepare_window(store, bp, settings, kept, with_pairs=False)
    assert without.revocations.at_ns == apart.at_ns and len(without.pairs) == 0


def test_an_empty_run(tmp_path):
    store = RunStore(str(tmp_path / "state"), "run")
    facts = prepare_window(store, load_blueprint(), MappingSettings(), history)
    assert len(facts.revocations) == 0 and len(facts.pairs) == 0
