"""Benchmark v3 pieces (issue 16), used by refine_eval.py: references in a second author's style, the library's
contrast options (query weighting, dropping / hybrid / adaptive K for queries without a contrast), filters in
sequence, per-candidate AUC of the contributions of all-wrong / all-right / mixed queries, paired statistics over
extra seeds, and a second round of refine + continued SFT.

Second round (`--second-round`): round_context / second_round, at equal SFT steps per round.

Cache additions (same cache directory as v2, their own files, so a v2 cache is reused):
  features_prose_refs.npz   features + loss of the queries' references in the `prose` style
  losses_v3.npz             loss and loss-token count of every rollout and of each reference style (proximity gaps)
  rollouts_adaptive.json    adaptive K: more rollouts for queries without a contrast, drawn by the library's
                            contrast.top_up_rollouts (round r: rollout seed data_seed + r), and their features
"""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import refine_lib as rl

logger = logging.getLogger("refine_eval")

REFERENCE_KEYS = {"worked": "ref", "prose": "ref_prose", "answer": "ref_answer"}
STYLE_NAMES = {"worked": "pool style", "prose": "another author (prose)", "answer": "bare answer"}


# ---------------------------------------------------------------------------------------------------- cache


def _losses(model, examples, batch_size: int = 64):
    """(mean NLL [n], loss tokens [n]) of tokenized examples, input order (the library's one per-example loss)."""
    from drift_stream.data.tokenization import collate
    from drift_stream.grads.features import GradientFeaturizer
    from drift_stream.grads.projection import FeatureConfig

    featurizer = GradientFeaturizer(model, FeatureConfig(proj_dim_in=1, proj_dim_out=1))
    loss, num = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo: lo + batch_size]
        out_loss, out_num = featurizer.loss_only(collate(batch, pad_token_id=0))
        loss[lo: lo + len(batch)] = out_loss.double().numpy()
        num[lo: lo + len(batch)] = out_num.numpy()
    return loss, num


def reference_examples(chat, queries, style: str):
    from drift_stream.data.example_types import Example

    key = {"worked": "reference_pool", "prose": "reference_prose", "answer": "answer"}[style]
    return [chat.encode(Example(id=q["id"], messages=({"role": "user", "content": q["question"]},
                                                       {"role": "assistant", "content": q[key]})))
            for q in queries]


def extend_cache(ctx, fc) -> None:
    """Prose-reference features, losses for the proximity gaps, adaptive-K rollouts (cached files; see module doc)."""
    cache, model, chat = ctx["cache"], ctx["model"], ctx["chat"]
    queries = ctx["splits"].queries
    path = cache / "features_prose_refs.npz"
    if not path.exists():
        pf, _, pl_, _ = rl.featurize(model, reference_examples(chat, queries, "prose"), feature_config=fc)
        np.savez(path, ref_prose=pf, ref_prose_loss=pl_)
    f = np.load(path)
    ctx["feats"].update({k: f[k] for k in f.files})
    path = cache / "losses_v3.npz"
    if not path.exists():
        roll_ex = [chat.encode_rollout(r["prompt_ids"], r["completion_ids"], id=f"r{i}")
                   for i, r in enumerate(ctx["rollouts"])]
        arrays = {}
        arrays["roll_loss"], arrays["roll_tokens"] = _losses(model, roll_ex)
        for style in REFERENCE_KEYS:
            arrays[f"{style}_loss"], arrays[f"{style}_tokens"] = _losses(model, reference_examples(chat, queries, style))
        np.savez(path, **arrays)
    f = np.load(path)
    ctx["losses"] = {k: f[k] for k in f.files}
    ctx["adaptive"] = adaptive_rollouts(ctx, fc)


