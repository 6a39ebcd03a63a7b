"""Benchmark v4 (issue 25): continued SFT of a real pretrained model (SmolLM2-135M-Instruct) on data chosen by each
method, with v3's protocol (the dev split chooses DRIFT's setting, the test split reports, paired seeds).

    python benchmarks/refine_real.py --quick           # smoke run (tests/test_real_model.py runs it)
    python benchmarks/refine_real.py                   # the CPU scale (about an hour on a shared 2-core machine)
    python benchmarks/refine_real.py --device cuda     # the GPU scale: more rows, rollouts, steps and seeds

Stages (each timed, each cached under --workdir so a stopped run resumes): data (drift_stream/embedded/real_tasks.py:
target basic_arithmetic one-digit, non-target chain_sum one-digit and gcd <= 20, a pool with 40% corruption in the
model's ChatML format) -> warm-up (a short SFT of SmolLM2 on the clean warm-up split, so it writes `Answer: x`: the
base, DESIGN.md 7) -> rollouts (K per validation query at T = 1.0, the model's generation config setting no
temperature, and at 0.7, the sweep's) -> features once (the library's GradientFeaturizer over the last N blocks: pool
rows, rollouts, references in another author's prose) -> scores of every method -> continued full fine-tuning of the
whole model on each method's top 25% (same steps, batch and optimiser for all) per seed -> greedy accuracy with the
model's own template on held-out target and non-target items (test and dev; every run is saved as it ends).
Writes results.{json,md,png} into --out (default benchmarks/results/real/, or .../real/quick/).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_report
import refine_lib as rl
from refine_v3 import paired_stats

logger = logging.getLogger("refine_real")
REPO = Path(__file__).resolve().parents[1]
NONTARGET_SLACK = 0.02


@dataclass(frozen=True)
class RealBenchConfig:
    model: str = "smollm2"
    device: str = "cpu"
    data_seed: int = 0
    pool_size: int = 600  # rows of the pool refined (real_tasks draws them; 40% corrupted)
    warmup_size: int = 96
    queries: int = 48  # validation queries (target task)
    test_target: int = 76
    test_nontarget: int = 40  # per non-target task
    dev_target: int = 40
    dev_nontarget: int = 24
    max_tokens: int = 160
    warmup_steps: int = 12
    batch_size: int = 8
    lr: float = 1e-4
    num_rollouts: int = 4
    temperatures: tuple = (1.0, 0.7)
    rollout_max_new_tokens: int = 32
    proj_dim: int = 16
    last_n_blocks: int | None = 4  # of 30: 0.49 s/row against 1.05 s/row for every block (measured here)
    fisher_rows: int = 600
    sft_steps: int = 8  # x 8 rows: 11 s per step on one loaded thread here
    sft_lr: float = 5e-5  # continued SFT (the warm-up uses lr); 2e-4 hurt even clean rows (results/real/sft_lr_probe.md)
    fraction: float = 0.25
    eval_max_new_tokens: int = 24
    seeds: tuple = (0, 1, 2)
    methods: tuple = ()  # empty: every method of METHODS but those in CUDA_ONLY (CPU) / QUICK_METHODS (quick)
    quick: bool = False

    def key(self) -> str:
        """Hash of what decides the data, the warmed base, rollouts and features (not the SFT or the methods)."""
        skip = ("sft_steps", "sft_lr", "fraction", "seeds", "eval_max_new_tokens", "methods")
        fields = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


CPU = RealBenchConfig()
QUICK = replace(CPU, pool_size=40, warmup_size=16, queries=8, test_target=8, test_nontarget=4, dev_target=6,
                dev_nontarget=3, warmup_steps=2, batch_size=4, num_rollouts=2, rollout_max_new_tokens=16,
                fisher_rows=40, sft_steps=1, eval_max_new_tokens=12, seeds=(0,), quick=True)
CUDA = replace(CPU, device="cuda", pool_size=3000, warmup_size=400, queries=64, test_target=76, test_nontarget=40,
               dev_target=40, dev_nontarget=24, warmup_steps=50, batch_size=16, num_rollouts=8,
               rollout_max_new_tokens=48, last_n_blocks=None, fisher_rows=1000, sft_steps=60, sft_lr=1e-4,
               seeds=(0, 1, 2, 3, 4))

# DRIFT settings: name -> (rollout temperature, change to the library defaults: sign, block Fisher, beta 1)
MAIN = rl.DriftVariant(preconditioner="block")
DRIFT = {
    "drift": (1.0, {}),  # the library's default: sign, T = 1.0
    "drift_advantage": (1.0, {"signing": "advantage"}),
    "drift_learn": (1.0, {"query_weighting": "learnability"}),  # all-right / all-wrong queries weigh 0
    "drift_t0.7": (0.7, {}),
    "drift_t0.7_advantage": (0.7, {"signing": "advantage"}),
}
# DRIFT after the library's loss prefilter (`refine --prefilter LOSS_RUN 1-P`, refine/chain.py): rows outside the
# lowest-loss share P rank last; the DRIFT score ranks the rest. name -> (DRIFT scorer, P)
PREFILTERED = {"drift_advantage_pf0.5": ("drift_advantage", 0.5), "drift_advantage_pf0.8": ("drift_advantage", 0.8)}
OFF_POLICY = {"less_prose": {"targets": "off-policy", "beta": 1.0, "references": "prose"},
              "if_prose": {"targets": "off-policy", "beta": 0.0, "references": "prose"}}
# name -> (scorer, selection, group)
METHODS = {
    "zero-shot SmolLM2 (no warm-up)": ("zero_shot", "none", "reference"),
    "warmed base (no continued SFT)": ("base", "none", "reference"),
    "full": ("none", "all", "baseline"),
    "random": ("random", "top", "baseline"),
    "loss": ("loss", "top", "baseline"),
    "ifd": ("ifd", "top", "baseline"),
    "less prose-refs": ("less_prose", "top", "baseline"),
    "if prose-refs": ("if_prose", "top", "baseline"),
    "length (longest)": ("length", "top", "baseline"),
    "rds+ (embedding cosine)": ("rds", "top", "baseline"),
    "drift default (sign, T=1.0)": ("drift", "top", "drift"),
    "drift advantage": ("drift_advantage", "top", "drift"),
    "drift learnability": ("drift_learn", "top", "drift"),
    "drift T=0.7": ("drift_t0.7", "top", "drift"),
    "drift T=0.7 advantage": ("drift_t0.7_advantage", "top", "drift"),
    "drift advantage after loss prefilter 50%": ("drift_advantage_pf0.5", "top", "drift"),
    "drift advantage after loss prefilter 80%": ("drift_advantage_pf0.8", "top", "drift"),
}
CUDA_ONLY = ("drift T=0.7 advantage",)  # left out of the CPU scale to fit its hour
QUICK_METHODS = ("warmed base (no continued SFT)", "full", "loss", "less prose-refs", "rds+ (embedding cosine)",
                 "drift default (sign, T=1.0)", "drift advantage")
ABLATIONS = {"ablation off-policy": {"targets": "off-policy", "references": "prose", "query_weighting": "uniform",
                                     "no_contrast": "keep", "max_rollouts": None},
             "ablation unsigned": {"signing": "positive"},
             "ablation beta=0": {"beta": 0.0}}


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# ---------------------------------------------------------------------------------------------------- cache


def make_data(cfg: RealBenchConfig):
    from drift_stream.embedded.real_tasks import (
        NONTARGET,
        TARGET,
        RealTaskRecipe,
        make_real_splits,
    )

    recipe = RealTaskRecipe(seed=cfg.data_seed, pool_size=cfg.pool_size, warmup_size=cfg.warmup_size,
                            queries=cfg.queries,
                            dev={**{t: cfg.dev_target for t in TARGET}, **{t: cfg.dev_nontarget for t in NONTARGET}},
                            test={**{t: cfg.test_target for t in TARGET},
                                  **{t: cfg.test_nontarget for t in NONTARGET}})
    return make_real_splits(recipe)


def evaluate(model, tok, cfg: RealBenchConfig, splits, dev: bool = True) -> dict:
    """Greedy accuracy (numeric verifier) on test (and dev); target / non-target means, strict `Answer:` rates."""
    from drift_stream.embedded.real_tasks import TARGET, score_response, strict_correct
    from drift_stream.embedded.training import greedy_accuracy

    out = {}
    for split, prefix in (("test", ""), ("dev", "dev_"))[: 2 if dev else 1]:
        rows = getattr(splits, split)
        acc = greedy_accuracy(model, tok, rows, score_fn=score_response, max_new_tokens=cfg.eval_max_new_tokens,
                              batch_size=64)
        tgt = [r for r in acc.records if r["task"] in TARGET]
        non = [r for r in acc.records if r["task"] not in TARGET]
        # equal sizes per non-target task, so the mean over records is the mean over tasks
        out[f"{prefix}target_acc"] = float(np.mean([r["correct"] for r in tgt]))
        out[f"{prefix}nontarget_acc"] = float(np.mean([r["correct"] for r in non]))
        strict = [strict_correct(r["response"], q) for r, q in zip(acc.records, rows)]
        out[f"{prefix}target_strict"] = float(np.mean([s for s, q in zip(strict, rows) if q["task"] in TARGET]))
        out[f"{prefix}per_task"] = acc.per_task
        if split == "test":
            out["examples"] = [r["response"] for r in acc.records[:3]]
    return out


def build_cache(cfg: RealBenchConfig, workdir: Path, timer: Timer) -> dict:
    import torch

    from drift_stream.data.example_types import Example
    from drift_stream.data.tokenization import ChatTokenizer
    from drift_stream.embedded.real_models import prepare_model
    from drift_stream.embedded.real_tasks import score_response
    from drift_stream.embedded.training import encode_rows, train_sft
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.model.loading import load_model, load_tokenizer
    from drift_stream.rollouts.engine import Query, RolloutConfig, generate_rollouts

    t = time.perf_counter()
    splits = make_data(cfg)
    src = str(prepare_model(cfg.model))
    data_sha = hashlib.sha256(json.dumps([splits.pool, splits.warmup, splits.queries, splits.dev, splits.test],
                                         sort_keys=True).encode()).hexdigest()[:8]
    cache = workdir / f"{cfg.key()}-{data_sha}"
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    timer.add("data", time.perf_counter() - t)
    tok = load_tokenizer(src)
    base_dir = cache / "base"
    t = time.perf_counter()
    built = set()  # the stages this process computes (their times go to stage_times.json; cached ones are read)
    if not (base_dir / "base_eval.json").exists():  # zero-shot eval, warm-up SFT, warmed eval
        built.add("warmup")
        model = load_model(src, device=cfg.device)
        zero = evaluate(model, tok, cfg, splits)
        model.train()
        res = train_sft(model, tok, splits.warmup, steps=cfg.warmup_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        seed=cfg.data_seed, warmup_steps=min(2, cfg.warmup_steps), max_tokens=cfg.max_tokens,
                        log_every=0)
        model.eval()
        warmed = evaluate(model, tok, cfg, splits)
        model.save_pretrained(str(base_dir))
        tok.save_pretrained(str(base_dir))
        (base_dir / "base_eval.json").write_text(json.dumps({"zero_shot": zero, "warmed": warmed,
                                                            "warmup_losses": res.losses, "warmup_s": res.wall_s}))
        logger.info("zero-shot target %.3f non-target %.3f -> warmed %.3f / %.3f (strict %.3f -> %.3f)",
                    zero["target_acc"], zero["nontarget_acc"], warmed["target_acc"], warmed["nontarget_acc"],
                    zero["target_strict"], warmed["target_strict"])
    model = load_model(str(base_dir), device=cfg.device)
    base_eval = json.loads((base_dir / "base_eval.json").read_text())
    timer.add("warmup", time.perf_counter() - t)
    chat = ChatTokenizer(tok, max_tokens=cfg.max_tokens)

    t = time.perf_counter()
    rollouts = {}
    for temp in cfg.temperatures:
        path = cache / f"rollouts_T{temp}.json"
        if not path.exists():
            built.add("rollouts")
            qs = [Query(id=q["id"], messages=({"role": "user", "content": q["question"]},), answer=q["answer"],
                        task=q["task"]) for q in splits.queries]
            out = generate_rollouts(model, tok, chat, qs, RolloutConfig(
                num_rollouts=cfg.num_rollouts, temperature=temp, max_new_tokens=cfg.rollout_max_new_tokens,
                seed=cfg.data_seed, batch_size=64), progress=False)
            by_id = {q["id"]: (i, q) for i, q in enumerate(splits.queries)}
            rows = [{"query": by_id[r.query_id][0], "index": r.rollout_index, "prompt_ids": list(r.prompt_ids),
                     "completion_ids": list(r.completion_ids), "completion": r.completion,
                     "reward": score_response(r.completion, by_id[r.query_id][1])} for r in out]
            path.write_text(json.dumps(rows))
        rollouts[temp] = json.loads(path.read_text())
        logger.info("rollouts T=%s: pass rate %.3f", temp, np.mean([r["reward"] for r in rollouts[temp]]))
    timer.add("rollouts", time.perf_counter() - t)

    t = time.perf_counter()
    fc = FeatureConfig(proj_dim_in=cfg.proj_dim, proj_dim_out=cfg.proj_dim, seed=0, last_n_blocks=cfg.last_n_blocks)
    pool_ex = encode_rows(tok, splits.pool, max_tokens=cfg.max_tokens)
    feats = {}
    path = cache / "features_pool.npz"
    if not path.exists():
        built.add("features")
        ref_ex = [chat.encode(Example(id=q["id"], messages=({"role": "user", "content": q["question"]},
                                                            {"role": "assistant", "content": q["reference_prose"]})))
                  for q in splits.queries]
        qf, _, _, _ = rl.featurize(model, ref_ex, feature_config=fc, batch_size=16)
        pf, pn, pl_, feat = rl.featurize(model, pool_ex, feature_config=fc, batch_size=16)
        np.savez(path, pool=pf, pool_norm=pn, pool_loss=pl_, ref_prose=qf, block_sizes=np.array(feat.block_sizes))
    feats.update({k: v for k, v in np.load(path).items()})
    for temp in cfg.temperatures:
        path = cache / f"features_roll_T{temp}.npz"
        if not path.exists():
            built.add("features")
            ex = [chat.encode_rollout(r["prompt_ids"], r["completion_ids"], id=f"r{i}")
                  for i, r in enumerate(rollouts[temp])]
            rf, _, _, _ = rl.featurize(model, ex, feature_config=fc, batch_size=16)
            np.save(path.with_suffix(".npy"), rf)
            np.savez(path, roll=rf)
        feats[f"roll_T{temp}"] = np.load(path)["roll"]
    timer.add("features", time.perf_counter() - t)

    t = time.perf_counter()
    path = cache / "scores_other.npz"
    if not path.exists():
        built.add("other_scores")
        ifd = library_scores(model, tok, cfg, splits.pool, "ifd")
        pool_emb = embeddings(model, [e.input_ids for e in pool_ex], tok.pad_token_id or 0)
        query_emb = embeddings(model, [chat.encode_prompt([{"role": "user", "content": q["question"]}])
                                       for q in splits.queries], tok.pad_token_id or 0)
        np.savez(path, ifd=ifd, pool_emb=pool_emb, query_emb=query_emb)
    feats.update({k: v for k, v in np.load(path).items()})
    timer.add("other_scores", time.perf_counter() - t)
    times_path = cache / "stage_times.json"
    stage_times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if built:
        stage_times.update({k: timer.stages[k] for k in built})
        times_path.write_text(json.dumps(stage_times))
    torch.manual_seed(0)
    return {"cfg": cfg, "cache": cache, "splits": splits, "tok": tok, "model": model, "pool_ex": pool_ex,
            "rollouts": rollouts, "feats": feats, "base_eval": base_eval, "fc": fc, "stage_times": stage_times}


def library_scores(model, tok, cfg, pool, name: str) -> np.ndarray:
    """loss / ifd / random through the library's scorers on an in-memory Arrow table of the pool."""
    import pyarrow as pa

    from drift_stream.scoring.build import build_scorer

    scorer = build_scorer(name, model=None, tokenizer=tok, model_obj=model, max_tokens=cfg.max_tokens,
                          batch_size=16, device=cfg.device)
    out = scorer(pa.Table.from_pylist([{"id": r["id"], "messages": r["messages"]} for r in pool]))
    reasons = [x for x in out.column("drift_reject_reason").to_pylist() if x]
    if reasons:
        raise RuntimeError(f"{name} rejected pool rows: {reasons[:5]}")
    return np.array(out.column("drift_score").to_pylist(), dtype=np.float64)


