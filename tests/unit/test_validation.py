"""Row-level validation with Great Expectations: every rule, duplicates across batches, the summary."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from include.datafly_fullstory import sample, validation
from include.datafly_fullstory.landing import FRAME_SCHEMA, iter_window_batches
from include.datafly_fullstory.validation import (
    RULES,
    SeenEventIds,
    build_suite,
    merge_summaries,
    validate_batch,
)
from include.datafly_fullstory.window import Window

WINDOW = Window(datetime(2026, 11, 26, 8, tzinfo=UTC), datetime(2026, 11, 26, 9, tzinfo=UTC))
INSIDE = WINDOW.start + timedelta(minutes=10)


def good(i: int, **overrides) -> dict:
    row = {
        "event_id": f"evt-{i}",
        "type": "track",
        "event": "Order Completed",
        "anonymous_id": f"dfid-{i}",
        "timestamp": INSIDE,
        "received_at": INSIDE,
        "context": '{"ip": "203.0.113.1"}',
        "properties": '{"order_id": "O1"}',
        "traits": None,
        "_file": "/landing/p.parquet",
    }
    row.update(overrides)
    return row


def frame(rows: list[dict], first_row: int = 0) -> pd.DataFrame:
    """A landing frame as the reader yields it (index == _row)."""
    for k, row in enumerate(rows):
        row["_row"] = first_row + k
    df = pa.Table.from_pylist(rows, schema=FRAME_SCHEMA).to_pandas()
    df.index = pd.Index(df["_row"].to_numpy())
    return df


BAD_ROWS = {
    "event_id_not_null": {"event_id": None},
    "type_not_null": {"type": None},
    "type_known": {"type": "pageview"},
    "timestamp_not_null": {"timestamp": None},
    "timestamp_in_window": {"timestamp": WINDOW.end},
    "anonymous_id_not_null": {"anonymous_id": None},
    "track_has_event_name": {"event": None},
    "context_is_json_object": {"context": '["not", "an", "object"]'},
    "properties_is_json_object": {"properties": '{"product_id": "P1", "price": 12.5'},
    "traits_is_json_object": {"type": "identify", "traits": "42"},
    "identify_has_traits": {"type": "identify", "event": None, "traits": None},
}


@pytest.mark.parametrize("rule", sorted(BAD_ROWS))
def test_each_rule_quarantines_its_bad_row_and_keeps_the_rest(rule):
    df = frame([good(0), good(1, **BAD_ROWS[rule]), good(2)], first_row=40)
    valid, quarantined, summary = validate_batch(df, WINDOW, SeenEventIds())
    assert valid["_row"].tolist() == [40, 42]
    assert quarantined["_row"].tolist() == [41]
    assert quarantined["failed_expectations"].iloc[0] == [rule]
    assert quarantined["reason"].iloc[0] == RULES[rule]
    assert summary["expectations"][rule]["unexpected"] == 1
    assert summary["expectations"][rule]["success"] is False
    assert summary["rows"] == 3 and summary["rows_failed"] == 1


def test_rule_names_cover_the_suite_and_every_rule_is_a_gx_expectation():
    suite = build_suite(WINDOW)
    names = [e.meta["name"] for e in suite.expectations]
    assert sorted(names) == sorted(RULES) == sorted([*BAD_ROWS, "event_id_unique_in_window"])
    assert all(type(e).__module__.startswith("great_expectations") for e in suite.expectations)


def test_build_suite_is_pure():
    def configs(suite):  # GX gives each added expectation a fresh random id
        return [
            {k: v for k, v in e.configuration.to_json_dict().items() if k != "id"} for e in suite.expectations
        ]

    assert configs(build_suite(WINDOW)) == configs(build_suite(WINDOW))


def test_a_row_failing_several_rules_lists_them_all():
    df = frame([good(0, event_id=None, type="identify", event=None, traits=None, context="{oops")])
    _, quarantined, _ = validate_batch(df, WINDOW)
    assert quarantined["failed_expectations"].iloc[0] == [
        "event_id_not_null",
        "context_is_json_object",
        "identify_has_traits",
    ]
    assert quarantined["reason"].iloc[0] == "; ".join(
        RULES[r] for r in ("event_id_not_null", "context_is_json_object", "identify_has_traits")
    )


def test_valid_json_objects_and_nulls_pass_and_other_types_need_no_event_name():
    rows = [
        good(0, type="page", event=None, properties=None, context='{"page": {"url": "u"}, "a": [1, {}]}'),
        good(1, type="identify", event=None, traits='{"email": "ada@example.com"}'),
        good(2, type="alias", event=None),
        good(3, type="screen", context=None),
    ]
    valid, quarantined, summary = validate_batch(frame(rows), WINDOW)
    assert len(valid) == 4 and quarantined.empty and summary["success"]


@pytest.mark.parametrize("text", ["[1]", '"x"', "null", "1", "", "{", '{"a": }', "{'a': 1}", '{"a": 1} x'])
def test_json_that_is_not_an_object_fails(text):
    assert validation.json_objects(pd.Series([text, '{"ok": true}', None], dtype="str")).tolist() == [
        False,
        True,
        True,
    ]


def test_duplicates_across_batches_keep_the_first_copy():
    seen = SeenEventIds()
    first = frame([good(0), good(1), good(1), good(2, event_id=None)])
    second = frame([good(1), good(3), good(2, event_id=None), good(3)], first_row=4)
    valid1, quarantined1, _ = validate_batch(first, WINDOW, seen)
    valid2, quarantined2, summary2 = validate_batch(second, WINDOW, seen)
    assert valid1["_row"].tolist() == [0, 1]
    assert quarantined1["failed_expectations"].tolist() == [
        ["event_id_unique_in_window"],
        ["event_id_not_null"],
    ]
    assert valid2["_row"].tolist() == [5]
    assert quarantined2["_row"].tolist() == [4, 6, 7]
    assert summary2["expectations"]["event_id_unique_in_window"]["unexpected"] == 2
    assert len(seen) == 3  # distinct non-null ids, 8 bytes each


def test_seen_ids_stay_sorted_and_exact_over_many_batches():
    seen = SeenEventIds()
    firsts = [
        seen.first_copies(pd.Series([f"e{i % 700}" for i in range(k, k + 500)], dtype="str")).sum()
        for k in range(0, 5000, 500)
    ]
    assert sum(firsts) == 700 and len(seen) == 700


def test_summaries_add_up():
    a = validate_batch(frame([good(0), good(1, type="bogus")]), WINDOW)[2]
    b = validate_batch(frame([good(2, anonymous_id=None), good(3, type="bogus")]), WINDOW)[2]
    total = merge_summaries(merge_summaries(None, a), b)
    assert total["rows"] == 4 and total["rows_failed"] == 3 and total["success"] is False
    assert total["expectations"]["type_known"]["unexpected"] == 2
    assert total["expectations"]["anonymous_id_not_null"]["unexpected"] == 1
    assert total["expectations"]["event_id_not_null"] == {
        "expectation": "expect_column_values_to_not_be_null",
        "column": "event_id",
        "unexpected": 0,
        "success": True,
    }
    assert a["rows"] == 2  # merging copies, never changes the first summary


def test_gx_context_is_created_once_per_process_and_follows_the_window():
    validate_batch(frame([good(0)]), WINDOW)
    later = Window(WINDOW.end, WINDOW.end + timedelta(hours=1))
    _, quarantined, _ = validate_batch(frame([good(0)]), later)
    assert quarantined["failed_expectations"].iloc[0] == ["timestamp_in_window"]
    assert validation._batch_definition.cache_info().currsize == 1
    context, _ = validation._batch_definition()
    assert context.variables.progress_bars.globally is False


def test_every_bad_row_kind_of_the_sample_landing_is_quarantined(tmp_path):
    start = WINDOW.start
    sample.generate_landing(tmp_path, 8000, start, hours=1, bad_fraction=0.01)
    seen, total, quarantined = SeenEventIds(), None, []
    for df in iter_window_batches(str(tmp_path), WINDOW, batch_size=3000):
        valid, bad, summary = validate_batch(df, WINDOW, seen)
        total = merge_summaries(total, summary)
        quarantined.append(bad)
        assert len(valid) + len(bad) == len(df)
    bad = pd.concat(quarantined)
    assert total["rows"] == 8000 and total["rows_failed"] == len(bad) == 80
    for rule in (
        "event_id_not_null",
        "event_id_unique_in_window",
        "type_known",
        "track_has_event_name",
        "properties_is_json_object",
        "identify_has_traits",
        "anonymous_id_not_null",
        "context_is_json_object",
    ):
        assert total["expectations"][rule]["unexpected"] == 10, rule


# ---- GX's own logging stays out of task logs ---------------------------------------------------------


def _gx_records_below_warning(records) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.name.split(".")[0] == "great_expectations" and r.levelno < logging.WARNING
    ]


def test_gx_logs_nothing_below_warning_while_a_real_validation_quarantines(caplog):
    # a new GX context inside the capture: creating one is where GX logs at INFO once it is imported
    validation._validation_definition.cache_clear()
    validation._batch_definition.cache_clear()
    caplog.set_level(logging.INFO)  # the root logger, as a task's log handler sees it
    valid, quarantined, summary = validate_batch(frame([good(0), good(1, type="pageview"), good(2)]), WINDOW)
    assert valid["_row"].tolist() == [0, 2]
    assert quarantined["_row"].tolist() == [1]
    assert quarantined["failed_expectations"].iloc[0] == ["type_known"]
    assert _gx_records_below_warning(caplog.records) == []
    assert validation._batch_definition.cache_info().currsize == 1  # the context was created in the capture
    logging.getLogger("include.datafly_fullstory.extract").info("our own line")  # ours are not silenced
    assert [r.getMessage() for r in caplog.records if r.name.startswith("include.")] == ["our own line"]
    assert logging.getLogger("great_expectations").getEffectiveLevel() == logging.WARNING


def test_a_fresh_process_importing_gx_logs_no_gx_info_lines():
    """GX logs ~200 INFO lines ("Skipping registering function ...") while it is imported, which a test in
    this process cannot see again: a fresh interpreter with INFO logging imports it and validates a row."""
    script = textwrap.dedent("""
        import logging, sys
        from datetime import UTC, datetime
        import pyarrow as pa
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(name)s %(message)s")
        from include.datafly_fullstory import validation
        from include.datafly_fullstory.landing import FRAME_SCHEMA
        from include.datafly_fullstory.window import Window
        window = Window(datetime(2026, 11, 26, 8, tzinfo=UTC), datetime(2026, 11, 26, 9, tzinfo=UTC))
        row = {"event_id": "e1", "type": "pageview", "anonymous_id": "a", "timestamp": window.start,
               "received_at": window.start, "_row": 0, "_file": "f"}
        _, quarantined, _ = validation.validate_batch(pa.Table.from_pylist([row], schema=FRAME_SCHEMA).to_pandas(), window)
        logging.getLogger("include.datafly_fullstory.extract").info("quarantined %s", quarantined["_row"].tolist())
    """)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=240, check=True
    ).stdout.splitlines()
    records = [line.split(" ", 3)[1:] for line in out if line.startswith("LOG ")]
    assert ["INFO", "include.datafly_fullstory.extract", "quarantined [0]"] in records
    assert [
        r for r in records if r[1].split(".")[0] == "great_expectations" and r[0] in ("DEBUG", "INFO")
    ] == []
