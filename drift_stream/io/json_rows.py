"""JSON objects as Arrow rows of a planned schema, and the bounded sample a JSON text file is planned from.

Planning a file never needs a full read (issue 23): the plan of a JSON text file is made from its first
`SAMPLE_ROWS` rows or `SAMPLE_BYTES` of its text, whichever comes first (10,000 rows / 8 MiB: every row of a
typical shard of a few MB, while the rows held before the first chunk stays bounded). A later row that does not fit
the plan is rejected with its reason, never the file: a value of another type `wrong_type:COLUMN`, a key the sample
never showed `unplanned_column:COLUMN` (the row is kept whole in rejects' raw text, so nothing is dropped silently).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from drift_stream.io.jsontext import RAW_LIMIT, BadRow
from drift_stream.io.schema import SchemaPlan, TypeStats, to_json_text, to_plain_string

SAMPLE_ROWS = 10_000  # rows of a JSON text file its plan is made from (at most)
SAMPLE_BYTES = 8 << 20  # ... or this much of its text, whichever first (counted at the reader; it reads ahead 1 MiB)
_TYPE_COUNT_ROWS = 4096  # rows per TypeStats.add_rows call (one Arrow type inference each)
_ERRORS = (pa.ArrowException, ValueError, TypeError, OverflowError)


def rows_to_table(rows: list[dict], index: list[int], plan: SchemaPlan) -> tuple[pa.Table, list[int], list[BadRow]]:
    """Rows (JSON objects) as a table of `plan`; rows that do not fit (a key outside the plan, a value of another
    type) are BadRows. Mutates `rows` (JSON-text and plain-string columns are encoded in place)."""
    names = set(plan.schema.names)
    bad: list[BadRow] = []
    if any(not names.issuperset(row) for row in rows):
        keep = []
        for k, row in enumerate(rows):
            key = next((key for key in row if key not in names), None)
            if key is None:
                keep.append(k)
            else:
                bad.append(BadRow(index[k], f"unplanned_column:{key}", to_json_text(row)[:RAW_LIMIT]))
        rows, index = [rows[k] for k in keep], [index[k] for k in keep]
    for row in rows:
        for name in plan.json_columns:  # every value, strings too ("n/a" -> "\"n/a\""): the column is JSON text
            if row.get(name) is not None:
                row[name] = to_json_text(row[name])
        for name in plan.string_columns:
            if row.get(name) is not None and not isinstance(row[name], str) and not isinstance(row[name], (dict, list)):
                row[name] = to_plain_string(row[name])
    if not plan.schema:  # objects without keys ({}): a table of no columns that still has its rows
        return pa.Table.from_struct_array(pa.array(rows, pa.struct([]))), index, bad
    try:
        return pa.Table.from_pylist(rows, schema=plan.schema), index, bad
    except _ERRORS:
        pass
    good, good_index = [], []
    for row, i in zip(rows, index):
        try:
            pa.Table.from_pylist([row], schema=plan.schema)
        except _ERRORS:
            column = next((f.name for f in plan.schema if not _fits(row.get(f.name), f.type)), "row")
            bad.append(BadRow(i, f"wrong_type:{column}", to_json_text(row)[:RAW_LIMIT]))
            continue
        good.append(row)
        good_index.append(i)
    try:
        return pa.Table.from_pylist(good, schema=plan.schema), good_index, bad
    except _ERRORS:
        # pyarrow reads a struct from a dict or from a list of pairs, and one conversion cannot mix the two
        # ([[]] fits a list<struct> alone, not next to [{...}]): convert row by row
        singles = [pa.Table.from_pylist([row], schema=plan.schema) for row in good]
        return pa.concat_tables(singles) if singles else plan.schema.empty_table(), good_index, bad


def _fits(value: Any, type_: pa.DataType) -> bool:
    try:
        pa.array([value], type_)
        return True
    except _ERRORS:
        return False


def take_sample(records: Iterator[tuple[int, dict | BadRow]], tell: Callable[[], int]) -> tuple[list, TypeStats]:
    """The first SAMPLE_ROWS rows of `records` or those read before `tell()` (the reader's byte position) passes
    SAMPLE_BYTES, whichever first, with their type counts. The caller goes on with the same iterator."""
    sample: list[tuple[int, dict | BadRow]] = []
    stats, rows = TypeStats(), []
    for item in records:
        sample.append(item)
        if isinstance(item[1], dict):
            rows.append(item[1])
            if len(rows) % _TYPE_COUNT_ROWS == 0:
                stats.add_rows(rows[-_TYPE_COUNT_ROWS:])
            if len(rows) >= SAMPLE_ROWS or (len(rows) % 256 == 0 and tell() >= SAMPLE_BYTES):
                break
    stats.add_rows(rows[len(rows) - len(rows) % _TYPE_COUNT_ROWS:])
    return sample, stats


def json_batches(records: Iterable[tuple[int, dict | BadRow]], plan: SchemaPlan,
                 batch_rows: int) -> Iterator[tuple[pa.Table, list[int], list[BadRow]]]:
    """(table of `plan`, row index of each table row, bad rows in input order) per `batch_rows` records."""
    rows: list[dict] = []
    index: list[int] = []
    bad: list[BadRow] = []
    for line_no, decoded in records:
        if isinstance(decoded, BadRow):
            bad.append(decoded)
        else:
            rows.append(decoded)
            index.append(line_no)
        if len(rows) + len(bad) >= batch_rows:
            table, kept, misfits = rows_to_table(rows, index, plan)
            yield table, kept, sorted(bad + misfits, key=lambda b: b.row_index)
            rows, index, bad = [], [], []
    if rows or bad:
        table, kept, misfits = rows_to_table(rows, index, plan)
        yield table, kept, sorted(bad + misfits, key=lambda b: b.row_index)
