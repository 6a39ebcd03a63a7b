"""`export --format repeat` in bounded memory: a shard's copies are shuffled by an external shuffle.

Each copy is sent to one of K spill files (Arrow IPC, zstd, in a local temp directory) drawn uniformly at random,
K = ceil(expected copies / BUCKET_ROWS) up to MAX_BUCKETS open files; then each spill file is read alone, permuted,
and appended to the output.
Uniform buckets followed by a uniform permutation within each give a uniformly random order of the whole shard (every
order of the copies is equally likely given the bucket sizes), while memory holds one input batch or one bucket:
~BUCKET_ROWS copies, whatever the shard's size up to BUCKET_ROWS x MAX_BUCKETS (8.4M) copies (beyond, buckets grow
with the shard: refine writes one shard per input file). Draws come from default_rng([seed, shard, 1]), apart from the copy
counts' stream default_rng([seed, shard]), so the counts are those of `refine --policy repeat`'s rule.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

# copies per spill file on average: twice an input batch (export_source.BATCH_ROWS), so a bucket costs about what a
# batch costs and the peak is reached from the first shard of ~10^4 rows on (tests/test_export_resume.py: VmHWM at
# 10^4, 10^5, 10^6 rows)
BUCKET_ROWS = 1 << 14
MAX_BUCKETS = 512  # spill files open at once (each an fd; the common soft limit is 1024)


class RepeatShuffle:
    """Collects a shard's copies (`add`, one table at a time) and gives them back shuffled (`drain`)."""

    def __init__(self, expected_copies: float, seed: int, shard: int) -> None:
        self.buckets = min(MAX_BUCKETS, max(1, math.ceil(expected_copies / BUCKET_ROWS)))
        self.rng = np.random.default_rng([seed, shard, 1])
        self._dir = tempfile.TemporaryDirectory(prefix="drift-repeat-")
        self._writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        self._sinks: dict[int, pa.OSFile] = {}
        self.schema: pa.Schema | None = None

    def _path(self, bucket: int) -> str:
        return os.path.join(self._dir.name, f"{bucket:05d}.arrow")

    def _writer(self, bucket: int, schema: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
        if bucket not in self._writers:
            self._sinks[bucket] = pa.OSFile(self._path(bucket), "wb")
            options = pa.ipc.IpcWriteOptions(compression="zstd")
            self._writers[bucket] = pa.ipc.new_file(self._sinks[bucket], schema, options=options)
        return self._writers[bucket]

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.schema = self.schema or table.schema
        bucket = self.rng.integers(self.buckets, size=table.num_rows)  # [n]
        order = np.argsort(bucket, kind="stable")
        counts = np.bincount(bucket, minlength=self.buckets)
        grouped = table.take(pa.array(order))
        start = 0
        for b in np.flatnonzero(counts):
            self._writer(int(b), table.schema).write_table(grouped.slice(start, int(counts[b])))
            start += int(counts[b])

    def drain(self) -> Iterator[pa.Table]:
        """Each bucket permuted, in bucket order; the spill files are removed as they are read."""
        try:
            for b in list(self._writers):
                self._writers.pop(b).close()
                self._sinks.pop(b).close()
            for b in range(self.buckets):
                path = self._path(b)
                if not os.path.exists(path):
                    continue
                with pa.OSFile(path, "rb") as source:
                    table = pa.ipc.open_file(source).read_all()
                os.remove(path)
                yield table.take(pa.array(self.rng.permutation(table.num_rows)))
        finally:
            self.close()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for sink in self._sinks.values():
            sink.close()
        self._writers.clear()
        self._sinks.clear()
        self._dir.cleanup()
