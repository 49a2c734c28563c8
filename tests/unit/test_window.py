from datetime import UTC, datetime, timedelta, timezone

import pytest

from include.datafly_fullstory.window import Window, WindowError, parse_instant, resolve_window

H7 = datetime(2026, 11, 26, 7, tzinfo=UTC)


def test_params_win_over_the_data_interval():
    w = resolve_window(
        window_start="2026-11-20T10:00:00Z",
        window_end="2026-11-20T13:00:00+00:00",
        data_interval_start=H7,
        data_interval_end=H7 + timedelta(hours=1),
    )
    assert w == Window(datetime(2026, 11, 20, 10, tzinfo=UTC), datetime(2026, 11, 20, 13, tzinfo=UTC))


def test_data_interval_then_run_after():
    assert resolve_window(data_interval_start=H7, data_interval_end=H7 + timedelta(hours=1)).start == H7
    # Manual runs in Airflow 3 may have no data interval: the last full hour before run_after.
    w = resolve_window(run_after=datetime(2026, 11, 26, 8, 17, tzinfo=UTC))
    assert (w.start, w.end) == (H7, H7 + timedelta(hours=1))
    # A trigger timetable gives start == end: not a window, fall through to run_after.
    w = resolve_window(data_interval_start=H7, data_interval_end=H7, run_after=H7)
    assert w.end == H7


def test_zones_are_normalised_and_naive_means_utc():
    cet = timezone(timedelta(hours=1))
    w = resolve_window(window_start="2026-11-26T08:00:00+01:00", window_end="2026-11-26T08:00:00")
    assert w.start == H7 and w.start.tzinfo == UTC and w.end == H7 + timedelta(hours=1)
    assert parse_instant(datetime(2026, 11, 26, 8, tzinfo=cet), "x") == H7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window_start": "2026-11-26T07:00:00Z"}, "give both window_start and window_end"),
        ({"window_start": "yesterday", "window_end": "2026-11-26T07:00:00Z"}, "window_start='yesterday'"),
        ({"window_start": "2026-11-26T08:00:00Z", "window_end": "2026-11-26T07:00:00Z"}, "must be after"),
        ({}, "no window"),
    ],
)
def test_bad_windows_say_what_to_fix(kwargs, message):
    with pytest.raises(WindowError, match=message):
        resolve_window(**kwargs)


def test_round_trip_through_xcom_dict():
    w = Window(H7, H7 + timedelta(minutes=90))
    assert Window.from_dict(w.as_dict()) == w
