"""The demo's own pieces (the whole demo runs in CI as README's first command)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.embedded.demo import (
    corruption_table,
    demo_assets,
    format_corruption_table,
)


def test_shipped_assets_are_present_and_labelled():
    assets = demo_assets()
    pool = pq.read_table(assets.pool)
    assert {"id", "messages", "corruption"} <= set(pool.column_names)
    kinds = set(pool.column("corruption").to_pylist())
    assert "clean" in kinds and len(kinds) >= 5
    queries = pq.read_table(assets.queries)
    assert {"question", "answer"} <= set(queries.column_names)


def test_corruption_table_counts_pool_and_kept_rows(tmp_path):
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"corruption": ["clean"] * 6 + ["garbled"] * 3 + ["off_task"]}), pool)
    (tmp_path / "refined" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"corruption": ["clean"] * 4 + ["garbled"]}),
                   tmp_path / "refined" / "data" / "train-00000-of-00001.parquet")
    rows = corruption_table(str(pool), str(tmp_path / "refined"))
    assert rows == [("clean", 6, 4), ("garbled", 3, 1), ("off_task", 1, 0)]
    text = format_corruption_table(rows)
    assert "corrupted" in text and "40.0%" in text and "20.0%" in text  # 4/10 in the pool, 1/5 kept
