"""Rows/s of `score --engine ray` with 1 and 2 actors against the local engine, on the shipped tiny model.

The demo pool (first --rows rows) is split into --files parquet files; a small on-policy bank is built once; then the
same DRIFT scoring (beta fixed, so every run does the same work) runs into a fresh run directory with
  local      pipeline.run_score in this process (torch threads: --local-threads),
  ray x1     RayEngine, 1 actor (1 CPU, 1 torch thread),
  ray x2     RayEngine, 2 actors.
Ray is started once before the runs (its start-up is printed, not counted); each Ray run counts its actors' start-up
(a new process that imports torch and loads the model), because a run pays it; "steady" rows/s leaves start-up out
(files finished after the first one, over the time between the first and the last completion marker). Every run's
scores are checked against the local run's (max |diff|). Prints one table and a JSON line.

    python benchmarks/ray_scaling.py [--rows 480] [--files 8] [--repeats 1] [--local-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_inputs(root: str, rows: int, files: int) -> str:
    from drift_stream.embedded.demo import demo_assets

    table = pq.read_table(demo_assets().pool).slice(0, rows)
    per = -(-rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * per, per), os.path.join(root, f"part-{i:03d}.parquet"))
    return os.path.join(root, "part-*.parquet")


def make_bank(root: str) -> str:
    from drift_stream.bank.build import build_bank
    from drift_stream.bank.config import BankConfig
    from drift_stream.embedded.demo import demo_assets
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.rollouts.engine import RolloutConfig

    assets = demo_assets()
    out = os.path.join(root, "bank")
    queries = pq.read_table(assets.queries).slice(0, 16).to_pylist()
    config = BankConfig(rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=32, seed=0),
                        features=FeatureConfig(), preconditioner="identity")
    build_bank(assets.model, queries, out, config, verifier="numeric", adapter="qa", progress=False)
    return out


def scores(run_dir: str) -> np.ndarray:
    table = pa.concat_tables(pq.read_table(os.path.join(run_dir, "data", name))
                             for name in sorted(os.listdir(os.path.join(run_dir, "data"))))
    return np.array(table.column("drift_score").to_pylist(), dtype=float)


def steady_rows_per_s(run_dir: str) -> float | None:
    """Rows/s once running: rows of the files finished after the first one, over the time from the first marker to
    the last (marker mtimes). Leaves out start-up (model loads, actor processes) with the same rule for every engine."""
    directory = os.path.join(run_dir, "completions")
    markers = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        with open(path) as handle:
            markers.append((os.stat(path).st_mtime, json.load(handle)["rows_in"]))
    markers.sort()
    span = markers[-1][0] - markers[0][0]
    return sum(n for _, n in markers[1:]) / span if len(markers) > 1 and span > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=480)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine (the best is kept)")
    parser.add_argument("--local-threads", type=int, default=1, help="torch threads of the local engine (default "
                        "1, as each actor; torch's default of 2 spun against the other jobs of a shared 2-core "
                        "machine and ran 4x slower)")
    args = parser.parse_args()

    import ray
    import torch

    from drift_stream.embedded.demo import demo_assets
    from drift_stream.engines.local import RunConfig, run_score
    from drift_stream.engines.ray import RayEngine, score_on_ray
    from drift_stream.scoring.build import build_scorer

    if args.local_threads:
        torch.set_num_threads(args.local_threads)
    root = tempfile.mkdtemp(prefix="ray_scaling_")
    data = make_inputs(root, args.rows, args.files)
    bank = make_bank(root)
    kwargs = dict(scorer="drift", model=demo_assets().model, adapter="messages", bank=bank, beta=1.0,
                  batch_size=16, max_tokens=256)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count() + 2, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t0

    results, reference = {}, None
    for name, actors in (("local", 0), ("ray x1", 1), ("ray x2", 2)):
        best = None
        for repeat in range(args.repeats):
            out = os.path.join(root, f"run-{actors}-{repeat}")
            config = RunConfig(data=(data,), out=out, batch_rows=64)
            t0 = time.perf_counter()
            if actors == 0:
                manifest = run_score(config, build_scorer(**kwargs), progress=False)
            else:
                manifest = score_on_ray(config, kwargs, RayEngine(kwargs, actors=actors), progress=False)
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
            got = scores(out)
            reference = got if reference is None else reference
            diff = float(np.nanmax(np.abs(got - reference)))
            steady = steady_rows_per_s(out)
        results[name] = {"seconds": round(best, 2), "rows_per_s": round(manifest["rows_in"] / best, 1),
                         "steady_rows_per_s": None if steady is None else round(steady, 1),
                         "max_abs_score_diff_vs_local": diff}
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    local = results["local"]["rows_per_s"]
    print(f"{args.rows} rows in {args.files} files, {os.cpu_count()} CPUs; Ray start-up {ray_start_s:.1f}s "
          "(not counted)")
    steady_local = results["local"]["steady_rows_per_s"]
    print(f"{'engine':<8}{'seconds':>9}{'rows/s':>9}{'x local':>9}{'steady':>9}{'x local':>9}{'max|diff|':>11}")
    for name, r in results.items():
        steady = r["steady_rows_per_s"]
        ratio = steady / steady_local if steady and steady_local else float("nan")
        print(f"{name:<8}{r['seconds']:>9.1f}{r['rows_per_s']:>9.1f}{r['rows_per_s'] / local:>9.2f}"
              f"{steady or float('nan'):>9.1f}{ratio:>9.2f}{r['max_abs_score_diff_vs_local']:>11.1e}")
    print(json.dumps({"rows": args.rows, "files": args.files, "cpus": os.cpu_count(),
                      "ray_start_s": round(ray_start_s, 1), "results": results}))


if __name__ == "__main__":
    main()
