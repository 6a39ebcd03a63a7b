"""`drift-stream demo`: the whole pipeline on the embedded default, with nothing but the package.

bank (on-policy rollouts of the shipped tiny model on the demo validation queries) -> score the demo pool ->
refine (top 25% by default) -> HTML report -> a summary of how much of each corruption kind the refined set kept.
A rerun into the same folder reuses the bank and the scored run; each policy refines into its own folder
(`refined-top-0.25`, ...), so `demo --policy X` after the default compares the two.

`model="smollm2"` runs the same flow on a real pretrained model (embedded/real_models.py: SmolLM2-135M-Instruct
from its PyPI wheel, converted once) with its own task set (embedded/real_tasks.py): a small bank on the target
task's queries, a small pool in the model's chat format with labelled corruption, scored, refined and reported.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoAssets:
    model: str
    pool: str
    queries: str
    test: str


def demo_assets() -> DemoAssets:
    root = resources.files("drift_stream.embedded") / "assets"
    paths = DemoAssets(
        model=str(root / "tiny-reasoner"),
        pool=str(root / "demo" / "pool.parquet"),
        queries=str(root / "demo" / "queries.parquet"),
        test=str(root / "demo" / "test.parquet"),
    )
    for name in ("model", "pool", "queries"):
        if not Path(getattr(paths, name)).exists():
            from drift_stream.errors import DriftError

            raise DriftError(f"the embedded default is missing {getattr(paths, name)}: reinstall drift-stream")
    return paths


def corruption_table(pool_path: str, refined_dir: str, column: str = "corruption") -> list[tuple[str, int, int]]:
    """(kind, rows in pool, rows kept) for each corruption kind (the pool's `column`), 'clean' first."""
    import polars as pl

    pool = pl.read_parquet(pool_path, columns=[column])
    kept = pl.scan_parquet(str(Path(refined_dir) / "data" / "*.parquet")).select(column).collect()
    pool_counts = dict(pool.group_by(column).len().iter_rows())
    kept_counts = dict(kept.group_by(column).len().iter_rows())
    kinds = sorted(pool_counts, key=lambda k: (k != "clean", k))
    return [(kind, int(pool_counts[kind]), int(kept_counts.get(kind, 0))) for kind in kinds]


def format_corruption_table(rows: list[tuple[str, int, int]]) -> str:
    total_pool = sum(p for _, p, _ in rows)
    total_kept = sum(k for _, _, k in rows)
    lines = [f"{'kind':<14}{'pool':>8}{'share':>8}{'kept':>8}{'share':>8}"]
    for kind, p, k in rows:
        lines.append(f"{kind:<14}{p:>8}{p / total_pool:>8.1%}{k:>8}{(k / total_kept if total_kept else 0):>8.1%}")
    corrupt_pool = sum(p for kind, p, _ in rows if kind != "clean")
    corrupt_kept = sum(k for kind, _, k in rows if kind != "clean")
    lines.append(
        f"{'corrupted':<14}{corrupt_pool:>8}{corrupt_pool / total_pool:>8.1%}{corrupt_kept:>8}"
        f"{(corrupt_kept / total_kept if total_kept else 0):>8.1%}"
    )
    return "\n".join(lines)


def refined_dir_name(policy: str) -> str:
    """The folder of one policy's refine inside the demo folder: 'top:0.25' -> 'refined-top-0.25'."""
    return "refined-" + re.sub(r"[^A-Za-z0-9._-]+", "-", str(policy)).strip("-")


@dataclass(frozen=True)
class RealDemoSizes:
    """The real-model demo's sizes: minutes on 2 CPU cores (SmolLM2: ~1 s per rollout, ~0.5 s per scored row)."""

    queries: int = 16  # target-task validation queries
    rollouts: int = 4  # K per query
    max_new_tokens: int = 32
    pool: int = 96  # pool rows (40% corrupted)
    last_n_blocks: int = 4  # of 30: the features' backward stops there (half the time of every block)
    fisher_examples: int = 64


def real_demo_assets(model: str, out: Path, sizes: RealDemoSizes = RealDemoSizes(),
                     download: bool = False) -> DemoAssets:
    """Convert `model` once (real_models.prepare_model) and write its demo data (real_tasks) into `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from drift_stream.embedded.real_models import prepare_model
    from drift_stream.embedded.real_tasks import RealTaskRecipe, make_real_splits

    model_path = prepare_model(model, download=download, verbose=True)
    data = out / "data"
    paths = DemoAssets(model=str(model_path), pool=str(data / "pool.parquet"),
                       queries=str(data / "queries.parquet"), test=str(data / "test.parquet"))
    if not Path(paths.pool).exists():
        splits = make_real_splits(RealTaskRecipe(pool_size=sizes.pool, warmup_size=0, queries=sizes.queries))
        data.mkdir(parents=True, exist_ok=True)
        pool = [{**r, "corruption": r["kind"]} for r in splits.pool]  # the default demo's column name
        pq.write_table(pa.Table.from_pylist(pool), paths.pool)
        keep = ("id", "question", "answer", "task")
        pq.write_table(pa.Table.from_pylist([{k: q[k] for k in keep} for q in splits.queries]), paths.queries)
        pq.write_table(pa.Table.from_pylist([{k: q[k] for k in keep} for q in splits.test]), paths.test)
    return paths


def run_demo(out: str, *, policy: str = "top:0.25", progress: bool = True, assets: DemoAssets | None = None,
             model: str | None = None, download: bool = False) -> dict:
    """The whole pipeline into `out`. `assets`: the model, pool and queries (default: the embedded ones).

    `model`: a real model's name (embedded/real_models.REAL_MODELS, e.g. "smollm2") instead of the embedded tiny
    one, with its own task set and pool (real_demo_assets); `download` lets a missing wheel be fetched with pip."""
    from drift_stream.bank.build import build_bank
    from drift_stream.bank.config import BankConfig
    from drift_stream.engines.local import RunConfig, run_score
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.refine.policies import refine_run
    from drift_stream.refine.report import summarize_run, write_report
    from drift_stream.rollouts.engine import RolloutConfig
    from drift_stream.scoring.build import build_scorer

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    sizes = RealDemoSizes()
    if model is not None:
        assets = assets or real_demo_assets(model, root, sizes, download=download)
    assets = assets or demo_assets()
    bank_dir, run_dir, refined_dir = root / "bank", root / "run", root / refined_dir_name(policy)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    # A rerun reuses the bank and resumes the score; a refine of the same policy resumes, another policy refines
    # into its own folder (one folder for every policy was refused as a rerun with another config).
    reused = (bank_dir / "manifest.json").exists()
    if not reused:
        # Block Fisher on a sample of the pool: +0.04 ROC-AUC over identity in benchmarks/refine_eval.py --variants.
        config = BankConfig(
            rollouts=RolloutConfig(num_rollouts=8, temperature=1.0, max_new_tokens=64, seed=0),
            features=FeatureConfig(),
            preconditioner="block",
            fisher_examples=512,
        )
        if model is not None:  # the real model: fewer, shorter rollouts and the last blocks only (minutes on CPU)
            config = BankConfig(
                rollouts=RolloutConfig(num_rollouts=sizes.rollouts, temperature=1.0,
                                       max_new_tokens=sizes.max_new_tokens, seed=0, batch_size=64),
                features=FeatureConfig(last_n_blocks=sizes.last_n_blocks),
                preconditioner="block",
                fisher_examples=sizes.fisher_examples,
                max_tokens=256,
            )
        build_bank(assets.model, [assets.queries], str(bank_dir), config, verifier="numeric", adapter="qa",
                   fisher_data=[assets.pool], fisher_adapter="messages", progress=progress)
    timings["bank_s"] = time.perf_counter() - start

    start = time.perf_counter()
    scorer = build_scorer("drift", model=assets.model, adapter="messages", bank=str(bank_dir), batch_size=16,
                          max_tokens=256)  # the model's context
    run_score(RunConfig(data=(assets.pool,), out=str(run_dir)), scorer, progress=progress)
    timings["score_s"] = time.perf_counter() - start

    start = time.perf_counter()
    refine_run(str(run_dir), policy, str(refined_dir), progress=progress)
    timings["refine_s"] = time.perf_counter() - start

    report_path = write_report(str(run_dir), str(root / "report.html"))
    table = corruption_table(assets.pool, str(refined_dir))
    summary = {
        "model": model or "embedded tiny-reasoner",
        "bank": str(bank_dir),
        "run": str(run_dir),
        "refined": str(refined_dir),
        "report": report_path,
        "policy": policy,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "corruption": [{"kind": k, "pool": p, "kept": kept} for k, p, kept in table],
    }
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(summarize_run(str(run_dir)))
    print(f"\nCorruption in the pool and in the refined set ({policy}):")
    print(format_corruption_table(table))
    print(
        f"\nbank     {bank_dir}\nscored   {run_dir}\nrefined  {refined_dir}\nreport   {report_path}\n"
        f"time     bank {timings['bank_s']:.0f}s{' (reused)' if reused else ''}, score {timings['score_s']:.0f}s, "
        f"refine {timings['refine_s']:.0f}s"
    )
    return summary
