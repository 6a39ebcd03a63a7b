"""Follow-up to the refinement benchmark: task-conditional DRIFT scoring (docs/benchmark.md, "Follow-ups").

    python benchmarks/refine_followup.py --workdir /tmp/rb/wf      # reuses refine_eval.py's cache (base, features)

Task-conditional score: a pool row of target task T is scored against the validation queries of task T only (mean
of its per-query scores over those queries); a row of any other task against all queries. Selection: top:P inside
each task (`strat_task`, the pool's task mix), or inside each task x response-length quartile (`strat_len`).
Per-query z-scoring (`zmean`) standardises each query's scores over the pool before the mean.
Continued SFT, seeds and evaluation are refine_eval.py's. Writes task_conditional.{json,md} into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import refine_eval as re_  # noqa: E402
import refine_lib as rl  # noqa: E402
from refine_report import versions  # noqa: E402

logger = logging.getLogger("refine_followup")

# name -> (scorer, task_conditional, selection)
METHODS = {
    "drift strat_task:0.25 (rerun)": ("drift", False, "strat_task:0.25"),
    "drift tc strat_task:0.25": ("drift", True, "strat_task:0.25"),
    "drift tc beta=1.5 strat_task:0.25": ("drift_beta1.5", True, "strat_task:0.25"),
    "drift tc zmean strat_task:0.25": ("drift_zmean", True, "strat_task:0.25"),
    "drift tc beta=1.5 strat_len:0.25": ("drift_beta1.5", True, "strat_len:0.25"),
}
SCORERS = {"drift": re_.MAIN, "drift_beta1.5": replace(re_.MAIN, beta=1.5),
           "drift_zmean": replace(re_.MAIN, aggregate="zmean")}


def per_query_scores(ctx, variant: rl.DriftVariant):
    """Per-query scores [n, m'] of pool rows (z-scored over the pool for `zmean`) and the task of each query [m']."""
    f, r = ctx["feats"], ctx["rollouts"]
    g, kept = rl.query_vectors(variant, f["roll"], np.array([x["query"] for x in r]),
                               np.array([x["index"] for x in r]), np.array([x["reward"] for x in r]), f["ref"])
    pre = rl.fit_preconditioner(variant.preconditioner, f["pool"][: ctx["cfg"].fisher_rows],
                                [int(b) for b in f["block_sizes"]], variant.damping)
    _, per_query = rl.drift_scores(variant, f["pool"], f["pool_norm"], g, pre)
    if variant.aggregate == "zmean":
        per_query = (per_query - per_query.mean(axis=0)) / np.maximum(per_query.std(axis=0), 1e-30)
    qtask = np.array([ctx["splits"].queries[i]["task"] for i in kept])
    return per_query, qtask


def task_conditional(per_query, qtask, row_task) -> np.ndarray:
    """Score [n]: rows of a task that has queries -> mean over that task's queries; other rows -> mean over all."""
    row_task = np.asarray(row_task)
    out = per_query.mean(axis=1)
    for t in np.unique(qtask):
        rows = row_task == t
        out[rows] = per_query[rows][:, qtask == t].mean(axis=1)
    return out


def scores(ctx, scorer: str, tc: bool, cached: dict) -> np.ndarray:
    key = (scorer, tc)
    if key not in cached:
        pq, qt = per_query_scores(ctx, SCORERS[scorer])
        cached[key] = task_conditional(pq, qt, [r["task"] for r in ctx["splits"].pool]) if tc else pq.mean(axis=1)
    return cached[key]


def diagnostics(ctx, s, keep) -> dict:
    pool = ctx["splits"].pool
    clean = np.array([r["corruption"] == "clean" for r in pool])
    task = np.array([r["task"] for r in pool])
    tgt = np.isin(task, re_.TARGET)
    ntok = np.array([sum(e.loss_mask) for e in ctx["pool_ex"]])
    out = {"auc_clean_vs_corrupted": rl.roc_auc(s, clean),
           **{f"auc_within_{t}": rl.roc_auc(s[task == t], clean[task == t]) for t in re_.TARGET},
           "corrupted_kept": float(1 - clean[keep].mean()), "target_share_kept": float(tgt[keep].mean()),
           "mean_tokens_kept": float(ntok[keep].mean()), "mean_tokens_pool": float(ntok.mean())}
    for t in re_.TARGET:
        sel = keep & (task == t)
        out[f"corrupted_kept_{t}"] = float(1 - clean[sel].mean())
    return out


