"""A SIGKILLed export resumes to the output of an uninterrupted one, skipping the shards it had finished; a changed
config (or a changed refine) is refused naming both; `--format repeat` streams (peak RSS flat in the shard's rows).

Real subprocesses and a real SIGKILL: the child exports a synthetic refined run (the scored run's config.json is a
real scorer's `config_dict()`, the data shards are real parquet files as refine writes them); the parent kills it
as soon as the first shard's completion marker appears, i.e. while a later shard is being written.

`python tests/test_export_resume.py --rss 10000 100000 1000000` prints the peak RSS of `export --format repeat`
(and of `--format trl`) on one shard of that many rows, each in a fresh subprocess (resource.ru_maxrss).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.errors import RunDirMismatchError
from drift_stream.io.run_dir import RunDirectory
from drift_stream.refine.export import export_run

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "drift_stream" / "embedded" / "assets" / "tiny-reasoner"
CHILD = """
import sys
from drift_stream.refine.export import export_run
export_run(sys.argv[1], sys.argv[2], sys.argv[3], seed=3)
"""
# Peak RSS of the child's own address space: VmHWM. ru_maxrss is kept across fork + exec on Linux (the child starts
# with its parent's high-water mark: ~430 MiB under a pytest that has imported torch), so it is printed beside it
# but not compared.
RSS_CHILD = """
import resource, sys
from drift_stream.refine.export import export_run
export_run(sys.argv[1], sys.argv[2], sys.argv[3], seed=3)
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write_refined(root: Path, sizes: list[int], seed: int = 0, row_group: int = 8192) -> Path:
    """A refined run of len(sizes) shards (rows: id, two-message conversation, weight with mean 1) over a scored
    run whose config.json is the `random` scorer's real config on the shipped tiny model. Returns its directory."""
    from drift_stream.scoring.build import build_scorer

    scored, refined = root / "run", root / "refined"
    scorer = build_scorer("random", model=str(MODEL), adapter="messages", max_tokens=256)
    RunDirectory(str(scored)).check_config({"input_files": [], "scorer": scorer.config_dict()})
    rng = np.random.default_rng(seed)
    words = np.array("the cat sat on a mat and two plus three is five so we add them up".split())
    shards, start = [], 0
    (refined / "data").mkdir(parents=True)
    for i, n in enumerate(sizes):
        name = f"data/train-{i:05d}-of-{len(sizes):05d}.parquet"
        with pq.ParquetWriter(refined / name, pa.schema([("id", pa.string()), ("messages", _MESSAGES),
                                                         ("weight", pa.float32())])) as writer:
            for lo in range(0, n, row_group):
                m = min(row_group, n - lo)
                picks = rng.integers(len(words), size=(m, 12))
                text = [" ".join(words[p]) for p in picks]
                messages = [[{"role": "user", "content": f"Q{start + lo + j}: {t[:30]}?"},
                             {"role": "assistant", "content": t}] for j, t in enumerate(text)]
                weights = rng.lognormal(0.0, 0.8, size=m).astype(np.float32) / np.float32(np.exp(0.32))
                writer.write_table(pa.table({"id": [f"r{start + lo + j}" for j in range(m)],
                                             "messages": pa.array(messages, type=_MESSAGES),
                                             "weight": pa.array(weights)}))
        shards.append({"path": name, "rows": n})
        start += n
    manifest = {"kind": "refine", "source_run": str(scored), "source_fraction_files": 1.0,
                "policy": {"spec": "weights", "kind": "weights", "value": None},
                "config": {"policy": "weights", "seed": 0}, "shards": shards}
    (refined / "manifest.json").write_text(json.dumps(manifest))
    return refined


def _child(args: list[str], code: str = CHILD) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _outputs(out: Path) -> dict:
    return {p.name: pq.read_table(p) if p.suffix == ".parquet" else p.read_bytes()
            for p in sorted((out / "data").iterdir())}


