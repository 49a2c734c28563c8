"""Realistic Datafly Signal landings for the demo, the tests and the benchmarks.

Deterministic for a seed and sized by a row count. Rows are drawn from pools of realistic payloads
(pages, products, orders in the three spellings of datafly-events.md, identify traits in camelCase and
snake_case, both consent shapes, FullStory session ids, both user-agent spellings), picked with numpy,
so a 10M-row landing is generated in seconds. A small share of bad rows exercises validation.

    python -m include.datafly_fullstory.sample OUT_DIR --rows 5000 --start 2026-11-26T07:00:00Z --hours 3

Where what is (imports go one way: spec and pools import nothing here, bad_rows imports spec, table
imports those three, write imports spec and table, __main__ and this package import from them):

- `spec.py`: `LandingSpec`, the rows, time span, seed and bad-row share of a landing.
- `pools.py`: the value pools rows are drawn from (products, pages, contexts, orders, product views,
  custom events, identify traits).
- `bad_rows.py`: `BAD_KINDS` and `_inject_bad_rows`, the rows that each fail one validation rule.
- `table.py`: `generate_table`, the row generator, and `MIX`, the share of each event family.
- `write.py`: `write_landing` (Parquet files in the `hive` or `flat` layout) and `generate_landing`.
- `__main__.py`: the command line above.
"""

from include.datafly_fullstory.sample.spec import LandingSpec
from include.datafly_fullstory.sample.table import generate_table
from include.datafly_fullstory.sample.write import generate_landing, write_landing

__all__ = ["LandingSpec", "generate_landing", "generate_table", "write_landing"]