def markdown(result: dict) -> str:
    lines = ["# Follow-up: task-conditional DRIFT scoring (same cache and seeds as results.md)", "",
             f"Base: target {result['base']['target_acc']:.3f}, non-target {result['base']['nontarget_acc']:.3f}. "
             "tc: rows of target task T scored against T's validation queries only.", "",
             "| method | corrupted kept | target | non-target | AUC | AUC in basic_arithmetic | AUC in chain_sum | "
             "corrupted kept in b_a / c_s | mean tokens kept (pool) | kept rows shared with the non-tc score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in result["methods"]:
        runs = [r for r in result["rows"] if r["method"] == name]
        t, n = rl.mean_std([r["target_acc"] for r in runs]), rl.mean_std([r["nontarget_acc"] for r in runs])
        d = result["diagnostics"][name]
        lines.append(
            f"| {name} | {d['corrupted_kept']:.1%} | {t[0]:.3f} ± {t[1]:.3f} | {n[0]:.3f} ± {n[1]:.3f} | "
            f"{d['auc_clean_vs_corrupted']:.3f} | {d['auc_within_basic_arithmetic']:.3f} | "
            f"{d['auc_within_chain_sum']:.3f} | {d['corrupted_kept_basic_arithmetic']:.1%} / "
            f"{d['corrupted_kept_chain_sum']:.1%} | {d['mean_tokens_kept']:.1f} ({d['mean_tokens_pool']:.1f}) | "
            f"{d['kept_shared_with_non_tc']:.1%} |")
    lines += ["", "Per seed (target / non-target): " + "; ".join(
        f"{r['method']} s{r['seed']}: {r['target_acc']:.3f} / {r['nontarget_acc']:.3f}" for r in result["rows"]), "",
        f"Wall time (s): {json.dumps({k: round(v) for k, v in result['wall_s'].items()})}  ",
        f"Machine: {result['machine']}  ", f"Versions: {result['versions']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/refine_eval_cache"))
    parser.add_argument("--out", type=Path, default=re_.REPO / "benchmarks" / "results" / "followup")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(1)
    cfg = replace(re_.BenchConfig(), seeds=tuple(args.seeds))
    timer = re_.Timer()
    ctx = re_.build_cache(cfg, args.workdir, timer)
    if timer.stages.get("base", 0) > 60:
        raise SystemExit("the base was retrained: wrong --workdir?")
    methods = {k: METHODS[k] for k in (args.methods or METHODS)}
    labels = [r["corruption"] for r in ctx["splits"].pool]
    kinds = ["clean"] + sorted(set(labels) - {"clean"})
    cached: dict = {}
    diag = {}
    with timer("scores"):
        for name, (scorer, tc, selection) in methods.items():
            s = scores(ctx, scorer, tc, cached)
            keep = re_.select(ctx, s, selection) > 0
            diag[name] = diagnostics(ctx, s, keep)
            plain = re_.select(ctx, scores(ctx, scorer, False, cached), selection) > 0  # same, all queries
            diag[name]["kept_shared_with_non_tc"] = float((keep & plain).sum() / keep.sum())
    base = ctx["base_eval"]["per_task"]
    result = {"config": asdict(cfg), "methods": {k: {"scorer": s, "task_conditional": tc, "selection": sel}
                                                 for k, (s, tc, sel) in methods.items()},
              "scorers": {k: asdict(v) for k, v in SCORERS.items()}, "diagnostics": diag, "rows": [],
              "base": {"target_acc": float(np.mean([base[t] for t in re_.TARGET])),
                       "nontarget_acc": float(np.mean([base[t] for t in re_.NONTARGET]))},
              "machine": f"{platform.machine()}, 1 torch thread, {os.cpu_count()} cores (shared), {platform.platform()}",
              "versions": versions(), "wall_s": timer.stages}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "task_conditional.json").write_text(json.dumps(result, indent=1, default=float))
    for seed in cfg.seeds:
        for name, (scorer, tc, selection) in methods.items():
            w = re_.select(ctx, scores(ctx, scorer, tc, cached), selection)
            t0 = time.perf_counter()
            target, other, per_task = re_.continue_sft(ctx, w, seed)
            result["rows"].append({"method": name, "seed": seed, "target_acc": target, "nontarget_acc": other,
                                   "per_task": per_task, "rows_kept": int((w > 0).sum()),
                                   "corrupted_share": 1.0 - rl.kept_shares(w, labels, ["clean"])["clean"],
                                   "kept_shares": rl.kept_shares(w, labels, kinds),
                                   "wall_s": time.perf_counter() - t0})
            timer.stages["continued_sft"] = timer.stages.get("continued_sft", 0.0) + time.perf_counter() - t0
            logger.info("%-36s seed %d: target %.3f non-target %.3f (%.0fs)", name, seed, target, other,
                        time.perf_counter() - t0)
            (args.out / "task_conditional.json").write_text(json.dumps(result, indent=1, default=float))
            (args.out / "task_conditional.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