def embeddings(model, sequences, pad_id: int, batch_size: int = 32) -> np.ndarray:
    """RDS+: the mean over tokens of the last hidden state [n, H] (float32), input order."""
    import torch

    device = next(model.parameters()).device
    out = np.zeros((len(sequences), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for lo in range(0, len(sequences), batch_size):
            part = sequences[lo: lo + batch_size]
            width = max(len(s) for s in part)
            ids = torch.full((len(part), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, s in enumerate(part):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True).hidden_states[-1].float()  # [B, T, H]
            m = mask.to(device).unsqueeze(-1).float()
            out[lo: lo + len(part)] = ((hidden * m).sum(1) / m.sum(1)).cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------------- scores


def drift_variant(ctx, scorer: str) -> tuple[float, rl.DriftVariant]:
    if scorer in OFF_POLICY:
        return 1.0, replace(MAIN, **OFF_POLICY[scorer])
    temp, change = ctx["variants"][scorer]
    return temp, replace(MAIN, **change)


def variant_scores(ctx, scorer: str):
    """(S [n], per-query scores [n, m'], kept query positions [m'], query weights or None, temperature); a
    prefiltered scorer gives its DRIFT scorer's (the prefilter is not per query)."""
    from drift_stream.bank.contrast import query_weights

    scorer = ctx["prefiltered"].get(scorer, (scorer, None))[0]
    temp, variant = drift_variant(ctx, scorer)
    f, rows = ctx["feats"], ctx["rollouts"][temp]
    g, kept, pass_rate = rl.query_targets(
        variant, f[f"roll_T{temp}"], np.array([r["query"] for r in rows]), np.array([r["index"] for r in rows]),
        np.array([r["reward"] for r in rows], dtype=np.float64), f["ref_prose"])
    n = len(f["pool"])
    if len(g) == 0:
        logger.warning("%s: no validation query has a signal; all scores are 0", scorer)
        return np.zeros(n), np.zeros((n, 0)), kept, None, temp
    weights = None if variant.query_weighting == "uniform" else query_weights(pass_rate, variant.query_weighting)
    if weights is not None and not weights.sum() > 0:
        return np.zeros(n), np.zeros((n, len(g))), kept, weights, temp
    pre = rl.fit_preconditioner(variant.preconditioner, f["pool"][: ctx["cfg"].fisher_rows],
                                [int(b) for b in f["block_sizes"]], variant.damping)
    score, per_query = rl.drift_scores(variant, f["pool"], f["pool_norm"], g, pre, weights=weights)
    return score, per_query, kept, weights, temp


def method_scores(ctx, scorer: str, seed: int) -> np.ndarray:
    key = (scorer, seed if scorer == "random" else None)
    cached = ctx.setdefault("scores", {})
    if key in cached:
        return cached[key]
    f, pool = ctx["feats"], ctx["splits"].pool
    if scorer in ("none", "base", "zero_shot"):
        s = np.zeros(len(pool))
    elif scorer == "random":
        s = np.random.default_rng(1000 + seed).random(len(pool))
    elif scorer == "loss":
        s = -f["pool_loss"].astype(np.float64)  # the library's per-example loss (the featurizer's), lower first
    elif scorer == "ifd":
        s = f["ifd"]
    elif scorer == "length":
        s = np.array([sum(e.loss_mask) for e in ctx["pool_ex"]], dtype=np.float64)
    elif scorer in ctx["prefiltered"]:
        base, share = ctx["prefiltered"][scorer]
        s = prefiltered(method_scores(ctx, base, seed), f["pool_loss"].astype(np.float64), share)
    elif scorer == "rds":
        p = f["pool_emb"] / np.linalg.norm(f["pool_emb"], axis=1, keepdims=True)
        q = f["query_emb"] / np.linalg.norm(f["query_emb"], axis=1, keepdims=True)
        s = (p.astype(np.float64) @ q.T.astype(np.float64)).mean(axis=1)
    else:
        s = variant_scores(ctx, scorer)[0]
    cached[key] = s
    return s


def prefiltered(score: np.ndarray, loss: np.ndarray, share: float) -> np.ndarray:
    """Rank order of `score` among the rows whose loss is in the lowest `share` (ties by position), every other row
    below them in order of loss: the order `refine --prefilter LOSS_RUN 1-share` then `--policy top` gives (ties
    here by position, there by id)."""
    n = len(score)
    by_loss = np.argsort(loss, kind="stable")
    kept = np.zeros(n, dtype=bool)
    kept[by_loss[: round(share * n)]] = True
    out = np.empty(n)
    out[by_loss] = -(n + 1.0 + np.arange(n))  # dropped rows: -n-1 (lowest loss) .. -2n
    order = np.argsort(score[kept], kind="stable")
    ranks = np.empty(int(kept.sum()))
    ranks[order] = np.arange(int(kept.sum()), dtype=np.float64)
    out[kept] = ranks
    return out


def query_outcomes(rows, m: int) -> np.ndarray:
    q = np.array([x["query"] for x in rows])
    ok = np.array([x["reward"] >= 1.0 for x in rows], dtype=np.float64)
    n_ok, n = np.bincount(q, weights=ok, minlength=m), np.bincount(q, minlength=m)
    return np.where(n_ok == 0, "all_wrong", np.where(n_ok == n, "all_right", "mixed"))


def diagnostics(ctx, scorers) -> dict:
    """ROC-AUC clean vs corrupted (all, per kind), Spearman with grad norm / length; for DRIFT scorers the AUC of
    the contributions of all-wrong / all-right / mixed queries (v3's definition)."""
    pool = ctx["splits"].pool
    clean = np.array([r["kind"] == "clean" for r in pool])
    labels = np.array([r["kind"] for r in pool])
    ntok = np.array([sum(e.loss_mask) for e in ctx["pool_ex"]])
    out = {}
    for scorer in scorers:
        if scorer in ("none", "base", "zero_shot", "random"):
            continue
        s = method_scores(ctx, scorer, 0)
        d = dict(rl.score_diagnostics(s, clean, ctx["feats"]["pool_norm"], ntok))
        for kind in sorted(set(labels) - {"clean"}):
            sel = clean | (labels == kind)
            d[f"auc_{kind}"] = rl.roc_auc(s[sel], clean[sel])
        target_rows = np.array([r["task"] == "arith1" for r in pool])
        d["auc_target_rows"] = rl.roc_auc(s[target_rows], clean[target_rows])
        if scorer in ctx["variants"] or scorer in OFF_POLICY:
            _, per_query, kept, weights, temp = variant_scores(ctx, scorer)
            groups = query_outcomes(ctx["rollouts"][temp], len(ctx["splits"].queries))[kept]
            for name in ("all_wrong", "all_right", "mixed"):
                sel = groups == name
                d[f"queries_{name}"] = int(sel.sum())
                w = np.ones(int(sel.sum())) if weights is None else weights[sel]
                ok = sel.sum() > 0 and per_query.shape[1] > 0 and w.sum() > 0
                d[f"auc_{name}"] = rl.roc_auc(per_query[:, sel] @ w / w.sum(), clean) if ok else float("nan")
        out[scorer] = d
    return out


def select(ctx, scores, selection: str) -> np.ndarray:
    pool = ctx["splits"].pool
    if selection in ("all", "none"):
        return np.ones(len(pool))
    return rl.top_mask(scores, ctx["cfg"].fraction, [r["id"] for r in pool]).astype(float)


# ---------------------------------------------------------------------------------------------------- SFT


def continue_sft(ctx, weights, seed: int, dev: bool = True) -> dict:
    from drift_stream.embedded.training import train_sft

    cfg = ctx["cfg"]
    model = copy.deepcopy(ctx["model"])
    model.train()
    res = train_sft(model, ctx["tok"], ctx["pool_ex"], weights=list(weights), steps=cfg.sft_steps,
                    batch_size=cfg.batch_size, lr=cfg.sft_lr, seed=seed, warmup_steps=min(2, cfg.sft_steps),
                    max_tokens=cfg.max_tokens, log_every=0)
    model.eval()
    return {**evaluate(model, ctx["tok"], cfg, ctx["splits"], dev=dev), "sft_losses": res.losses}


_CTX: dict = {}


def _job(job):
    import torch

    torch.set_num_threads(1)
    name, seed, weights, dev = job
    t = time.perf_counter()
    acc = continue_sft(_CTX["ctx"], weights, seed, dev)
    return name, seed, acc, time.perf_counter() - t


def run_jobs(ctx, jobs: list, workers: int):
    """Yield (name, seed, accuracies, wall s) per job as it finishes; workers > 1: forked 1-thread processes."""
    if workers <= 1 or len(jobs) <= 1:
        _CTX["ctx"] = ctx
        for job in jobs:
            yield _job(job)
        return
    import multiprocessing

    _CTX["ctx"] = ctx
    with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_job, jobs)


def choose_best(rows: list[dict], methods: dict) -> dict:
    """v3's rule: the best mean dev target accuracy among DRIFT candidates whose mean dev non-target accuracy is
    within NONTARGET_SLACK of the full pool's (all candidates if none is)."""
    def dev_mean(name, key):
        vals = [r[key] for r in rows if r["method"] == name and key in r]
        return float(np.mean(vals)) if vals else float("nan")

    cands = {n: {"dev_target": dev_mean(n, "dev_target_acc"), "dev_nontarget": dev_mean(n, "dev_nontarget_acc")}
             for n, (_, _, g) in methods.items() if g == "drift"}
    full = dev_mean("full", "dev_nontarget_acc")
    eligible = [n for n, c in cands.items() if not np.isfinite(full) or c["dev_nontarget"] >= full - NONTARGET_SLACK]
    pool = eligible or list(cands)
    chosen = max(pool, key=lambda n: (cands[n]["dev_target"], cands[n]["dev_nontarget"])) if pool else None
    return {"rule": f"max mean dev target accuracy among DRIFT candidates with dev non-target >= full pool's - "
                    f"{NONTARGET_SLACK}", "full_dev_nontarget": full, "candidates": cands, "eligible": eligible,
            "chosen": chosen}


# ---------------------------------------------------------------------------------------------------- main


def run(cfg: RealBenchConfig, workdir: Path, out: Path, mode: str, workers: int, methods_subset=None) -> dict:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    timer = Timer()
    ctx = build_cache(cfg, workdir, timer)
    ctx["variants"] = dict(DRIFT)
    ctx["prefiltered"] = dict(PREFILTERED)
    pool = ctx["splits"].pool
    labels = [r["kind"] for r in pool]
    kinds = ["clean"] + sorted(set(labels) - {"clean"})
    names = methods_subset or cfg.methods or (
        QUICK_METHODS if cfg.quick else tuple(m for m in METHODS if cfg.device == "cuda" or m not in CUDA_ONLY))
    methods = {n: METHODS[n] for n in names}
    t = time.perf_counter()
    diag = diagnostics(ctx, sorted({s for s, _, _ in methods.values()} | set(OFF_POLICY)))
    timer.add("scores", time.perf_counter() - t)
    rows: list[dict] = []
    choice: dict = {}
    statistics: dict = {}
    done_dir = ctx["cache"] / "runs"

    def assemble(label: str) -> dict:
        return {"mode": label, "config": asdict(cfg), "rows": rows, "choice": choice, "statistics": statistics,
                "methods": {k: {"scorer": s, "selection": sel, "group": g} for k, (s, sel, g) in methods.items()},
                "base": ctx["base_eval"], "diagnostics": diag, "corruption_kinds": kinds,
                "pool_shares": rl.kept_shares(np.ones(len(pool)), labels, kinds),
                "rollouts": {str(T): {"pass_rate": float(np.mean([r["reward"] for r in rs])),
                                      "query_outcomes": {str(k): int(v) for k, v in zip(*np.unique(
                                          query_outcomes(rs, len(ctx["splits"].queries)), return_counts=True))},
                                      "truncated": float(np.mean([len(r["completion_ids"]) >= cfg.rollout_max_new_tokens
                                                                  for r in rs]))}
                             for T, rs in ctx["rollouts"].items()},
                "questions": ctx["splits"].questions, "wall_s": {**timer.stages,
                                                                 "total": time.perf_counter() - t0},
                "stage_times": ctx["stage_times"], "cache": str(ctx["cache"]), "sweep": "benchmarks/results/real/sweep.md",
                "machine": f"{platform.machine()}, 1 torch thread x {workers} worker(s), {os.cpu_count()} cores, "
                           f"device {cfg.device}", "versions": real_report.versions()}

    def record(name, seed, acc, wall, weights):
        row = {"method": name, "seed": seed, **acc, "rows_kept": int((weights > 0).sum()),
               "corrupted_share": 1.0 - rl.kept_shares(weights, labels, ["clean"])["clean"],
               "target_rows_share": float(np.mean([pool[i]["task"] == "arith1" for i in np.flatnonzero(weights)])),
               "kept_shares": rl.kept_shares(weights, labels, kinds), "wall_s": wall}
        rows.append(row)
        logger.info("%-34s seed %d: target %.3f non-target %.3f | dev %.3f / %.3f (%.0fs)", name, seed,
                    row["target_acc"], row["nontarget_acc"], row.get("dev_target_acc", math.nan),
                    row.get("dev_nontarget_acc", math.nan), wall)
        real_report.write_outputs(out, assemble(f"{mode}, partial: {len(rows)} runs"))

    known: dict = {}  # (seed, selection hash) -> saved run: the same rows and seed train the same model

    def run_methods(batch: dict) -> None:
        todo, followers = [], {}
        for seed in cfg.seeds:  # seed-major: a stopped run has every method on the first seeds
            for name, (scorer, selection, group) in batch.items():
                weights = select(ctx, method_scores(ctx, scorer, seed), selection)
                if scorer in ("base", "zero_shot"):  # greedy and deterministic: the same on every seed
                    ev = ctx["base_eval"]["warmed" if scorer == "base" else "zero_shot"]
                    record(name, seed, {**ev, "deterministic": True}, 0.0, weights)
                    continue
                path = done_dir / f"{_slug(name)}-s{seed}-{cfg.sft_steps}-{cfg.sft_lr}-{cfg.fraction}.json"
                need_dev = group != "baseline" or name == "full"  # dev only where the choice reads it
                key = (seed, hashlib.sha1(np.asarray(weights, dtype=np.float64).tobytes()).hexdigest())
                if not path.exists() and key in known and ("dev_target_acc" in known[key]["acc"] or not need_dev):
                    path.write_text(json.dumps({**known[key], "same_selection_as": known[key]["method"]}))
                if path.exists():
                    saved = json.loads(path.read_text())
                    known.setdefault(key, {**saved, "method": saved.get("same_selection_as", name)})
                    record(name, seed, saved["acc"], saved["wall_s"], weights)
                else:  # a selection already waiting (with dev where this one needs it) is trained once, below
                    job = (name, seed, weights, path, need_dev)
                    lead = next((k for k in (key + (True,), key + (need_dev,)) if k in followers), None)
                    if lead is not None and (lead[-1] or not need_dev):
                        followers[lead].append(job)
                    else:
                        followers[key + (need_dev,)] = [job]
                        todo.append(job)
        by_job = {(n, s): k for k, runs in followers.items() for n, s, _, _, _ in runs[:1]}
        t = time.perf_counter()
        for name, seed, acc, wall in run_jobs(ctx, [(n, s, w, d) for n, s, w, _, d in todo], workers):
            runs = followers[by_job[(name, seed)]]
            for i, (n, s, w, path, _) in enumerate(runs):
                extra = {"same_selection_as": name} if i else {}
                path.write_text(json.dumps({"acc": acc, "wall_s": wall, **extra}))
                record(n, s, acc, wall, w)
        timer.add("continued_sft", time.perf_counter() - t)

    run_methods(methods)
    if any(g == "drift" for _, _, g in methods.values()):
        choice.update(choose_best(rows, methods))
        logger.info("DRIFT setting chosen on dev: %s", choice["chosen"])
        scorer, selection, _ = methods[choice["chosen"]]
        base, share = ctx["prefiltered"].get(scorer, (scorer, None))
        temp, change = ctx["variants"][base]
        ablations = {}
        for name, extra in ABLATIONS.items():
            key = f"{base}|{name}"
            ctx["variants"][key] = (temp, {**change, **extra})
            if share is not None:  # the ablation keeps the chosen setting's prefilter
                ctx["prefiltered"][f"{scorer}|{name}"] = (key, share)
                key = f"{scorer}|{name}"
            ablations[name] = (key, selection, "ablation")
        methods.update(ablations)
        diag.update(diagnostics(ctx, [s for s, _, _ in ablations.values()]))
        run_methods(ablations)
        others = [m for m in methods if m != choice["chosen"]]
        statistics.update({"seeds": list(cfg.seeds), "chosen": choice["chosen"],
                           "target": paired_stats(rows, choice["chosen"], others, "target_acc"),
                           "nontarget": paired_stats(rows, choice["chosen"], others, "nontarget_acc")})
    return assemble(mode)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one seed, a few methods")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: the GPU scale (CUDA config: 3,000-row pool, K = 8, 60 steps, 5 seeds)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/refine_real_cache"),
                        help="cache of the warmed base, rollouts, features and finished runs (a rerun resumes)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="continued-SFT runs in parallel (forked, one torch thread each; CPU only)")
    parser.add_argument("--sft-lr", type=float, default=None, help="continued-SFT learning rate (config's default)")
    parser.add_argument("--sft-steps", type=int, default=None, help="continued-SFT steps (config's default)")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only re-render results.md / results.png from a results.json into --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = QUICK if args.quick else CUDA if args.device == "cuda" else CPU
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.sft_lr is not None:
        cfg = replace(cfg, sft_lr=args.sft_lr)
    if args.sft_steps is not None:
        cfg = replace(cfg, sft_steps=args.sft_steps)
    out = args.out or (REPO / "benchmarks" / "results" / "real" / ("quick" if args.quick else ""))
    if args.render is not None:
        real_report.write_outputs(out, json.loads(args.render.read_text()))
        return 0
    workers = 1 if cfg.device == "cuda" else args.workers
    mode = "quick" if args.quick else f"full ({cfg.device} scale)"
    result = run(cfg, args.workdir, out, mode, workers, tuple(args.methods) if args.methods else None)
    real_report.write_outputs(out, result)
    print(real_report.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
