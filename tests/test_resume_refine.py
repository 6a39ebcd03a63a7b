"""A refine killed with SIGKILL part-way resumes to the output of an uninterrupted refine, skipping the shards it had
finished; a changed config is refused; repeat's streaming shuffle (several parts per shard) keeps each row's copies.

Real subprocesses and a real SIGKILL: the child runs refine_run with DRIFT_STREAM_KILL_AT=refine:K, which kills it
right after output shard K's completion marker (bank/checkpoint.py `kill_point`).
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
from test_refine import read_out, write_run

from drift_stream.errors import RunDirMismatchError
from drift_stream.refine.policies import refine_run

CHILD = """
import sys
from drift_stream.refine.policies import refine_run
refine_run(sys.argv[1], sys.argv[2], sys.argv[3], seed=5, progress=False)
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