def adaptive_rollouts(ctx, fc) -> dict:
    """Rollouts beyond the first K for queries without a contrast, up to cfg.max_rollouts (the library's loop)."""
    from drift_stream.bank.contrast import top_up_rollouts
    from drift_stream.embedded import tasks
    from drift_stream.rollouts.engine import Query, RolloutConfig, generate_rollouts

    cfg, cache = ctx["cfg"], ctx["cache"]
    path = cache / f"rollouts_adaptive_{cfg.max_rollouts}.json"
    if not path.exists():
        qrows = ctx["splits"].queries
        queries = [Query(id=q["id"], messages=({"role": "user", "content": q["question"]},), answer=q["answer"],
                         task=q["task"]) for q in qrows]
        by_id = {q["id"]: (i, q) for i, q in enumerate(qrows)}

        class _Result:
            def __init__(self, reward):
                self.reward, self.failure = reward, None

        def generate(qs, seed):
            return generate_rollouts(ctx["model"], ctx["tok"], ctx["chat"], qs, RolloutConfig(
                num_rollouts=cfg.num_rollouts, temperature=1.0, max_new_tokens=cfg.rollout_max_new_tokens, seed=seed,
                batch_size=64), progress=False)

        def verify(rs):
            return [_Result(tasks.score_response(by_id[r.query_id][1]["task"], r.completion,
                                                 by_id[r.query_id][1]["answer"])) for r in rs]

        class _Cached:  # the first K rollouts, as the engine returned them
            def __init__(self, row):
                self.query_id, self.rollout_index = qrows[row["query"]]["id"], row["index"]

        first = [_Cached(r) for r in ctx["rollouts"]]
        results = [_Result(r["reward"]) for r in ctx["rollouts"]]
        all_rollouts, all_results, info = top_up_rollouts(
            generate, verify, queries, first, results, num_rollouts=cfg.num_rollouts, max_rollouts=cfg.max_rollouts,
            seed=cfg.data_seed, correct_threshold=1.0)
        extra = [(r, res) for r, res in zip(all_rollouts, all_results) if not isinstance(r, _Cached)]
        rows = [{"query": by_id[r.query_id][0], "index": r.rollout_index, "prompt_ids": list(r.prompt_ids),
                 "completion_ids": list(r.completion_ids), "completion": r.completion, "reward": res.reward}
                for r, res in extra]
        feats = np.zeros((0, ctx["feats"]["roll"].shape[1]), dtype=np.float32)
        if rows:
            ex = [ctx["chat"].encode_rollout(r["prompt_ids"], r["completion_ids"], id=f"a{i}") for i, r in enumerate(rows)]
            feats, _, _, _ = rl.featurize(ctx["model"], ex, feature_config=fc)
        np.save(cache / f"rollouts_adaptive_{cfg.max_rollouts}.npy", feats)
        path.write_text(json.dumps({"rows": rows, "info": info}))
    data = json.loads(path.read_text())
    return {"rows": data["rows"], "info": data["info"],
            "feats": np.load(cache / f"rollouts_adaptive_{cfg.max_rollouts}.npy")}


# ---------------------------------------------------------------------------------------------------- scores


def rollout_arrays(ctx, variant: rl.DriftVariant):
    """(features [R, D], query [R], index [R], reward [R]): the first K rollouts, plus the adaptive ones when the
    variant asks for adaptive K (index < min(variant.max_rollouts, cfg.max_rollouts))."""
    r, f = ctx["rollouts"], ctx["feats"]["roll"]
    rows = list(r)
    if variant.max_rollouts is not None:
        limit = min(variant.max_rollouts, ctx["cfg"].max_rollouts)
        extra = [(i, x) for i, x in enumerate(ctx["adaptive"]["rows"]) if x["index"] < limit]
        rows += [x for _, x in extra]
        f = np.concatenate([f, ctx["adaptive"]["feats"][[i for i, _ in extra]]]) if extra else f
    return (f, np.array([x["query"] for x in rows]), np.array([x["index"] for x in rows]),
            np.array([x["reward"] for x in rows], dtype=np.float64))


def variant_scores(ctx, variant: rl.DriftVariant):
    """(S [n], per-query scores [n, m'], kept query positions [m'], query weights [m'] or None)."""
    f = ctx["feats"]
    feats, q, idx, rewards = rollout_arrays(ctx, variant)
    g, kept, pass_rate = rl.query_targets(variant, feats, q, idx, rewards, f[REFERENCE_KEYS[variant.references]],
                                          query_task=[x["task"] for x in ctx["splits"].queries],
                                          hybrid_feats=f[REFERENCE_KEYS[variant.hybrid_references]])
    n = len(f["pool"])
    if len(g) == 0:
        logger.warning("%s: no validation query has a signal; all scores are 0", variant)
        return np.zeros(n), np.zeros((n, 0)), kept, None
    from drift_stream.bank.contrast import query_weights

    weights = None if variant.query_weighting == "uniform" else query_weights(pass_rate, variant.query_weighting)
    if weights is not None and not weights.sum() > 0:
        logger.warning("%s: every query has weight 0; all scores are 0", variant)
        return np.zeros(n), np.zeros((n, len(g))), kept, weights
    pre = rl.fit_preconditioner(variant.preconditioner, f["pool"][: ctx["cfg"].fisher_rows],
                                [int(b) for b in f["block_sizes"]], variant.damping)
    score, per_query = rl.drift_scores(variant, f["pool"], f["pool_norm"], g, pre, weights=weights)
    if variant.task_conditional:
        query_task = [ctx["splits"].queries[i]["task"] for i in kept]
        score = rl.task_conditional_mean(per_query, query_task, [row["task"] for row in ctx["splits"].pool])
    return score, per_query, kept, weights


