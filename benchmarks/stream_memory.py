"""Peak RSS and rows/s of `run_score` with the `random` scorer at two pool sizes (default 10k and 100k rows).

Streaming means peak memory must not grow with the dataset: the target is peak RSS at 100k within 15% of 10k.
Each size is scored in a fresh subprocess (peak RSS = its ru_maxrss, imports included), from parquet files of
`--rows-per-file` rows generated in a temporary directory, with a tiny model built in code.

    python benchmarks/stream_memory.py                    # 10k and 100k
    python benchmarks/stream_memory.py --sizes 2000 20000 # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_pool(directory: Path, rows: int, rows_per_file: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    for f, start in enumerate(range(0, rows, rows_per_file)):
        records = [
            {"messages": [
                {"role": "user", "content": f"Question {i}: what is {i % 97} plus {i % 89}? Explain briefly."},
                {"role": "assistant", "content": f"{i % 97} plus {i % 89} is {i % 97 + i % 89}. " * 3},
            ]}
            for i in range(start, min(start + rows_per_file, rows))
        ]
        pq.write_table(pa.Table.from_pylist(records), directory / f"part-{f:05d}.parquet", row_group_size=1000)


def child(pool: str, out: str, model: str, batch_rows: int) -> None:
    """Score `pool` into `out`; print one JSON line with rows, seconds and peak RSS."""
    from drift_stream.engines.local import RunConfig, run_score
    from drift_stream.scoring.build import build_scorer

    scorer = build_scorer("random", model=model, adapter="messages")
    start = time.perf_counter()
    manifest = run_score(RunConfig(data=(pool,), out=out, batch_rows=batch_rows), scorer, progress=False)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"rows": manifest["rows_in"], "seconds": seconds, "peak_rss_mib": peak_mib}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--rows-per-file", type=int, default=5_000)
    parser.add_argument("--batch-rows", type=int, default=1_000)
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--child", nargs=3, metavar=("POOL", "OUT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, batch_rows=args.batch_rows)
        return 0

    from drift_stream.embedded.tiny_models import save_tiny_model

    results = []
    with tempfile.TemporaryDirectory(prefix="drift-stream-bench-") as tmp:
        root = Path(tmp)
        model = save_tiny_model(root / "model")
        for size in args.sizes:
            make_pool(root / f"pool-{size}", size, args.rows_per_file)
            cmd = [sys.executable, __file__, "--batch-rows", str(args.batch_rows),
                   "--child", str(root / f"pool-{size}"), str(root / f"out-{size}"), model]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{size:>8} rows: peak RSS {result['peak_rss_mib']:8.1f} MiB, "
                  f"{result['rows'] / result['seconds']:8.1f} rows/s ({result['seconds']:.1f} s)", flush=True)
    small, large = results
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    ok = ratio <= 1 + args.tolerance
    print(f"peak RSS ratio {args.sizes[1]} / {args.sizes[0]} rows: {ratio:.3f} "
          f"(target <= {1 + args.tolerance:.2f}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
