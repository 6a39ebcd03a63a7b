"""Property test (issue 13): random messy JSONL / JSON arrays / parquet in, every row accounted, one table out.

Rows mix good chats with missing or wrongly typed `messages`, extra columns whose JSON type varies from row to row
(nulls, nesting, arrays, empty objects), blank lines, invalid lines and non-object lines, CRLF / LF line ends.
For each generated pool, `run_score` with the cheapest scorer (`random`) must give rows in = scored + rejected
= the number of records written, and the data shards must load as ONE table with `datasets` and polars.
"""

from __future__ import annotations

import glob
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import AllRejectedError

SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
           | st.floats(allow_nan=False, allow_infinity=False, width=32) | st.text(max_size=4))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3), max_leaves=6)
GOOD_MESSAGES = st.builds(lambda q, a: [{"role": "user", "content": "q" + q}, {"role": "assistant", "content": "a" + a}],
                          st.text(max_size=6), st.text(max_size=6))
MESSAGES = GOOD_MESSAGES | GOOD_MESSAGES | GOOD_MESSAGES | JSON_VALUES  # mostly good, sometimes anything


@st.composite
def records(draw):
    """A JSON object row: maybe messages, maybe extra columns x / y / meta of any JSON type."""
    row = {}
    if draw(st.integers(0, 9)):
        row["messages"] = draw(MESSAGES)
    for name in draw(st.lists(st.sampled_from(["x", "y", "meta"]), unique=True, max_size=3)):
        row[name] = draw(JSON_VALUES)
    return row


LINES = st.one_of(records().map(lambda r: ("row", r)), records().map(lambda r: ("row", r)),
                  st.sampled_from([("blank", ""), ("blank", "   "), ("bad", "{oops"), ("bad", "[1, 2]"),
                                   ("bad", '"text"'), ("bad", "nul")]))


@st.composite
def jsonl_file(draw):
    lines = [("row", draw(records()))] + draw(st.lists(LINES, max_size=24))  # a record first: plainly JSON Lines
    ends = draw(st.lists(st.sampled_from(["\n", "\r\n"]), min_size=len(lines), max_size=len(lines)))
    text = "".join((json.dumps(v) if k == "row" else v) + e for (k, v), e in zip(lines, ends))
    return "jsonl", text.encode(), sum(k != "blank" for k, _ in lines)


@st.composite
def json_array_file(draw):
    items = draw(st.lists(records() | JSON_VALUES, min_size=1, max_size=20))
    return "json", json.dumps(items, indent=draw(st.sampled_from([None, 2]))).encode(), len(items)


@st.composite
def parquet_file(draw):
    """Parquet can hold one type per column: each extra column gets one type for this file (values or null)."""
    n = draw(st.integers(1, 20))
    columns = {"messages": [draw(GOOD_MESSAGES) if draw(st.integers(0, 5)) else None for _ in range(n)]}
    for name, kind in draw(st.dictionaries(st.sampled_from(["x", "y", "meta"]),
                                           st.sampled_from(["int", "str", "float", "list", "struct"]), max_size=3)).items():
        value = {"int": st.integers(-5, 5), "str": st.text(max_size=3), "float": st.floats(-1, 1, width=32),
                 "list": st.lists(st.integers(0, 3), max_size=2), "struct": st.fixed_dictionaries({"a": st.integers(0, 3)})}[kind]
        columns[name] = [draw(st.none() | value) for _ in range(n)]
    return "parquet", columns, n


def write(root: Path, i: int, spec) -> str:
    kind, payload, _ = spec
    path = root / f"f{i}.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table(payload), path)
    else:
        path.write_bytes(payload)
    return str(path)


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return build_scorer("random", model=tiny_model_dir, adapter="messages")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=st.lists(jsonl_file() | json_array_file() | parquet_file(), min_size=1, max_size=3))
def test_random_messy_pools_account_for_every_row_and_load_as_one_table(scorer, specs):
    import datasets
    import polars as pl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [write(root, i, spec) for i, spec in enumerate(specs)]
        expected = sum(spec[2] for spec in specs)
        config = RunConfig(data=tuple(paths), out=str(root / "run"), batch_rows=7, allow_all_rejected=True)
        manifest = run_score(config, scorer, progress=False)
        assert manifest["rows_in"] == manifest["rows_scored"] + manifest["rows_rejected"] == expected
        shards = sorted(glob.glob(str(root / "run" / "data" / "*.parquet")))
        schemas = [pq.read_schema(p) for p in shards]
        assert all(s.equals(schemas[0]) for s in schemas)
        assert pl.read_parquet(shards).height == manifest["rows_scored"]
        if not manifest["rows_scored"]:
            return  # datasets refuses a split with no rows at all ("corresponds to no data")
        ds = datasets.load_dataset("parquet", data_files=shards, split="train", cache_dir=str(root / "cache"))
        assert ds.num_rows == manifest["rows_scored"]
        rejects = sorted(glob.glob(str(root / "run" / "rejects" / "*.parquet")))
        assert sum(pq.read_metadata(p).num_rows for p in rejects) == manifest["rows_rejected"]
        for name in manifest["json_text_columns"]:  # JSON text holds every row's value
            assert all(v is None or json.loads(v) is not Ellipsis for v in ds[name])


def test_all_rejected_is_still_an_error_without_the_flag(scorer, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"messages": 3}\n{"other": 1}\n')
    with pytest.raises(AllRejectedError):
        run_score(RunConfig(data=str(tmp_path / "x.jsonl"), out=str(tmp_path / "run")), scorer, progress=False)
