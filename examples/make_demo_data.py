"""Write the demo data shipped in drift_stream/embedded/assets/demo/: a noisy SFT pool, validation queries, a test set.

    python examples/make_demo_data.py                      # writes drift_stream/embedded/assets/demo/*.parquet
    python examples/make_demo_data.py --out /tmp/demo --check drift_stream/embedded/assets/demo

pool.parquet     id, messages (list<struct<role, content>>), task, corruption   (~30% corrupted; docs/demo_data.md)
queries.parquet  id, question, answer, task   (validation queries, target tasks only, `qa` form)
test.parquet     id, question, answer, task   (held out: target and non-target tasks)

The `corruption` column is for analysis only; no scorer reads it. Deterministic: the same --seed gives the same bytes
(for the same pyarrow version). Needs reasoning-gym (pip install 'drift-stream[gym]').
"""

from __future__ import annotations

import argparse
import collections
import filecmp
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "drift_stream" / "embedded" / "assets" / "demo"
FILES = ("pool.parquet", "queries.parquet", "test.parquet")


def write_splits(splits, out: Path) -> None:
    """Write the three splits as zstd parquet with explicit schemas."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    pool_schema = pa.schema([("id", pa.string()), ("messages", pa.list_(message)), ("task", pa.string()),
                             ("corruption", pa.string())])
    qa_schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                           ("task", pa.string())])
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, schema in (("pool.parquet", splits.pool, pool_schema),
                               ("queries.parquet", splits.queries, qa_schema),
                               ("test.parquet", splits.test, qa_schema)):
        table = pa.Table.from_pylist(rows, schema=schema)
        tmp = out / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(out / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=Path, default=None,
                        help="after writing, compare the files byte for byte with this directory (exit 1 if not)")
    args = parser.parse_args(argv)

    from drift_stream.embedded.tasks import DataRecipe, make_splits

    splits = make_splits(DataRecipe(seed=args.seed))
    write_splits(splits, args.out)
    kinds = collections.Counter(row["corruption"] for row in splits.pool)
    tasks = collections.Counter(row["task"] for row in splits.pool)
    print(f"pool {len(splits.pool)} rows; tasks {dict(sorted(tasks.items()))}")
    print(f"corruption {dict(sorted(kinds.items()))}")
    print(f"queries {len(splits.queries)} rows; test {len(splits.test)} rows -> {args.out}")
    if args.check is not None:
        differ = [f for f in FILES if not filecmp.cmp(args.out / f, args.check / f, shallow=False)]
        if differ:
            print(f"DIFFERENT from {args.check}: {differ}")
            return 1
        print(f"identical to {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