def query_outcomes(ctx) -> np.ndarray:
    """Per validation query, from its first K rollouts: 'all_wrong', 'all_right' or 'mixed'."""
    m = len(ctx["splits"].queries)
    q = np.array([x["query"] for x in ctx["rollouts"]])
    ok = np.array([x["reward"] >= 1.0 for x in ctx["rollouts"]], dtype=np.float64)
    n_ok, n = np.bincount(q, weights=ok, minlength=m), np.bincount(q, minlength=m)
    return np.where(n_ok == 0, "all_wrong", np.where(n_ok == n, "all_right", "mixed"))


def contribution_aucs(ctx, variant: rl.DriftVariant) -> dict:
    """ROC-AUC clean vs corrupted of the score made of one group of queries only (grouped by their first K
    rollouts: all wrong / all right / mixed), each query weighted as in the variant; plus the group sizes."""
    _, per_query, kept, weights = variant_scores(ctx, variant)
    clean = np.array([r["corruption"] == "clean" for r in ctx["splits"].pool])
    groups = query_outcomes(ctx)[kept] if len(kept) else np.array([])
    out = {}
    for name in ("all_wrong", "all_right", "mixed"):
        sel = groups == name
        out[f"queries_{name}"] = int(sel.sum())
        w = np.ones(int(sel.sum())) if weights is None else weights[sel]
        if sel.sum() == 0 or per_query.shape[1] == 0 or not w.sum() > 0:
            out[f"auc_{name}"] = float("nan")
            continue
        out[f"auc_{name}"] = rl.roc_auc(per_query[:, sel] @ w / w.sum(), clean)
    return out


def proximity_gaps(ctx) -> dict:
    """Per reference style: mean over queries of reference loss - rollout loss (token-weighted over the query's K
    rollouts), the bank manifest's definition; and the two losses."""
    L = ctx["losses"]
    m = len(ctx["splits"].queries)
    q = np.array([x["query"] for x in ctx["rollouts"]])
    tok = L["roll_tokens"].astype(np.float64)
    roll = np.bincount(q, weights=L["roll_loss"] * tok, minlength=m) / np.maximum(np.bincount(q, weights=tok,
                                                                                              minlength=m), 1)
    out = {}
    for style in REFERENCE_KEYS:
        ref = L[f"{style}_loss"]
        out[style] = {"gap": float(np.mean(ref - roll)), "reference_loss": float(np.mean(ref)),
                      "rollout_loss": float(np.mean(roll)), "name": STYLE_NAMES[style]}
    return out


def chained_select(ctx, select, scores, selection: str, method_scores, seed: int, cached):
    """`pre:SCORER:X|SELECTION`: drop the worst X of the pool by SCORER (as refine --prefilter: top:(1-X) of that
    score, ties by id), then SELECTION over the survivors; dropped rows get weight 0."""
    head, rest = selection.split("|", 1)
    _, scorer, frac = head.split(":")
    pool = ctx["splits"].pool
    ids = [r["id"] for r in pool]
    n = len(pool)
    drop = int(math.floor(float(frac) * n + 0.5))
    alive = rl.top_mask(method_scores(ctx, scorer, seed, cached), 0.0, ids, k=n - drop)
    splits = SimpleNamespace(**{**vars(ctx["splits"]), "pool": [pool[i] for i in np.flatnonzero(alive)]})
    sub = {**ctx, "splits": splits,
           "pool_ex": [ctx["pool_ex"][i] for i in np.flatnonzero(alive)]}
    w = np.zeros(n)
    w[alive] = select(sub, np.asarray(scores)[alive], rest)
    return w


# ---------------------------------------------------------------------------------------------------- statistics