@pytest.mark.parametrize("fmt,sizes", [("repeat", [10000] * 4), ("tokens", [1000] * 4)])
def test_sigkilled_export_resumes_to_the_uninterrupted_output(tmp_path, fmt, sizes):
    src = write_refined(tmp_path, sizes)
    whole, part = tmp_path / "whole", tmp_path / "part"
    export_run(str(src), fmt, str(whole), seed=3)

    child = _child([str(src), fmt, str(part)])
    marker = part / "completions" / "00000.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)  # while shard 1 (or later) is being written
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    markers = sorted(p.name for p in (part / "completions").iterdir())
    assert markers and len(markers) < len(sizes), f"the child was not killed part-way: {markers}"
    assert not (part / "manifest.json").exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((part / "data").glob("train-*"))
                if (part / "completions" / f"{p.name[6:11]}.json").exists()}
    assert len(finished) == len(markers)

    manifest = export_run(str(src), fmt, str(part), seed=3)  # the same command again
    assert manifest["shards_resumed"] == len(markers)
    for name, identity in finished.items():  # finished shards were kept, not rewritten
        stat = (part / "data" / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity, name
    assert sorted(os.listdir(part / "data")) == sorted(os.listdir(whole / "data"))  # no temp file left
    got, want = _outputs(part), _outputs(whole)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equals(want[name]), name
    reference = json.loads((whole / "manifest.json").read_text())
    for key in ("rows_in", "rows_written", "rows_zero_weight", "weight_sum", "shards", "repeat", "form", "config"):
        assert manifest[key] == reference[key], key


def test_rerun_skips_finished_shards_and_refuses_a_changed_config(tmp_path):
    src = write_refined(tmp_path, [300, 0, 200])
    out = tmp_path / "out"
    first = export_run(str(src), "repeat", str(out), seed=3)
    assert first["shards_resumed"] == 0 and [s["rows"] for s in first["shards"]][1] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    again = export_run(str(src), "repeat", str(out), seed=3)
    assert again["shards_resumed"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == stamps
    assert {k: v for k, v in again.items() if k not in ("created_at", "shards_resumed")} == \
        {k: v for k, v in first.items() if k not in ("created_at", "shards_resumed")}
    # a marker whose file is gone: that shard is written again, the same
    before = pq.read_table(out / "data" / "train-00002-of-00003.parquet")
    (out / "data" / "train-00002-of-00003.parquet").unlink()
    assert export_run(str(src), "repeat", str(out), seed=3)["shards_resumed"] == 2
    assert pq.read_table(out / "data" / "train-00002-of-00003.parquet").equals(before)

    # another seed: refused, naming the recorded and the new value
    with pytest.raises(RunDirMismatchError, match=r"(?s)export.seed: 3 -> 4.*recorded config.*this run's config"):
        export_run(str(src), "repeat", str(out), seed=4)
    # the refine was redone with another policy: refused as well
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["config"] = {"policy": "weights", "seed": 1}
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirMismatchError, match=r"source_config.seed: 0 -> 1"):
        export_run(str(src), "repeat", str(out), seed=3)


def test_repeat_shuffle_spans_buckets_and_keeps_copy_counts(tmp_path, monkeypatch):
    """With several spill buckets per shard the copies are still each row's floor(w) + Bernoulli draw, and the
    order mixes the whole shard (rows of the first and last input batch are spread over the output)."""
    import drift_stream.refine.export_repeat as export_repeat

    src = write_refined(tmp_path, [5000], row_group=1000)
    monkeypatch.setattr(export_repeat, "BUCKET_ROWS", 512)  # ~10 buckets instead of 1
    manifest = export_run(str(src), "repeat", str(tmp_path / "out"), seed=3)
    out = pq.read_table(tmp_path / "out" / "data").column("id").to_pylist()
    weights = pq.read_table(src / "data").column("weight").to_numpy().astype(np.float64)
    u = np.random.default_rng([3, 0]).random(len(weights))
    expected = np.floor(weights) + (u < weights - np.floor(weights))
    counts = {}
    for rid in out:
        counts[rid] = counts.get(rid, 0) + 1
    assert [counts.get(f"r{i}", 0) for i in range(len(weights))] == expected.astype(int).tolist()
    assert manifest["repeat"]["copies_total"] == len(out) == int(expected.sum())
    first_batch = [k for k, rid in enumerate(out) if int(rid[1:]) < 1000]
    assert np.mean(first_batch) == pytest.approx(len(out) / 2, rel=0.1)  # spread, not clustered at the start


def peak_rss_mb(src: Path, fmt: str, out: Path) -> tuple[float, float]:
    """(VmHWM, ru_maxrss) in MiB of a fresh subprocess exporting `src` as `fmt` (see RSS_CHILD)."""
    child = _child([str(src), fmt, str(out)], RSS_CHILD)
    stdout, stderr = child.communicate(timeout=3600)
    if child.returncode != 0:
        raise RuntimeError(stderr)
    hwm_kb, maxrss_kb = stdout.strip().splitlines()[-1].split()
    return int(hwm_kb) / 1024, int(maxrss_kb) / 1024


@pytest.mark.slow
def test_repeat_peak_rss_is_flat_in_rows(tmp_path):
    """One shard of 10^4 vs 2 x 10^5 rows. Measured (VmHWM, 2 shared cores, 5 runs): repeat 176-180 -> 202-218 MiB,
    trl (streams one batch at a time) 194-201 MiB at 2 x 10^5; the export before the streaming shuffle held the
    shard's copies: 166 -> 313 MiB (+147, 112 above trl), and 941 MiB at 10^6 (streaming: 231 MiB). The 26-42 MiB
    from 10^4 to 2 x 10^5 rows are the allocators settling (a 10^6-row export's RSS plateaus after its first
    seconds) and vary with thread scheduling, so the bounds sit between that noise and the old cost: growth < 80 MiB,
    and repeat within 60 MiB of trl on the same shard."""
    small = peak_rss_mb(write_refined(tmp_path / "s", [10_000]), "repeat", tmp_path / "s" / "out")[0]
    src = write_refined(tmp_path / "l", [200_000])
    large = peak_rss_mb(src, "repeat", tmp_path / "l" / "repeat")[0]
    streamed = peak_rss_mb(src, "trl", tmp_path / "l" / "trl")[0]
    assert large - small < 80, (small, large)
    assert large - streamed < 60, (large, streamed)


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--rss", type=int, nargs="+", required=True, metavar="ROWS")
    parser.add_argument("--formats", nargs="+", default=["repeat", "trl"])
    args = parser.parse_args()
    for rows in args.rss:
        with tempfile.TemporaryDirectory() as tmp:
            src = write_refined(Path(tmp), [rows])
            for fmt in args.formats:
                start = time.perf_counter()
                hwm, maxrss = peak_rss_mb(src, fmt, Path(tmp) / f"out-{fmt}")
                print(f"{rows:>9} rows  {fmt:<7} peak RSS (VmHWM) {hwm:7.1f} MiB  ru_maxrss {maxrss:7.1f} MiB  "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
