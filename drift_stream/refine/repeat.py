"""`refine --policy repeat` by streaming: integer copies, shuffled across the output shards, in bounded memory.

Copies. Row r of input shard i gets floor(w_r) + Bernoulli(w_r - floor(w_r)) copies (w: the weight map, 0 for rows
the prefilters drop), drawn from numpy's generator seeded (seed, 0, i), batch after batch.

Shuffle (a two-pass external shuffle; its scope is unchanged: every copy goes to a uniformly random output shard,
and each output shard is a uniformly random permutation of its copies). Each copy draws one partition
p in [0, S x C) from the same generator: output shard b = p // C, part c = p % C, where S is the number of output
shards and C = ceil(expected copies per shard / PART_ROWS) (expected copies: the rows the policy weighs, the
weights having mean 1). Pass 1 appends the copies to one local spill file per partition (Arrow IPC streams, at most
SPILL_BUFFER_BYTES held before a flush). Pass 2 writes output shard b as its parts c = 0..C-1 in order, each part
permuted by the generator seeded (seed, 1, b, c). Assigning copies to parts at random and permuting inside each part
gives every order of the shard's copies the same probability, so this is a full shuffle of the shard, while only
one part (about PART_ROWS copies) is in memory at a time: peak memory does not grow with the rows of the run. The
draws differ from the version that permuted whole buckets in memory (same distribution, other copies for a seed).

Resume. Output shards with a completion marker are not written again: pass 1 still draws every copy (the draws do
not depend on which shards are finished) but spills only those of unfinished shards.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from drift_stream.io.atomic import atomic_parquet_writer
from drift_stream.io.columns import SCORE
from drift_stream.io.schema import conform_table
from drift_stream.refine.weight_map import WeightMap

# Memory is bounded by these constants, not by the run's rows: pass 2 holds one part, pass 1 one input batch (READ_ROWS
# rows), TAKE_ROWS copies of it and the spill buffer. Small enough that a run of 10^4 rows already reaches them
# (peak RSS then stays flat from 10^4 to 10^6 rows and beyond), large enough that a spill append and a row group carry
# thousands of rows.
PART_ROWS = 16_384  # copies per part
READ_ROWS = 8_192  # input rows per record batch
TAKE_ROWS = 8_192  # copies materialised at once (a row with many copies is taken in slices)
SPILL_BUFFER_BYTES = 4 << 20  # copies buffered in pass 1 before they are appended to the spill files


def parts_per_shard(expected_copies: float, num_out: int, part_rows: int = PART_ROWS) -> int:
    """C: parts per output shard, so that a part holds about `part_rows` copies."""
    return max(1, math.ceil(expected_copies / max(num_out, 1) / part_rows))


class _Spill:
    """Copies by partition on local disk: one file per partition, each a run of Arrow IPC streams."""

    def __init__(self, directory: str, schema: pa.Schema) -> None:
        self.directory, self.schema = directory, schema.remove_metadata()
        self.buffers: dict[int, list[pa.Table]] = {}
        self.extents: dict[int, list[tuple[int, int]]] = {}
        self.buffered = 0

    def _file(self, part: int) -> str:
        return os.path.join(self.directory, f"part-{part:08d}.arrows")

    def add(self, part: int, table: pa.Table) -> None:
        self.buffers.setdefault(part, []).append(table)
        self.buffered += table.nbytes
        if self.buffered > SPILL_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        for part, tables in sorted(self.buffers.items()):
            with open(self._file(part), "ab") as f:
                start = f.tell()
                with pa.ipc.new_stream(f, self.schema) as writer:
                    for t in tables:
                        writer.write_table(t)
                self.extents.setdefault(part, []).append((start, f.tell() - start))
        self.buffers.clear()
        self.buffered = 0

    def take_out(self, part: int) -> pa.Table:
        """The copies of `part`, in the order they were added; its file is removed."""
        extents = self.extents.pop(part, [])
        if not extents:
            return self.schema.empty_table()
        path = self._file(part)
        tables = []
        with open(path, "rb") as f:
            for start, length in extents:
                f.seek(start)
                tables.append(pa.ipc.open_stream(f.read(length)).read_all())
        os.remove(path)
        return pa.concat_tables(tables)


def write_repeat(batches: Callable[[int, int], Iterable[pa.RecordBatch]], num_in: int, schema: pa.Schema, out_fs,
                 names: list[str], wmap: WeightMap, seed: int, expected_copies: float, acc,
                 survive: np.ndarray | None, done: set[int], on_written: Callable[[int, int], None],
                 on_batch: Callable[[int], None] = lambda rows: None, part_rows: int = PART_ROWS) -> None:
    """Write the output shards `names` not in `done` (module docstring); `on_written(b, rows)` after each.

    batches(i, rows): the record batches of input shard i (in order, `rows` rows each); schema: the one output schema; acc: moments of
    the kept scores / weights (refine's _Accumulator), updated from every row; survive: [run rows] bool or None."""
    num_out = len(names)
    per = parts_per_shard(expected_copies, num_out, part_rows)
    skip = np.zeros(num_out, dtype=bool)
    skip[list(done)] = True
    with tempfile.TemporaryDirectory(prefix="drift-repeat-") as tmp:
        spill = _Spill(tmp, schema)
        first_row = 0
        for i in range(num_in):
            rng = np.random.default_rng([seed, 0, i])
            for batch in batches(i, READ_ROWS):
                score = batch.column(SCORE).to_numpy(zero_copy_only=False)
                weight = wmap(score)
                alive = np.ones(len(weight), dtype=bool) if survive is None else \
                    survive[first_row: first_row + len(weight)]
                first_row += len(weight)
                weight = np.where(alive, weight, 0.0)  # rows the prefilters drop get no copy
                base = np.floor(weight)
                copies = (base + (rng.random(len(weight)) < weight - base)).astype(np.int64)
                acc.scores.add(score[copies > 0])
                acc.weights.add(weight[alive].astype(np.float32))
                index = np.repeat(np.arange(len(copies)), copies)  # [copies] the row of each copy
                part = rng.integers(0, num_out * per, size=index.size)  # [copies] its partition
                wanted = ~skip[part // per]
                index, part = index[wanted], part[wanted]
                if index.size:
                    table = pa.Table.from_batches([batch])
                    for lo in range(0, index.size, TAKE_ROWS):
                        order = np.argsort(part[lo: lo + TAKE_ROWS], kind="stable")
                        rows = index[lo: lo + TAKE_ROWS][order]
                        parts = part[lo: lo + TAKE_ROWS][order]
                        taken = conform_table(table.take(pa.array(rows)), schema).replace_schema_metadata(None)
                        keys, starts = np.unique(parts, return_index=True)
                        ends = np.r_[starts[1:], parts.size]
                        for key, start, end in zip(keys.tolist(), starts.tolist(), ends.tolist()):
                            spill.add(key, taken.slice(start, end - start))
                on_batch(batch.num_rows)
        spill.flush()
        for b, dest in enumerate(names):
            if skip[b]:
                continue
            written = 0
            with atomic_parquet_writer(out_fs, dest, schema) as writer:
                for c in range(per):
                    table = spill.take_out(b * per + c)
                    perm = np.random.default_rng([seed, 1, b, c]).permutation(table.num_rows)
                    for lo in range(0, perm.size, PART_ROWS):  # a row group per part
                        writer.write(table.take(pa.array(perm[lo: lo + TAKE_ROWS], pa.int64())))
                    written += table.num_rows
                    del table
            on_written(b, written)
