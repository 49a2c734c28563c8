"""The mapping's column helpers that work once per distinct value (mapping/columns.py): `Distinct`,
`Distinct.take`, `ParsedJson` and its memo of parses, `columns_cached`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from include.datafly_fullstory.mapping.columns import (
    BAD_JSON,
    Distinct,
    ParsedJson,
    _column,
    columns_cached,
    forget_parses,
)


@pytest.mark.parametrize("kind", ["object", "str"])
def test_distinct_codes_rows_into_values_with_none_last(kind):
    values = pd.Series(["b", None, "a", "b", None], dtype=kind)
    d = Distinct(values)
    assert d.values[-1] is None
    assert [d.values[c] for c in d.codes] == ["b", None, "a", "b", None]


@pytest.mark.parametrize("rows", [[0, 2], [1, 4], [3, 1], [], [0, 1, 2, 3, 4]])
def test_take_keeps_only_the_values_its_rows_use(rows):
    d = Distinct(np.array(["b", None, "a", "b", None], dtype=object))
    part = d.take(np.array(rows, dtype=np.int64))
    assert part.values[-1] is None  # the null slot stays last, used or not
    assert [part.values[c] for c in part.codes] == [d.values[d.codes[r]] for r in rows]
    assert len(part.values) == len({d.values[d.codes[r]] for r in rows} - {None}) + 1


def test_parsed_json_parses_each_distinct_text_once_and_shares_the_parse():
    forget_parses()
    texts = np.array(['{"a": 1}', None, "[1]", "{broken", '{"a": 1}', "null"], dtype=object)
    parsed = ParsedJson(texts)
    rows = parsed.rows()
    assert rows == [{"a": 1}, None, None, None, {"a": 1}, None]
    assert rows[0] is rows[4]  # one parse, shared
    assert parsed.bad().tolist() == [False, False, True, True, False, False]  # null text is not bad
    assert BAD_JSON in parsed.values
    again = ParsedJson(Distinct(texts).take(np.array([4])))
    assert again.rows()[0] is rows[0]  # remembered across columns and batches


def test_columns_cached_converts_each_column_once_and_read_only():
    df = pd.DataFrame({"a": pd.Series(["x", None], dtype="str")})
    assert _column(df, "a") is not _column(df, "a")  # outside: a new array each time
    with columns_cached(df):
        first = _column(df, "a")
        assert _column(df, "a") is first and first.tolist() == ["x", None]
        with pytest.raises(ValueError):
            first[0] = "changed"  # shared: nobody may change it
    assert _column(df, "a") is not first
