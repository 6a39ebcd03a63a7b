"""pipeline.run_score on local files with the `random` scorer on a tiny model: counts, order, rejects, resume
(including SIGKILL), refusal of a different config, sharded runs."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from killable import KILLABLE_RUN

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import BadRowError, ConfigError, RunDirMismatchError

SCHEMA = json.loads((Path(__file__).parent.parent / "schemas" / "run_manifest.schema.json").read_text())


@pytest.fixture(scope="module")
def make_scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return lambda seed=0: build_scorer("random", model=tiny_model_dir, adapter="messages", seed=seed)


def chat(i: int, response: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}" if response is None else response}],
            "source": f"s{i % 3}"}


def make_pool(root: Path, files: int = 3, rows_per_file: int = 40, bad_every: int = 9) -> Path:
    """parquet files (every `bad_every`-th row has an empty response) + one jsonl.gz with undecodable lines."""
    root.mkdir(parents=True, exist_ok=True)
    i = 0
    for f in range(files):
        records = []
        for _ in range(rows_per_file):
            records.append(chat(i, "" if i % bad_every == 0 else None))
            i += 1
        pq.write_table(pa.Table.from_pylist(records), root / f"part-{f}.parquet", row_group_size=16)
    lines = [json.dumps(chat(i + k)) for k in range(10)]
    lines[3] = "{broken json"
    lines[7] = "[1, 2, 3]"
    (root / "z.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return root


def read_run(out: Path, sub: str = "data") -> pa.Table:
    paths = sorted((out / sub).glob("*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in paths) if paths else None


def snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}


def test_run_counts_order_and_rejects(tmp_path, make_scorer):
    pool = make_pool(tmp_path / "in")
    scorer = make_scorer()
    manifest = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "out"), batch_rows=16), scorer, progress=False)
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["complete"] and manifest["num_input_files"] == 4
    # 3 x 40 parquet rows (14 with empty responses: i % 9 == 0 for i < 120) + 10 jsonl lines (2 undecodable)
    assert manifest["rows_in"] == 130 == manifest["rows_scored"] + manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == {"empty_response": 14, "invalid_json": 1, "not_a_json_object": 1}
    assert manifest["rows_scored"] == 114 and manifest["score_stats"]["count"] == 114

    # Every input column passes through, rows keep input order, scores equal the scorer on the whole input at once.
    parquet_in = pa.concat_tables(pq.read_table(p) for p in sorted(pool.glob("*.parquet")))
    direct = scorer(parquet_in)
    direct = direct.filter(pc.is_null(direct.column("drift_reject_reason"))).drop_columns(["drift_reject_reason"])
    data = read_run(tmp_path / "out")
    assert data.slice(0, direct.num_rows).equals(direct)
    assert data.column("messages").to_pylist()[-8:] == [chat(120 + k)["messages"] for k in (0, 1, 2, 4, 5, 6, 8, 9)]

    rejects = pq.read_table(tmp_path / "out" / "rejects" / "train-00003-of-00004.parquet")
    assert rejects.column("drift_row_index").to_pylist() == [3, 7]
    assert rejects.column("drift_raw_line").to_pylist() == ["{broken json", "[1, 2, 3]"]
    rejects0 = pq.read_table(tmp_path / "out" / "rejects" / "train-00000-of-00004.parquet")
    assert rejects0.column("drift_row_index").to_pylist() == [0, 9, 18, 27, 36]
    assert set(rejects0.column("drift_reject_reason").to_pylist()) == {"empty_response"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["config"] == manifest["config"]


def test_on_bad_row_error_names_file_row_and_reason(tmp_path, make_scorer):
    pool = make_pool(tmp_path / "in", files=1, bad_every=1000)
    config = RunConfig(data=(str(pool / "z.jsonl.gz"),), out=str(tmp_path / "o1"), on_bad_row="error")
    threads = threading.active_count()
    with pytest.raises(BadRowError, match=r"z\.jsonl\.gz, row 3 .*invalid_json"):
        run_score(config, make_scorer(), progress=False)
    assert threading.active_count() == threads  # the reader thread was stopped, not left behind
    records = [chat(i, "" if i == 21 else None) for i in range(30)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "one.parquet")
    config = RunConfig(data=(str(tmp_path / "one.parquet"),), out=str(tmp_path / "o2"), on_bad_row="error", batch_rows=8)
    with pytest.raises(BadRowError, match=r"one\.parquet, row 21 .*empty_response"):
        run_score(config, make_scorer(), progress=False)
    assert not list((tmp_path / "o2" / "data").glob("*.parquet"))  # nothing half-written is published
    assert not (tmp_path / "o2" / "completions").exists()


def test_finished_rerun_changes_nothing_and_other_config_is_refused(tmp_path, make_scorer):
    pool = make_pool(tmp_path / "in", files=2)
    config = RunConfig(data=(str(pool),), out=str(tmp_path / "out"), batch_rows=16)
    first = run_score(config, make_scorer(), progress=False)
    before = snapshot(tmp_path / "out")
    time.sleep(0.01)
    assert run_score(config, make_scorer(), progress=False) == first
    assert snapshot(tmp_path / "out") == before
    # Not part of the recorded config: batch size and sharding do not change any output row.
    run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "out"), batch_rows=5, num_shards=2), make_scorer(), progress=False)
    assert snapshot(tmp_path / "out") == before
    with pytest.raises(RunDirMismatchError, match=r"seed: 0 -> 1"):
        run_score(config, make_scorer(seed=1), progress=False)
    with pytest.raises(RunDirMismatchError, match=r"input_files"):
        run_score(RunConfig(data=(str(pool / "part-0.parquet"),), out=str(tmp_path / "out")), make_scorer(), progress=False)
    assert snapshot(tmp_path / "out") == before


def test_partial_leftovers_are_overwritten(tmp_path, make_scorer):
    pool = make_pool(tmp_path / "in", files=2)
    expected = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "ref")), make_scorer(), progress=False)
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train-00001-of-00003.parquet").write_bytes(b"half a shard")
    (out / "data" / ".train-00001-of-00003.parquet.tmp").write_bytes(b"temp of a killed writer")
    (out / "data" / ".train-00001-of-00003.parquet.tmp-999-0badf00d").write_bytes(b"temp of another killed writer")
    (out / "rejects").mkdir()
    (out / "rejects" / "train-00002-of-00003.parquet").write_bytes(b"stale")
    manifest = run_score(RunConfig(data=(str(pool),), out=str(out)), make_scorer(), progress=False)
    assert manifest == expected
    assert read_run(out).equals(read_run(tmp_path / "ref"))
    assert read_run(out, "rejects").equals(read_run(tmp_path / "ref", "rejects"))
    assert not list((out / "data").glob(".train-00001-of-00003.parquet.tmp*"))


def test_shard_index_runs_together_equal_one_run(tmp_path, make_scorer):
    pool = make_pool(tmp_path / "in", files=4, rows_per_file=20)
    one = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "one")), make_scorer(), progress=False)
    partial = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "many"), num_shards=3, shard_index=2),
                        make_scorer(), progress=False)
    assert not partial["complete"] and partial["num_completed_files"] == 1  # files 2 (i % 3 == 2) only
    for index in (0, 1):
        last = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "many"), num_shards=3, shard_index=index),
                         make_scorer(), progress=False)
    assert last == one
    for sub in ("data", "rejects"):
        names = sorted(p.name for p in (tmp_path / "one" / sub).glob("*.parquet"))
        assert names == sorted(p.name for p in (tmp_path / "many" / sub).glob("*.parquet"))
        for name in names:
            assert pq.read_table(tmp_path / "one" / sub / name).equals(pq.read_table(tmp_path / "many" / sub / name))


def test_iterable_dataset_input(tmp_path, make_scorer):
    import datasets

    records = [chat(i, "" if i == 4 else None) for i in range(25)]
    ds = datasets.Dataset.from_list(records).to_iterable_dataset(num_shards=2)
    manifest = run_score(RunConfig(data=ds, out=str(tmp_path / "out"), batch_rows=4), make_scorer(), progress=False)
    assert manifest["num_input_files"] == 2 and manifest["rows_in"] == 25 and manifest["rows_rejected"] == 1
    data = read_run(tmp_path / "out")
    assert data.column("messages").to_pylist() == [r["messages"] for i, r in enumerate(records) if i != 4]


def test_run_config_validation():
    with pytest.raises(ConfigError, match="on_bad_row"):
        RunConfig(data=("x",), out="o", on_bad_row="skip")
    with pytest.raises(ConfigError, match="shard_index"):
        RunConfig(data=("x",), out="o", num_shards=2, shard_index=2)
    with pytest.raises(ConfigError, match="no input"):
        RunConfig(data=(), out="o")
    config = RunConfig(data="x", out="o", storage_options={"secret": "hunter2"})
    assert config.data == ("x",) and "hunter2" not in repr(config)



def kill_after_markers(cmd: list[str], completions, min_markers: int, env=None, timeout_s: float = 180.0) -> int:
    """Start `cmd`, SIGKILL it once `completions()` reports >= min_markers; returns the count at kill time."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            count = completions()
            if count >= min_markers:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return count
            if proc.poll() is not None:
                raise AssertionError(f"run ended before it could be killed: {proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError("no completion marker appeared in time")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, make_scorer, tiny_model_dir):
    pool = make_pool(tmp_path / "in", files=8, rows_per_file=30)  # 9 files, 3 chunks each, ~0.45 s per file
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILLABLE_RUN, str(pool), str(out), tiny_model_dir]
    markers = lambda: len(list((out / "completions").glob("*.json"))) if (out / "completions").exists() else 0  # noqa: E731
    at_kill = kill_after_markers(cmd, markers, min_markers=2)
    assert 2 <= at_kill < 9
    resumed = run_score(RunConfig(data=(str(pool),), out=str(out)), make_scorer(), progress=False)
    reference = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "ref")), make_scorer(), progress=False)
    assert resumed == reference and resumed["rows_in"] == 8 * 30 + 10
    data, ref = read_run(out), read_run(tmp_path / "ref")
    assert data.equals(ref)
    assert len(set(data.column("id").to_pylist())) == data.num_rows  # no row duplicated
    assert read_run(out, "rejects").equals(read_run(tmp_path / "ref", "rejects"))
    assert not [p for p in out.rglob(".*.tmp*")]
