"""The refinement benchmark's checks (used by refine_eval.py): the main DRIFT setting and the v3 contrast options
through the library path, and the DRIFT variant diagnostics (`--variants`). `bench` is the refine_eval module (its
MAIN setting, method_scores, select, drift_from_cache), passed in so this module never imports the script."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import refine_lib as rl
import refine_v3 as v3

logger = logging.getLogger("refine_eval")


def check_library_path(ctx, cached, bench) -> dict:
    """The main DRIFT setting through the library: build_bank -> build_scorer -> run_score -> refine_run.

    Checks that the real path gives the scores of the feature cache and keeps the same rows under top:P.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from drift_stream.bank.build import build_bank
    from drift_stream.bank.config import BankConfig
    from drift_stream.embedded import tasks
    from drift_stream.engines.local import RunConfig, run_score
    from drift_stream.refine.policies import refine_run
    from drift_stream.rollouts.engine import Query, RolloutConfig
    from drift_stream.rollouts.verifiers import Verifier
    from drift_stream.scoring.build import build_scorer

    class TaskVerifier(Verifier):
        """The benchmark's verifier: the task's reasoning-gym score on the answer after `####`."""

        name = "benchmark_task"

        def score(self, completion, query):
            return tasks.score_response(query.task, completion, query.answer)

    cfg, out = ctx["cfg"], ctx["cache"] / "library"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    queries = [Query(id=q["id"], messages=({"role": "user", "content": q["question"]},), answer=q["answer"],
                     reference=q["reference"], task=q["task"]) for q in ctx["splits"].queries]
    bank_cfg = BankConfig(
        signing=bench.MAIN.signing, targets=bench.MAIN.targets, preconditioner=bench.MAIN.preconditioner, damping=bench.MAIN.damping,
        normalize=bench.MAIN.normalize_queries, fisher_examples=cfg.fisher_rows, features=ctx["fc"],
        rollouts=RolloutConfig(num_rollouts=cfg.num_rollouts, temperature=1.0, max_new_tokens=cfg.rollout_max_new_tokens,
                               seed=cfg.data_seed, batch_size=64),
        feature_batch_size=32, max_tokens=cfg.max_tokens)
    fisher = [{"id": r["id"], "messages": r["messages"]} for r in ctx["splits"].pool[: cfg.fisher_rows]]
    bank = build_bank(ctx["model"], queries, out / "bank", bank_cfg, verifier=TaskVerifier(), fisher_data=fisher,
               tokenizer=ctx["tok"], device="cpu", progress=False)
    pool_path = out / "pool.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("id", "messages")} for r in ctx["splits"].pool]),
                   pool_path)
    scorer = build_scorer("drift", model=None, tokenizer=ctx["tok"], model_obj=ctx["model"], bank=str(out / "bank"),
                          beta=bench.MAIN.beta, batch_size=32, max_tokens=cfg.max_tokens, device="cpu")
    run_score(RunConfig(data=(str(pool_path),), out=str(out / "run")), scorer, progress=False)
    policy = f"top:{cfg.fraction}"
    refine_run(str(out / "run"), policy, str(out / "refined"), progress=False)
    scored = pq.read_table(str(out / "run" / "data")).to_pydict()
    kept = set(pq.read_table(str(out / "refined" / "data")).column("id").to_pylist())
    lib = dict(zip(scored["id"], scored["drift_score"]))
    ids = [r["id"] for r in ctx["splits"].pool]
    lib_scores = np.array([lib[i] for i in ids], dtype=np.float64)
    mine = bench.method_scores(ctx, "drift", 0, cached)
    mine_kept = {i for i, k in zip(ids, bench.select(ctx, mine, policy)) if k > 0}
    result = {
        "policy": policy, "rows_scored": len(lib), "rows_kept_library": len(kept), "rows_kept_cache": len(mine_kept),
        "same_rows_kept": kept == mine_kept, "rows_kept_differ": len(kept ^ mine_kept),
        "max_abs_score_diff": float(np.max(np.abs(lib_scores - mine))),
        "score_scale": float(np.max(np.abs(mine))),
        "spearman_library_vs_cache": rl.spearman(lib_scores, mine),
        "bank_pass_rate": bank.manifest.get("pass_rate"), "bank_proximity_gap": bank.manifest.get("proximity_gap"),
    }
    # v3: the library's contrast options (adaptive K, the prose reference as a positive target, learnability weights
    # when some query has mixed outcomes) against the cache's own implementation of them (refine_v3 / refine_lib)
    weighting = "learnability" if (v3.query_outcomes(ctx) == "mixed").any() else "uniform"
    variant = replace(bench.MAIN, max_rollouts=cfg.max_rollouts, no_contrast="reference", hybrid_references="prose",
                      query_weighting=weighting)
    prose_queries = [replace(q, reference=src["reference_prose"]) for q, src in zip(queries, ctx["splits"].queries)]
    bank2 = build_bank(ctx["model"], prose_queries, out / "bank_v3", replace(
        bank_cfg, max_rollouts=cfg.max_rollouts, no_contrast="reference", query_weighting=weighting),
        verifier=TaskVerifier(), fisher_data=fisher, tokenizer=ctx["tok"], device="cpu", progress=False)
    scorer = build_scorer("drift", model=None, tokenizer=ctx["tok"], model_obj=ctx["model"], bank=str(out / "bank_v3"),
                          beta=bench.MAIN.beta, batch_size=32, max_tokens=cfg.max_tokens, device="cpu")
    run_score(RunConfig(data=(str(pool_path),), out=str(out / "run_v3")), scorer, progress=False)
    scored = pq.read_table(str(out / "run_v3" / "data")).to_pydict()
    lib = dict(zip(scored["id"], scored["drift_score"]))
    lib_scores = np.array([lib[i] for i in ids], dtype=np.float64)
    mine = bench.drift_from_cache(ctx, variant)
    result["v3"] = {
        "variant": {k: getattr(variant, k) for k in ("max_rollouts", "no_contrast", "hybrid_references",
                                                     "query_weighting")},
        "same_rows_kept": set(np.array(ids)[rl.top_mask(lib_scores, cfg.fraction, ids)]) == set(
            np.array(ids)[rl.top_mask(mine, cfg.fraction, ids)]),
        "max_abs_score_diff": float(np.max(np.abs(lib_scores - mine))), "score_scale": float(np.max(np.abs(mine))),
        "spearman_library_vs_cache": rl.spearman(lib_scores, mine), "bank_contrast": bank2.manifest["contrast"],
        "cache_adaptive": ctx["adaptive"]["info"]}
    logger.info("library check: %s", result)
    return result


