"""A refine killed with SIGKILL part-way resumes to the output of an uninterrupted refine, skipping the shards it had
finished; a changed config is refused; repeat's streaming shuffle (several parts per shard) keeps each row's copies.

Real subprocesses and a real SIGKILL: the child runs refine_run with DRIFT_STREAM_KILL_AT=refine:K, which kills it
right after output shard K's completion marker (bank/checkpoint.py `kill_point`).

`python tests/test_resume_refine.py --rss 10000 100000 1000000` prints the peak RSS (VmHWM) of `refine --policy
repeat` over a run of one shard of that many rows (distinct scores), for each weight map, each in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import record_local_reads
from test_refine import MESSAGES, mark_complete, read_out, write_run

from drift_stream.errors import RunDirMismatchError
from drift_stream.refine.policies import refine_run

CHILD = """
import sys
from drift_stream.refine.policies import refine_run
refine_run(sys.argv[1], sys.argv[2], sys.argv[3], seed=5, progress=False)
"""
# VmHWM: the child's own peak (ru_maxrss carries the parent's high-water mark over fork + exec)
RSS_CHILD = """
import sys
from drift_stream.refine.policies import refine_run
refine_run(sys.argv[1], "repeat", sys.argv[2], seed=5, weight_map=sys.argv[3], progress=False)
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
"""
SIZES = (40, 0, 25, 35, 30)  # five input shards, one of them empty: five output shards


def run_child(src: str, policy: str, out: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("DRIFT_STREAM_KILL_AT", None)
    if kill_at:
        env["DRIFT_STREAM_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", CHILD, src, policy, out], env=env, capture_output=True, text=True,
                          timeout=300)


def shard_files(out: Path) -> list[Path]:
    return sorted((out / "data").glob("train-*.parquet"))


@pytest.mark.parametrize("policy", ["top:0.3", "weights", "repeat"])
def test_sigkilled_refine_resumes_to_the_uninterrupted_output(tmp_path, policy):
    src = str(tmp_path / "run")
    write_run(src, SIZES)
    whole, part = tmp_path / "whole", tmp_path / "part"
    done = run_child(src, policy, str(whole))
    assert done.returncode == 0, done.stderr

    killed = run_child(src, policy, str(part), kill_at="refine:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (part / "manifest.json").exists()
    markers = sorted(p.name for p in (part / "completions").iterdir())
    assert markers == ["00000.json", "00001.json", "00002.json"]  # killed right after shard 2's marker
    finished = {p.name: p.stat().st_mtime_ns for p in shard_files(part)[:3]}

    resumed = run_child(src, policy, str(part))
    assert resumed.returncode == 0, resumed.stderr
    # the shards finished before the kill were not written again
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(part)[:3]} == finished
    assert [p.name for p in shard_files(part)] == [p.name for p in shard_files(whole)]
    for a, b in zip(shard_files(part), shard_files(whole)):
        assert a.read_bytes() == b.read_bytes(), a.name  # the same parquet bytes
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (part, whole))
    for m in (ma, mb):
        m.pop("created_at")
    assert ma == mb
    assert mb["rows_written"] == sum(t.num_rows for t in read_out(str(whole))) > 0

    # a finished refine rerun changes nothing; another config is refused, printing both
    before = {p.name: p.stat().st_mtime_ns for p in [*shard_files(part), part / "manifest.json"]}
    assert refine_run(src, policy, str(part), seed=5, progress=False) == json.loads((part / "manifest.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in [*shard_files(part), part / "manifest.json"]} == before


def test_killed_refine_with_another_config_is_refused(tmp_path):
    src = str(tmp_path / "run")
    write_run(src, SIZES)
    out = tmp_path / "part"
    assert run_child(src, "weights", str(out), kill_at="refine:1").returncode == -signal.SIGKILL
    with pytest.raises(RunDirMismatchError, match=r"(?s)seed: 5 -> 6.*recorded:.*this refine:"):
        refine_run(src, "weights", str(out), seed=6, progress=False)
    with pytest.raises(RunDirMismatchError, match="policy"):
        refine_run(src, "top:0.5", str(out), seed=5, progress=False)
    # the source run's shards changed since the kill: the shards already written were cut from the old ones
    first = tmp_path / "run" / "data" / "train-00000-of-00005.parquet"
    pq.write_table(pq.read_table(first).slice(0, 10), first)
    with pytest.raises(RunDirMismatchError, match="train-00000-of-00005"):
        refine_run(src, "weights", str(out), seed=5, progress=False)


def test_repeat_with_several_parts_per_shard_keeps_every_rows_copies(tmp_path):
    """write_repeat with parts of 7 copies (C = 4 parts per shard): each row gets the copies it gets with one part
    (the copy draws do not depend on C), every shard is permuted, and writing again gives the same shards."""
    import fsspec

    from drift_stream.refine.policies import _Accumulator, _iter_batches
    from drift_stream.refine.repeat import parts_per_shard, write_repeat
    from drift_stream.refine.weight_map import fit_weight_map

    src = str(tmp_path / "run")
    full = write_run(src, SIZES)
    fs = fsspec.filesystem("file")
    shards = [str(p) for p in sorted((tmp_path / "run" / "data").glob("*.parquet"))]
    score = full["drift_score"].to_numpy().astype(np.float64)
    stats = {"mean": score.mean(), "std": score.std(), "min": score.min(), "max": score.max()}
    import polars as pl

    wmap = fit_weight_map(pl.LazyFrame({"drift_score": score}), stats, len(score))
    n = full.num_rows
    assert parts_per_shard(n, 5) == 1 and parts_per_shard(n, 5, 7) == 4

    def write(name: str, part_rows: int) -> list[pa.Table]:
        names = [str(tmp_path / name / f"train-{i:05d}-of-00005.parquet") for i in range(5)]
        written = {}
        write_repeat(lambda i, rows: _iter_batches(fs, shards[i], rows), 5, full.schema, fs, names, wmap, 5, n,
                     _Accumulator(), None, set(), written.__setitem__, part_rows=part_rows)
        tables = [pq.read_table(p) for p in names]
        assert [t.num_rows for t in tables] == [written[i] for i in range(5)]
        return tables

    one, many, again = write("one", 1 << 16), write("many", 7), write("again", 7)
    count = lambda ts: np.bincount(pa.concat_tables(ts)["row_no"].to_numpy(), minlength=n)  # noqa: E731
    assert np.array_equal(count(one), count(many)) and count(one).sum() > 0
    assert [t.equals(u) for t, u in zip(many, again)] == [True] * 5
    assert all(np.any(np.diff(t["row_no"].to_numpy()) < 0) for t in many if t.num_rows > 20)  # shuffled


@pytest.mark.parametrize("weight_map", ["rank", "exp_z"])
def test_refine_repeat_reads_its_shard_a_row_group_at_a_time(tmp_path, monkeypatch, weight_map):
    """pyarrow's ParquetFile pre-buffers every row group iter_batches will read: one read of the whole shard (24 MiB
    held at once for 10^6 short rows). refine reads with pre_buffer off, so no read of the shard (rank fit, copies)
    is much larger than a row group."""

    src = write_scored_shard(tmp_path / "run", 40_000, row_group=2_000)
    shard = tmp_path / "run" / "data" / "train-00000-of-00001.parquet"
    reads = record_local_reads(monkeypatch, shard)  # bytes of each read of the file
    manifest = refine_run(src, "repeat", str(tmp_path / "out"), seed=5, weight_map=weight_map, progress=False)
    assert manifest["rows_written"] > 0 and len(reads) > 20  # 20 row groups
    assert max(reads) < shard.stat().st_size / 10, (max(reads), shard.stat().st_size)


def write_scored_shard(root: Path, rows: int, row_group: int = 8192, seed: int = 0) -> str:
    """A complete score run of one shard of `rows` rows: id, a two-message conversation, distinct float32 scores
    (the rank map's table then has a row per row). Returns its directory."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True)
    schema = pa.schema([("id", pa.string()), ("messages", MESSAGES), ("drift_score", pa.float32())])
    with pq.ParquetWriter(root / "data" / "train-00000-of-00001.parquet", schema) as writer:
        for lo in range(0, rows, row_group):
            r = np.arange(lo, min(rows, lo + row_group))
            turns = pa.StructArray.from_arrays(
                [pa.array(["user", "assistant"] * r.size),
                 pa.array([t for i in r.tolist() for t in (f"What is {i} + 1?", str(i + 1))])], ["role", "content"])
            messages = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * r.size + 1, 2, dtype=np.int32)), turns)
            writer.write_table(pa.table([pa.array([f"ex-{i}" for i in r.tolist()]), messages.cast(MESSAGES),
                                         pa.array(rng.normal(size=r.size).astype(np.float32))], schema=schema))
    mark_complete(str(root), [rows])
    return str(root)


def repeat_peak_rss_mib(src: str, out: str, weight_map: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, src, out, weight_map], check=False, env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


if __name__ == "__main__":
    import argparse
    import tempfile
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--rss", type=int, nargs="+", required=True, metavar="ROWS")
    parser.add_argument("--weight-maps", nargs="+", default=["rank", "exp_z"])
    args = parser.parse_args()
    for rows in args.rss:
        with tempfile.TemporaryDirectory() as tmp:
            src = write_scored_shard(Path(tmp) / "run", rows)
            for weight_map in args.weight_maps:
                start = time.perf_counter()
                hwm = repeat_peak_rss_mib(src, str(Path(tmp) / f"out-{weight_map}"), weight_map)
                print(f"{rows:>9} rows  repeat, weight_map {weight_map:<9} peak RSS (VmHWM) {hwm:7.1f} MiB  "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