def paired_stats(rows: list[dict], chosen: str, comparators: list[str], key: str = "target_acc") -> list[dict]:
    """Per comparator: mean and std over seeds of both, and the paired per-seed difference chosen - comparator
    with its standard error std(d) / sqrt(n) (seeds both ran)."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r[key]
    out = []
    for comp in comparators:
        seeds = sorted(set(by.get(chosen, {})) & set(by.get(comp, {})))
        if not seeds:
            continue
        d = np.array([by[chosen][s] - by[comp][s] for s in seeds])
        a = np.array([by[comp][s] for s in seeds])
        c = np.array([by[chosen][s] for s in seeds])
        out.append({"comparator": comp, "metric": key, "seeds": seeds,
                    "chosen_mean": float(c.mean()), "chosen_std": float(c.std(ddof=1)) if len(c) > 1 else 0.0,
                    "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                    "diff": float(d.mean()),
                    "diff_se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")})
    return out


# ---------------------------------------------------------------------------------------------------- round 2


def round_context(ctx, model, fc, make_rollouts):
    """A context for a second round: rollouts and features recomputed from `model` (not cached).
    make_rollouts: refine_eval.make_rollouts (passed in: this module never imports the script)."""
    new = {**ctx, "model": model, "scorers": dict(ctx["scorers"])}
    _, rollouts = make_rollouts(ctx["cfg"], model, ctx["tok"], ctx["chat"], ctx["splits"])
    roll_ex = [ctx["chat"].encode_rollout(r["prompt_ids"], r["completion_ids"], id=f"r{i}")
               for i, r in enumerate(rollouts)]
    feats = dict(ctx["feats"])
    feats["pool"], feats["pool_norm"], feats["pool_loss"], _ = rl.featurize(model, ctx["pool_ex"], feature_config=fc)
    feats["roll"], _, _, _ = rl.featurize(model, roll_ex, feature_config=fc)
    for style, key in REFERENCE_KEYS.items():
        feats[key], _, _, _ = rl.featurize(model, reference_examples(ctx["chat"], ctx["splits"].queries, style),
                                           feature_config=fc)
    new.update(rollouts=rollouts, feats=feats, adaptive={"rows": [], "info": {}, "feats": feats["roll"][:0]})
    return new


_ROUND_JOB: dict = {}  # what the forked workers of second_round read (set before the pool forks)


def _two_rounds(job) -> dict:
    seed, name = job
    ctx, methods, select, method_scores, continue_sft, make_rollouts = (
        _ROUND_JOB[k] for k in ("ctx", "methods", "select", "method_scores", "continue_sft", "make_rollouts"))
    scorer, selection, _ = methods[name]
    w1 = select(ctx, method_scores(ctx, scorer, seed, {}), selection)
    acc1, model1 = continue_sft(ctx, w1, seed, return_model=True)
    ctx2 = round_context(ctx, model1, ctx["fc"], make_rollouts)
    w2 = select(ctx2, method_scores(ctx2, scorer, seed, {}), selection)
    acc2, _ = continue_sft(ctx2, w2, seed + 1000, return_model=True)
    labels = [r["corruption"] for r in ctx["splits"].pool]
    kinds = ["clean"] + sorted(set(labels) - {"clean"})
    logger.info("%s, 2 rounds, seed %d: target %.3f (round 1 %.3f)", name, seed, acc2["target_acc"],
                acc1["target_acc"])
    return {"method": f"{name}, 2 rounds", "seed": seed, **acc2,
            "corrupted_share": 1.0 - rl.kept_shares(w2, labels, ["clean"])["clean"],
            "kept_shares": rl.kept_shares(w2, labels, kinds),
            "round1": {k: acc1[k] for k in acc1 if k.endswith("acc")},
            "rows_kept": int((w2 > 0).sum()), "overlap_rounds": float(
                np.sum((w1 > 0) & (w2 > 0)) / max(1, np.sum(w1 > 0)))}


def second_round(ctx, methods: dict, names: list[str], seeds, select, method_scores, continue_sft,
                 make_rollouts, workers: int = 1) -> list[dict]:
    """Two rounds per method: select on the base, continue SFT; rescore with the round-1 model (new rollouts for
    DRIFT), select again, continue SFT from the round-1 model with the same steps. Rows: method 'NAME, 2 rounds', in
    (seed, name) order. workers > 1: the (seed, method) pairs run in forked processes (each pair is seeded by its own
    seed, so the rows do not depend on workers)."""
    _ROUND_JOB.update(ctx=ctx, methods=methods, select=select, method_scores=method_scores,
                      continue_sft=continue_sft, make_rollouts=make_rollouts)
    jobs = [(seed, name) for seed in seeds for name in names]
    try:
        if workers <= 1 or len(jobs) <= 1:
            return [_two_rounds(job) for job in jobs]
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_two_rounds, jobs, chunksize=1)
    finally:
        _ROUND_JOB.clear()