def variants(MAIN) -> dict:
    """What makes the signal useful: one change at a time from MAIN (diagnostics only, no SFT)."""
    return {
        "main (block, sign, beta 1, all 1024 queries, K 4)": MAIN,
        "preconditioner identity": replace(MAIN, preconditioner="identity"),
        "preconditioner diagonal": replace(MAIN, preconditioner="diagonal"),
        "beta 0": replace(MAIN, beta=0.0), "beta 0.5": replace(MAIN, beta=0.5), "beta 1.5": replace(MAIN, beta=1.5),
        "beta 2": replace(MAIN, beta=2.0),
        "signing advantage": replace(MAIN, signing="advantage"), "signing positive (unsigned)": replace(MAIN, signing="positive"),
        "targets off-policy": replace(MAIN, targets="off-policy"),
        "targets off-policy, answer-only references": replace(MAIN, targets="off-policy", references="answer"),
        "aggregate pooled (one query vector)": replace(MAIN, aggregate="pooled"),
        "aggregate zmean (per-query z-scores)": replace(MAIN, aggregate="zmean"),
        "queries not unit-normalised": replace(MAIN, normalize_queries=False),
        "task-conditional": replace(MAIN, task_conditional=True),
        "task-conditional, beta 1.5": replace(MAIN, task_conditional=True, beta=1.5),
        # N queries: the first N/2 of each target task (query_vectors balances by task)
        **{f"{n} queries": replace(MAIN, num_queries=n) for n in (32, 64, 128, 256, 512)},
        "K = 1 rollout": replace(MAIN, num_rollouts=1), "K = 2 rollouts": replace(MAIN, num_rollouts=2),
        "512 queries, K = 2": replace(MAIN, num_queries=512, num_rollouts=2),
    }


def explore_variants(ctx, bench) -> list[dict]:
    """Per variant: ROC-AUC clean vs corrupted (all rows, target-task rows), corrupted share and composition of top:P."""
    from drift_stream.scoring.drift import fit_beta

    pool = ctx["splits"].pool
    labels = np.array([r["corruption"] for r in pool])
    clean = labels == "clean"
    tgt = np.isin([r["task"] for r in pool], bench.TARGET)
    ntok = np.array([sum(e.loss_mask) for e in ctx["pool_ex"]])
    ids = [r["id"] for r in pool]
    out = []
    raw0 = bench.drift_from_cache(ctx, replace(bench.MAIN, beta=0.0))
    calib = min(256, len(pool))
    auto = fit_beta(raw0[:calib], ctx["feats"]["pool_norm"][:calib])
    table = {**variants(bench.MAIN), f"beta auto (fit on {calib} rows: {auto:.2f})": replace(bench.MAIN, beta=float(auto))}
    for name, v in table.items():
        s = bench.drift_from_cache(ctx, v)
        row = {"variant": name, "auc": rl.roc_auc(s, clean), "auc_target_rows": rl.roc_auc(s[tgt], clean[tgt]),
               "spearman_grad_norm": rl.spearman(s, ctx["feats"]["pool_norm"]), "spearman_length": rl.spearman(s, ntok)}
        for frac in (0.1, 0.25):
            k = rl.top_mask(s, frac, ids)
            row[f"corrupted@{frac}"] = float(1 - clean[k].mean())
            row[f"target_share@{frac}"] = float(tgt[k].mean())
            row[f"mean_tokens@{frac}"] = float(ntok[k].mean())
        out.append(row)
    pool_row = {"variant": "(pool)", "corrupted@0.1": float(1 - clean.mean()), "target_share@0.1": float(tgt.mean()),
                "mean_tokens@0.1": float(ntok.mean())}
    return [pool_row] + out
