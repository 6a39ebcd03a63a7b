"""Does DRIFT raise the ceiling? Continued SFT on data refined by each method, from one base, at tiny scale.

    python benchmarks/refine_eval.py                 # full run: 3 seeds, every method (see docs/benchmark.md)
    python benchmarks/refine_eval.py --quick         # smoke run for CI (a couple of minutes)

Stages (each timed): data (reasoning-gym pool with documented corruption, validation queries, test sets) -> base
(a tiny Llama trained on the pool: the "SFT checkpoint") -> rollouts (K per validation query, verified) -> features
(the library's GradientFeaturizer on pool rows, rollouts and reference answers) -> scores (every method) -> library
check (build_bank + build_scorer + run_score + refine_run on the main DRIFT setting must select the same rows) ->
continued SFT from the base on each method's selection, same steps and optimiser, per seed -> greedy accuracy.
Writes results.json, results.md and results.png into --out (default benchmarks/results/ or benchmarks/results/quick/).
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
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import refine_lib as rl  # noqa: E402
import refine_v3 as v3  # noqa: E402
from refine_checks import check_library_path, explore_variants  # noqa: E402
from refine_report import markdown, variants_markdown, versions, write_outputs  # noqa: E402
from refine_report import v3_markdown as v3_markdown_diag

logger = logging.getLogger("refine_eval")
REPO = Path(__file__).resolve().parents[1]
TARGET = ("basic_arithmetic", "chain_sum")
NONTARGET = ("gcd", "products", "leg_counting")


@dataclass(frozen=True)
class BenchConfig:
    data_seed: int = 0
    pool_size: int = 4000
    queries_per_task: int = 512  # validation queries per target task (AUC 0.81 at 256 in all, 0.85 at 1,024)
    test_target_per_task: int = 500
    test_nontarget_per_task: int = 100
    dev_target_per_task: int = 250  # dev: held-out queries that choose DRIFT's best setting (test is never looked at)
    dev_nontarget_per_task: int = 60
    # the base: TinyModelRecipe (the embedded default's recipe), trained on this pool
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_tokens: int = 320  # too_long rows reach 262 tokens with the chat template
    base_steps: int = 1400
    base_lr: float = 1e-3
    base_warmup: int = 100
    batch_size: int = 32
    num_rollouts: int = 4
    rollout_max_new_tokens: int = 64
    proj_dim: int = 16
    fisher_rows: int = 1000
    sft_steps: int = 100
    sft_lr: float = 3e-4
    eval_max_new_tokens: int = 64
    seeds: tuple = (0, 1, 2)
    fraction: float = 0.25  # top:P of the baselines, ablations and stratified DRIFT
    methods: tuple = ()  # empty: all of METHODS
    max_rollouts: int = 12  # adaptive K: rollouts per query without a contrast, at most (3 K)
    stat_seeds: tuple = (3, 4)  # extra seeds for the chosen setting and its closest comparators (5 in all)
    second_round: bool = False  # --second-round: two rounds of refine + continued SFT (chosen vs best baseline)
    base_model: str = ""  # --demo-base: the shipped tiny model as the base, on its own demo data (diagnostics only)

    def key(self) -> str:
        """Hash of everything that decides the base, rollouts and features (not the SFT or methods)."""
        fields = {k: v for k, v in asdict(self).items() if k not in (
            "sft_steps", "sft_lr", "seeds", "fraction", "methods", "eval_max_new_tokens", "max_rollouts",
            "stat_seeds", "second_round")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


QUICK = BenchConfig(pool_size=300, queries_per_task=8, test_target_per_task=10, test_nontarget_per_task=4,
                    dev_target_per_task=6, dev_nontarget_per_task=2,
                    hidden_size=32, num_layers=2, intermediate_size=64, base_steps=40, base_warmup=4, batch_size=16,
                    num_rollouts=2, rollout_max_new_tokens=32, fisher_rows=100, sft_steps=5,
                    eval_max_new_tokens=32, seeds=(0,), fraction=0.25, max_rollouts=4, stat_seeds=(1,))
# --small: dev-scale experiments on a shared machine (a 2,000-row pool, a base trained half as long, 512 queries,
# a 320-item dev split; about 4 minutes of cache): for choosing what to run in full, never the benchmark's result
SMALL = replace(BenchConfig(), pool_size=2000, queries_per_task=256, test_target_per_task=20,
                test_nontarget_per_task=10, dev_target_per_task=120, dev_nontarget_per_task=40, base_steps=700,
                seeds=(0,), stat_seeds=())

# name -> (scorer, selection, group). Selections: "all"; "top:P"; "weights"; stratified top:P (the kept set keeps the
# pool's mix of strata): "strat_task:P" (by task), "strat_len:P" (task x response-length quartile of the pool),
# "strat_length:P" (response-length quartile over the pool).
# Protocol: every baseline and every DRIFT candidate runs on every seed and is scored on dev and on test; DRIFT's best
# setting is the candidate with the best mean dev target accuracy among those whose dev non-target accuracy is within
# NONTARGET_SLACK of the full pool's (choose_best); then the three ablations of *that* setting run on every seed.
MAIN = rl.DriftVariant(preconditioner="block")  # the library defaults: BankConfig + ScoreConfig
NONTARGET_SLACK = 0.02
METHODS = {  # v3 (issue 16); v2 candidates that the v2 run settled are in EXTRA_METHODS
    "full": ("none", "all", "baseline"),
    "random": ("random", "top:{f}", "baseline"),
    "loss": ("loss", "top:{f}", "baseline"),
    "ifd": ("ifd", "top:{f}", "baseline"),
    # off-policy baselines, one row per reference style (tasks.DataRecipe.reference_styles): the main ones have
    # references written by another author (`prose`, as a validation set's own solutions are); `less` / `if` keep
    # references in the pool's own template (on the model's manifold) and `answer-refs` the bare answers: the two ends
    "less prose-refs": ("less_prose", "top:{f}", "baseline"),
    "if prose-refs": ("if_prose", "top:{f}", "baseline"),
    "less": ("less", "top:{f}", "baseline"),
    "if": ("if", "top:{f}", "baseline"),
    "less answer-refs": ("less_answer", "top:{f}", "baseline"),
    "drift top:0.25": ("drift", "top:0.25", "drift"),
    "drift weights": ("drift", "weights", "drift"),
    "drift strat_len:{f}": ("drift", "strat_len:{f}", "drift"),
    # query weighting by learnability p(1-p) (LearnAlign): all-right / all-wrong queries weigh 0
    "drift learnability weights": ("drift_learn", "weights", "drift"),
    "drift learnability top:{f}": ("drift_learn", "top:{f}", "drift"),
    # queries without a contrast: dropped; the prose reference as a correct target (a hybrid: its own row); adaptive K
    "drift drop-no-contrast weights": ("drift_drop", "weights", "drift"),
    "drift hybrid prose-ref weights": ("drift_hybrid", "weights", "drift"),
    "drift adaptive-K weights": ("drift_adaptive", "weights", "drift"),
    "drift adaptive-K learnability weights": ("drift_adaptive_learn", "weights", "drift"),
    # filters in sequence (refine --prefilter): drop the worst 20% by loss, then DRIFT
    "drift after loss-prefilter 0.2, weights": ("drift", "pre:loss:0.2|weights", "drift"),
    "drift after loss-prefilter 0.2, top:{f}": ("drift", "pre:loss:0.2|top:{f}", "drift"),
    "oracle clean": ("oracle", "top:{f}", "reference"),
    # the ceiling of filtering toward the target tasks: clean target-task rows at random (reads the hidden label)
    "oracle clean target-tasks": ("oracle_target", "top:{f}", "reference"),
}
# Not in the default run (--methods NAME ...). v2 rows whose question the v2 run answered (docs/benchmark.md), and:
# does the score matter once the composition is held fixed? Each "target-only" method keeps round(P*n) rows of the
# target tasks only, top P inside each target task x response-length quartile ("oracle clean target-tasks"' mix).
EXTRA_METHODS = {
    # the library's weight maps (issue 24: which map is refine's default): "drift weights" above is exp_z
    "drift weights rank": ("drift", "weights:rank", "drift"),
    "drift weights clipped_z": ("drift", "weights:clipped_z", "drift"),
    "drift weights exp_z": ("drift", "weights:exp_z", "drift"),
    "if answer-refs": ("if_answer", "top:{f}", "baseline"),
    "loss strat_len:{f}": ("loss", "strat_len:{f}", "baseline"),
    "less strat_len:{f}": ("less", "strat_len:{f}", "baseline"),
    "drift top:0.1": ("drift", "top:0.1", "drift"),
    "drift beta=1.5 top:{f}": ("drift_beta1.5", "top:{f}", "drift"),
    "drift beta=1.5 strat_len:{f}": ("drift_beta1.5", "strat_len:{f}", "drift"),
    "drift tc strat_len:{f}": ("drift_tc", "strat_len:{f}", "drift"),
    "drift tc beta=1.5 strat_len:{f}": ("drift_tc_beta1.5", "strat_len:{f}", "drift"),
    "drift advantage top:{f}": ("drift_advantage", "top:{f}", "drift"),
    "drift advantage strat_len:{f}": ("drift_advantage", "strat_len:{f}", "drift"),
    "drift target-only strat_len:{f}": ("drift", "strat_len_target:{f}", "composition"),
    "loss target-only strat_len:{f}": ("loss", "strat_len_target:{f}", "composition"),
    "less target-only strat_len:{f}": ("less", "strat_len_target:{f}", "composition"),
    "random target-only strat_len:{f}": ("random", "strat_len_target:{f}", "composition"),
}
DRIFT_SCORERS = {
    "drift": MAIN,
    "less": replace(MAIN, targets="off-policy", beta=1.0),
    "if": replace(MAIN, targets="off-policy", beta=0.0),
    "less_answer": replace(MAIN, targets="off-policy", beta=1.0, references="answer"),
    "if_answer": replace(MAIN, targets="off-policy", beta=0.0, references="answer"),
    "drift_beta1.5": replace(MAIN, beta=1.5),
    "drift_tc": replace(MAIN, task_conditional=True),
    "drift_advantage": replace(MAIN, signing="advantage"),
    "drift_tc_beta1.5": replace(MAIN, beta=1.5, task_conditional=True),
    "less_prose": replace(MAIN, targets="off-policy", beta=1.0, references="prose"),
    "if_prose": replace(MAIN, targets="off-policy", beta=0.0, references="prose"),
    "drift_learn": replace(MAIN, query_weighting="learnability"),
    "drift_drop": replace(MAIN, no_contrast="drop"),
    "drift_hybrid": replace(MAIN, no_contrast="reference", hybrid_references="prose"),
    "drift_adaptive": replace(MAIN, max_rollouts=BenchConfig.max_rollouts),
    "drift_adaptive_learn": replace(MAIN, max_rollouts=BenchConfig.max_rollouts, query_weighting="learnability"),
}
# the chosen setting's closest comparators, run on the extra seeds too (and the ablations)
STAT_COMPARATORS = ("full", "loss", "less prose-refs", "less", "less answer-refs", "if prose-refs")
ABLATIONS = {  # of the chosen setting: name -> change to its DriftVariant (its selection is kept)
    # off-policy targets (the validation set's own, prose, references): the contrast options need rollouts
    "ablation off-policy": {"targets": "off-policy", "references": "prose", "query_weighting": "uniform",
                            "no_contrast": "keep", "max_rollouts": None},
    "ablation unsigned": {"signing": "positive"},
    "ablation beta=0": {"beta": 0.0},
}


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                logger.info("stage %s ...", name)

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.perf_counter() - self.t
                logger.info("stage %s done in %.1fs", name, time.perf_counter() - self.t)

        return _T()


# ---------------------------------------------------------------------------------------------------- stages


def make_data(cfg: BenchConfig):
    """Pool, validation queries (+ their reference worked responses) and test sets, all disjoint by question."""
    from drift_stream.embedded import tasks

    recipe = tasks.DataRecipe(
        seed=cfg.data_seed, pool_size=cfg.pool_size,
        queries={t: cfg.queries_per_task for t in TARGET},
        test={**{t: cfg.test_target_per_task for t in TARGET}, **{t: cfg.test_nontarget_per_task for t in NONTARGET}},
        dev={**{t: cfg.dev_target_per_task for t in TARGET}, **{t: cfg.dev_nontarget_per_task for t in NONTARGET}})
    # every test / dev / query row carries its reference solution in each style (pool template, another author's
    # prose, the bare answer): docs/demo_data.md
    if cfg.base_model:  # the demo data exactly (the shipped model's own SFT pool): DataRecipe's defaults, no dev
        recipe = tasks.DataRecipe(seed=cfg.data_seed)
    recipe = replace(recipe, reference_styles=("pool", "prose", "answer"))
    splits = tasks.make_splits(recipe)
    for q in splits.queries:
        q["reference"] = q["reference_pool"]  # the Query reference of the library check (pool style, as in v2)
    return splits


def train_base(cfg: BenchConfig, splits, tok, out: Path):
    from drift_stream.embedded.training import (
        TinyModelRecipe,
        greedy_accuracy,
        train_sft,
    )

    recipe = TinyModelRecipe(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                             intermediate_size=cfg.intermediate_size, max_positions=cfg.max_tokens,
                             init_seed=cfg.data_seed, steps=cfg.base_steps, batch_size=cfg.batch_size,
                             lr=cfg.base_lr, warmup_steps=cfg.base_warmup, seed=cfg.data_seed)
    model = recipe.build(tok)
    model.train()
    t0 = time.perf_counter()
    train_sft(model, tok, splits.pool, **recipe.sft_kwargs(), max_tokens=cfg.max_tokens, log_every=100)
    train_s = time.perf_counter() - t0
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    acc = greedy_accuracy(model, tok, splits.test, max_new_tokens=cfg.eval_max_new_tokens)
    (out / "base_eval.json").write_text(json.dumps({"accuracy": acc.accuracy, "per_task": acc.per_task,
                                                    "train_s": train_s}))
    return model


def make_rollouts(cfg: BenchConfig, model, tok, chat, splits):
    from drift_stream.embedded import tasks
    from drift_stream.rollouts.engine import Query, RolloutConfig, generate_rollouts

    queries = [Query(id=q["id"], messages=({"role": "user", "content": q["question"]},), answer=q["answer"],
                     reference=q["reference"], task=q["task"]) for q in splits.queries]
    rollouts = generate_rollouts(model, tok, chat, queries, RolloutConfig(
        num_rollouts=cfg.num_rollouts, temperature=1.0, max_new_tokens=cfg.rollout_max_new_tokens,
        seed=cfg.data_seed, batch_size=64), progress=False)
    by_id = {q["id"]: (i, q) for i, q in enumerate(splits.queries)}
    rows = []
    for r in rollouts:
        qi, q = by_id[r.query_id]
        rows.append({"query": qi, "index": r.rollout_index, "prompt_ids": list(r.prompt_ids),
                     "completion_ids": list(r.completion_ids), "completion": r.completion,
                     "reward": tasks.score_response(q["task"], r.completion, q["answer"])})
    return queries, rows


def build_cache(cfg: BenchConfig, workdir: Path, timer: Timer):
    """Everything the methods share, cached under workdir/<cfg.key()>: base model, rollouts, features."""
    import torch

    from drift_stream.data.example_types import Example
    from drift_stream.data.tokenization import ChatTokenizer
    from drift_stream.embedded.tiny_models import make_char_tokenizer
    from drift_stream.embedded.training import encode_rows
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.model.loading import load_model, load_tokenizer

    with timer("data"):
        splits = make_data(cfg)
    # The cache belongs to this config AND these exact rows (the task generators may change under us).
    data_sha = hashlib.sha256(json.dumps([splits.pool, splits.queries, splits.test, splits.dev],
                                         sort_keys=True).encode())
    cache = workdir / f"{cfg.key()}-{data_sha.hexdigest()[:8]}"
    cache.mkdir(parents=True, exist_ok=True)
    base_dir = cache / "base"
    with timer("base"):
        if cfg.base_model and not (base_dir / "base_eval.json").exists():  # a given base: copied, evaluated
            from drift_stream.embedded.training import greedy_accuracy

            given = load_model(cfg.base_model, device="cpu")
            given.save_pretrained(str(base_dir))
            load_tokenizer(cfg.base_model).save_pretrained(str(base_dir))
            acc = greedy_accuracy(given, load_tokenizer(cfg.base_model), splits.test,
                                  max_new_tokens=cfg.eval_max_new_tokens)
            (base_dir / "base_eval.json").write_text(json.dumps({"accuracy": acc.accuracy, "per_task": acc.per_task,
                                                                 "train_s": 0.0, "given": cfg.base_model}))
        if not (base_dir / "base_eval.json").exists():
            train_base(cfg, splits, make_char_tokenizer(), base_dir)
        tok = load_tokenizer(str(base_dir))
        model = load_model(str(base_dir), device="cpu")
    chat = ChatTokenizer(tok, max_tokens=cfg.max_tokens)
    with timer("rollouts"):
        path = cache / "rollouts.json"
        if not path.exists():
            _, rows = make_rollouts(cfg, model, tok, chat, splits)
            path.write_text(json.dumps(rows))
        rollouts = json.loads(path.read_text())
    fc = FeatureConfig(proj_dim_in=cfg.proj_dim, proj_dim_out=cfg.proj_dim, seed=0)
    pool_ex = encode_rows(tok, splits.pool, max_tokens=cfg.max_tokens)
    with timer("features"):
        path = cache / "features.npz"
        if not path.exists():
            roll_ex = [chat.encode_rollout(r["prompt_ids"], r["completion_ids"], id=f"r{i}")
                       for i, r in enumerate(rollouts)]
            ref_ex = [chat.encode(Example(id=q["id"], messages=(
                {"role": "user", "content": q["question"]}, {"role": "assistant", "content": q["reference"]})))
                for q in splits.queries]
            pf, pn, pl_, feat = rl.featurize(model, pool_ex, feature_config=fc)
            rf, _, _, _ = rl.featurize(model, roll_ex, feature_config=fc)
            qf, _, _, _ = rl.featurize(model, ref_ex, feature_config=fc)
            np.savez(path, pool=pf, pool_norm=pn, pool_loss=pl_, roll=rf, ref=qf,
                     block_sizes=np.array(feat.block_sizes))
        f = np.load(path)
        feats = {k: f[k] for k in f.files}
        path = cache / "features_answer_refs.npz"  # added after the first v2 run: its own file, same cache key
        if not path.exists():
            ans_ex = [chat.encode(Example(id=q["id"], messages=(
                {"role": "user", "content": q["question"]}, {"role": "assistant", "content": q["answer"]})))
                for q in splits.queries]
            af, _, al, _ = rl.featurize(model, ans_ex, feature_config=fc)
            np.savez(path, ref_answer=af, ref_answer_loss=al)
        f = np.load(path)
        feats.update({k: f[k] for k in f.files})
    torch.manual_seed(0)
    base_eval = json.loads((base_dir / "base_eval.json").read_text())
    built = cache / "build_wall_s.json"  # stage times of the run that built the cache (reruns only load it)
    if not built.exists():
        built.write_text(json.dumps({k: timer.stages.get(k) for k in ("base", "rollouts", "features")}))
    ctx = {"cfg": cfg, "cache": cache, "splits": splits, "scorers": dict(DRIFT_SCORERS), "tok": tok, "model": model,
           "chat": chat, "fc": fc,
           "pool_ex": pool_ex, "rollouts": rollouts, "feats": feats, "base_eval": base_eval}
    building_v3 = not (cache / "losses_v3.npz").exists()
    with timer("features_v3"):
        v3.extend_cache(ctx, fc)  # prose references, losses for the proximity gaps, adaptive-K rollouts
    if building_v3:  # the run that built the v3 files records their time next to the v2 stages
        built.write_text(json.dumps({**json.loads(built.read_text()), "features_v3": timer.stages["features_v3"]}))
    return ctx


def drift_from_cache(ctx, variant: rl.DriftVariant):
    """S(z) [n] of a DRIFT variant from the cached features (refine_v3.variant_scores)."""
    return v3.variant_scores(ctx, variant)[0]


def library_scores(ctx, name: str, seed: int):
    """loss / ifd / random through the library's scorers on an in-memory Arrow table of the pool."""
    import pyarrow as pa

    from drift_stream.scoring.build import build_scorer

    scorer = build_scorer(name, model=None, tokenizer=ctx["tok"], model_obj=ctx["model"],
                          max_tokens=ctx["cfg"].max_tokens, batch_size=32, seed=seed, device="cpu")
    table = pa.Table.from_pylist([{k: row[k] for k in ("id", "messages")} for row in ctx["splits"].pool])
    out = scorer(table)
    reasons = [x for x in out.column("drift_reject_reason").to_pylist() if x]
    if reasons:
        raise RuntimeError(f"{name} rejected pool rows: {reasons[:5]}")
    return np.array(out.column("drift_score").to_pylist(), dtype=np.float64)


def method_scores(ctx, scorer: str, seed: int, cached: dict):
    key = (scorer, seed if scorer in ("random", "oracle", "oracle_target") else None)
    if key in cached:
        return cached[key]
    pool = ctx["splits"].pool
    if scorer == "none":
        s = np.zeros(len(pool))
    elif scorer in ("loss", "ifd", "random"):
        s = library_scores(ctx, scorer, seed)
    elif scorer in ("oracle", "oracle_target"):  # clean rows (of the target tasks) first, at random
        rng = np.random.default_rng((1000 if scorer == "oracle" else 2000) + seed)
        s = rng.random(len(pool)) + np.array([r["corruption"] == "clean" for r in pool], dtype=float)
        if scorer == "oracle_target":
            s += np.array([r["task"] in TARGET for r in pool], dtype=float)
    elif scorer in ctx["scorers"]:
        s = drift_from_cache(ctx, ctx["scorers"][scorer])
    else:
        raise ValueError(f"unknown scorer {scorer}")
    cached[key] = s
    return s


def library_weights(scores, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Weights [n], mean 1, from drift_stream.refine.weight_map (what `refine --policy weights --weight-map KIND`
    writes), so the benchmark's dev split can choose the library's default map."""
    import polars as pl

    from drift_stream.io.columns import SCORE
    from drift_stream.refine.weight_map import fit_weight_map

    s = np.asarray(scores, dtype=np.float64)
    stats = {"mean": float(s.mean()), "std": float(s.std()), "max": float(s.max())}
    wmap = fit_weight_map(pl.DataFrame({SCORE: s}).lazy(), stats, s.size, kind=kind, temperature=temperature)
    return wmap(s)


def select(ctx, scores, selection: str, seed: int = 0, cached: dict | None = None):
    """Per-row training weights [n] (0 = dropped) for a selection spec (seed / cached: for a prefilter's scorer)."""
    pool = ctx["splits"].pool
    ids = [r["id"] for r in pool]
    if selection == "all":
        return np.ones(len(pool))
    if selection == "weights":
        return rl.softmax_weights(scores)
    if selection.startswith("weights:"):  # the library's weight map (refine --weight-map): rank | clipped_z | exp_z
        return library_weights(scores, selection.split(":", 1)[1])
    if selection.startswith("pre:"):  # filters in sequence: pre:SCORER:X|SELECTION (refine --prefilter)
        return v3.chained_select(ctx, select, scores, selection, method_scores, seed, {} if cached is None else cached)
    kind, frac = selection.split(":")
    frac = float(frac)
    if kind == "top":
        return rl.top_mask(scores, frac, ids).astype(float)
    if kind == "strat_task":
        return rl.stratified_top_mask(scores, frac, ids, [r["task"] for r in pool]).astype(float)
    if kind in ("strat_len", "strat_length", "strat_len_target"):
        ntok = np.array([sum(e.loss_mask) for e in ctx["pool_ex"]])
        buckets = rl.length_buckets(ntok)  # response-length quartile over the pool
        if kind == "strat_len_target":  # target-task rows only; as many rows in all as top:P of the whole pool
            idx = np.flatnonzero([r["task"] in TARGET for r in pool])
            k = int(math.floor(frac * len(pool) + 0.5))
            strata = [f"{pool[i]['task']}|{buckets[i]}" for i in idx]
            keep = np.zeros(len(pool))
            keep[idx[rl.stratified_top_mask(np.asarray(scores)[idx], k / len(idx), [ids[i] for i in idx], strata)]] = 1
            return keep
        if kind == "strat_len":  # task x length quartile
            strata = [f"{r['task']}|{b}" for r, b in zip(pool, buckets)]
        else:  # length quartile only: the task mix is left to the score
            strata = [str(b) for b in buckets]
        return rl.stratified_top_mask(scores, frac, ids, strata).astype(float)
    raise ValueError(f"unknown selection {selection!r}")


def continue_sft(ctx, weights, seed: int, return_model: bool = False):
    """Continued SFT from ctx's model on weighted rows; greedy accuracy on target and non-target tasks, test and
    dev (and the trained model when return_model)."""
    from drift_stream.embedded.training import greedy_accuracy, train_sft

    cfg = ctx["cfg"]
    model = copy.deepcopy(ctx["model"])
    model.train()
    train_sft(model, ctx["tok"], ctx["pool_ex"], weights=list(weights), steps=cfg.sft_steps,
              batch_size=cfg.batch_size, lr=cfg.sft_lr, seed=seed, warmup_steps=min(10, cfg.sft_steps // 5),
              max_tokens=cfg.max_tokens, log_every=0)
    model.eval()
    out = {}
    for split, prefix in (("test", ""), ("dev", "dev_")):
        rows = getattr(ctx["splits"], split)
        if not rows:
            continue
        acc = greedy_accuracy(model, ctx["tok"], rows, max_new_tokens=cfg.eval_max_new_tokens)
        # equal sizes per task within each group, so the mean over records is the mean over tasks
        out[f"{prefix}target_acc"] = float(np.mean([r["correct"] for r in acc.records if r["task"] in TARGET]))
        out[f"{prefix}nontarget_acc"] = float(np.mean([r["correct"] for r in acc.records if r["task"] not in TARGET]))
        out[f"{prefix}per_task"] = acc.per_task
    return (out, model) if return_model else out


_SFT_CTX: dict = {}  # the forked workers' view of ctx (set before the pool forks; read-only in the workers)


def _sft_job(job):
    weights, seed = job
    t = time.perf_counter()
    acc = continue_sft(_SFT_CTX["ctx"], weights, seed)
    return acc, time.perf_counter() - t


def sft_jobs(ctx, jobs: list, workers: int):
    """Yield (accuracies, wall seconds) of continue_sft for each (weights, seed) job, in order. workers > 1: forked
    processes of one torch thread each (every run is seeded by its own seed, so results do not depend on workers)."""
    if workers <= 1 or len(jobs) <= 1:
        for weights, seed in jobs:
            t = time.perf_counter()
            yield continue_sft(ctx, weights, seed), time.perf_counter() - t
        return
    import multiprocessing

    _SFT_CTX["ctx"] = ctx
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            yield from pool.imap(_sft_job, jobs)
    finally:
        _SFT_CTX.clear()


def choose_best(rows: list[dict], methods: dict) -> dict:
    """DRIFT's best setting, chosen on dev only: the best mean dev target accuracy among the DRIFT candidates whose
    mean dev non-target accuracy is within NONTARGET_SLACK of the full pool's (all candidates if none is)."""
    def dev_mean(name, key):  # over the main seeds (rows of the extra seeds are for statistics only)
        vals = [r[key] for r in rows if r["method"] == name and key in r and not r.get("extra_seed")]
        return float(np.mean(vals)) if vals else float("nan")

    candidates = {n: {"dev_target": dev_mean(n, "dev_target_acc"), "dev_nontarget": dev_mean(n, "dev_nontarget_acc")}
                  for n, (_, _, g) in methods.items() if g == "drift"}
    full_dev_nontarget = dev_mean("full", "dev_nontarget_acc") if "full" in methods else float("nan")
    eligible = [n for n, c in candidates.items()
                if not np.isfinite(full_dev_nontarget) or c["dev_nontarget"] >= full_dev_nontarget - NONTARGET_SLACK]
    pool = eligible or list(candidates)
    chosen = max(pool, key=lambda n: (candidates[n]["dev_target"], candidates[n]["dev_nontarget"])) if pool else None
    return {"rule": f"max mean dev target accuracy among DRIFT candidates with dev non-target >= full pool's - "
                    f"{NONTARGET_SLACK}", "full_dev_nontarget": full_dev_nontarget, "candidates": candidates,
            "eligible": eligible, "chosen": chosen}


# ---------------------------------------------------------------------------------------------------- outputs


def resolve_methods(cfg: BenchConfig) -> dict:
    names = [n for n in (cfg.methods or tuple(METHODS)) if n != "ablations"]
    out = {}
    for name in names:
        scorer, selection, group = {**METHODS, **EXTRA_METHODS}[name]
        out[name.format(f=cfg.fraction)] = (scorer, selection.format(f=cfg.fraction), group)
    return out


def diagnostics(ctx, methods, cached, out: dict | None = None) -> dict:
    """ROC-AUC clean vs corrupted, Spearman with gradient norm and length, per scorer (seed 0 for random)."""
    pool = ctx["splits"].pool
    clean = np.array([r["corruption"] == "clean" for r in pool])
    ntok = np.array([sum(e.loss_mask) for e in ctx["pool_ex"]])
    out = {} if out is None else out
    for scorer in sorted({s for s, _, _ in methods.values()} - {"none", "oracle", "oracle_target"} - set(out)):
        s = method_scores(ctx, scorer, 0, cached)
        out[scorer] = dict(rl.score_diagnostics(s, clean, ctx["feats"]["pool_norm"], ntok))
        # AUC per corruption kind: clean rows against that kind only
        labels = np.array([r["corruption"] for r in pool])
        for kind in sorted(set(labels) - {"clean"}):
            sel = clean | (labels == kind)
            out[scorer][f"auc_{kind}"] = rl.roc_auc(s[sel], clean[sel])
        if scorer in ctx["scorers"]:  # AUC of the contributions of all-wrong / all-right / mixed queries
            out[scorer].update(v3.contribution_aucs(ctx, ctx["scorers"][scorer]))
    return out


# ---------------------------------------------------------------------------------------------------- main


def run(cfg: BenchConfig, workdir: Path, mode: str, library_check: bool = True, out: Path | None = None,
        workers: int = 1) -> dict:
    import torch

    torch.set_num_threads(1)  # 1 thread: 6x faster than 2 here when other jobs share the 2 cores
    timer = Timer()
    t0 = time.perf_counter()
    ctx = build_cache(cfg, workdir, timer)
    pool = ctx["splits"].pool
    labels = [r["corruption"] for r in pool]
    kinds = ["clean"] + sorted(set(labels) - {"clean"})
    methods = resolve_methods(cfg)
    cached: dict = {}
    with timer("scores"):
        diag = diagnostics(ctx, methods, cached)
    check = None
    if library_check:
        with timer("library_check"):
            check = check_library_path(ctx, cached, sys.modules[__name__])
    base_t = np.mean([ctx["base_eval"]["per_task"][t] for t in TARGET])  # equal test sizes per task
    base_n = np.mean([ctx["base_eval"]["per_task"][t] for t in NONTARGET])
    rows: list[dict] = []
    choice: dict = {}  # DRIFT's best setting, chosen on dev (choose_best)
    run_ablations = (any(g == "drift" for _, _, g in methods.values())
                     and (not cfg.methods or "ablations" in cfg.methods))

    def assemble(label: str) -> dict:
        return {
            "mode": label, "config": asdict(cfg), "rows": rows,
            "methods": {k: {"scorer": s, "selection": sel, "group": g} for k, (s, sel, g) in methods.items()},
            "base": {"target_acc": float(base_t), "nontarget_acc": float(base_n),
                     "per_task": ctx["base_eval"]["per_task"]},
            "pool_corrupted_share": float(np.mean([x != "clean" for x in labels])), "corruption_kinds": kinds,
            "pool_shares": rl.kept_shares(np.ones(len(pool)), labels, kinds), "diagnostics": diag,
            "library_check": check, "wall_s": dict(timer.stages), "choice": choice,
            "cache_build_wall_s": json.loads((ctx["cache"] / "build_wall_s.json").read_text()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s) x {workers} SFT worker(s), "
                       f"{os.cpu_count()} cores, {platform.platform()}",
            "versions": versions(),
            "drift_main_variant": asdict(MAIN), "drift_variants": {k: asdict(v) for k, v in ctx["scorers"].items()},
            "statistics": statistics, "proximity_gaps": v3.proximity_gaps(ctx),
            "adaptive_k": ctx["adaptive"]["info"], "query_outcomes": {
                str(k): int(v) for k, v in zip(*np.unique(v3.query_outcomes(ctx), return_counts=True))},
        }

    total = len(cfg.seeds) * (len(methods) + (len(ABLATIONS) if run_ablations else 0))
    statistics: dict = {}

    def run_methods(batch: dict, seeds=cfg.seeds, extra: dict | None = None) -> None:
        jobs = [(name, seed, select(ctx, method_scores(ctx, scorer, seed, cached), selection, seed, cached))
                for seed in seeds for name, (scorer, selection, group) in batch.items()]
        for (name, seed, weights), (acc, wall) in zip(jobs, sft_jobs(ctx, [(w, s) for _, s, w in jobs], workers)):
            rows.append({"method": name, "seed": seed, **acc, **(extra or {}), "rows_kept": int((weights > 0).sum()),
                         "corrupted_share": 1.0 - rl.kept_shares(weights, labels, ["clean"])["clean"],
                         "kept_shares": rl.kept_shares(weights, labels, kinds), "wall_s": wall})
            logger.info("%-32s seed %d: target %.3f non-target %.3f | dev %.3f / %.3f (%.0fs)", name, seed,
                        acc["target_acc"], acc["nontarget_acc"], acc.get("dev_target_acc", float("nan")),
                        acc.get("dev_nontarget_acc", float("nan")), rows[-1]["wall_s"])
            if out is not None:  # partial results after every run, so a long run can be read while it goes
                write_outputs(out, assemble(f"{mode}, partial: {len(rows)} of {total} runs"))

    with timer("continued_sft"):
        run_methods(methods)
        if run_ablations:
            chosen = choose_best(rows, methods)
            choice.update(chosen)
            logger.info("DRIFT setting chosen on dev: %s", chosen["chosen"])
            scorer, selection, _ = methods[chosen["chosen"]]
            ablations = {}
            for name, change in ABLATIONS.items():
                key = f"{scorer}|{name}"
                ctx["scorers"][key] = replace(ctx["scorers"][scorer], **change)
                ablations[name] = (key, selection, "ablation")
            methods.update(ablations)
            with timer("scores"):
                diagnostics(ctx, ablations, cached, diag)
            run_methods(ablations)
            # 5 seeds for the chosen setting and its closest comparators: paired differences with their SE
            comparators = [m for m in STAT_COMPARATORS if m in methods] + list(ablations)
            if cfg.stat_seeds:
                run_methods({m: methods[m] for m in [chosen["chosen"]] + comparators}, seeds=cfg.stat_seeds,
                            extra={"extra_seed": True})
            statistics.update({"seeds": sorted(set(cfg.seeds) | set(cfg.stat_seeds)), "chosen": chosen["chosen"],
                               "target": v3.paired_stats(rows, chosen["chosen"], comparators, "target_acc"),
                               "nontarget": v3.paired_stats(rows, chosen["chosen"], comparators, "nontarget_acc")})
    if cfg.second_round and choice.get("chosen"):
        with timer("second_round"):  # two rounds: the chosen setting against the best baseline on dev
            base_names = [m for m, (_, _, g) in methods.items() if g == "baseline" and m != "full"]
            best = max(base_names, key=lambda m: np.mean([r["dev_target_acc"] for r in rows if r["method"] == m]))
            for r in v3.second_round(ctx, methods, [choice["chosen"], best], cfg.seeds, select, method_scores,
                                     continue_sft, make_rollouts, workers=workers):
                rows.append(r)
                methods[r["method"]] = (methods[r["method"].removesuffix(", 2 rounds")][0], "2 rounds", "round2")
    timer.stages["total"] = time.perf_counter() - t0
    return assemble(mode)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one seed")
    parser.add_argument("--small", action="store_true", help="dev-scale experiment sizes (SMALL), one seed")
    parser.add_argument("--demo-base", action="store_true",
                        help="with --diagnostics-only: the shipped tiny model as the base, on its own demo data "
                             "(3,000-row pool, 128 queries); minutes, no base training")
    parser.add_argument("--diagnostics-only", action="store_true",
                        help="only the score diagnostics of every DRIFT variant, loss and the off-policy baselines "
                             "(AUCs incl. all-wrong / all-right / mixed query contributions, proximity gaps); no SFT")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/refine_eval_cache"),
                        help="cache of base model, rollouts and features (reused when the config matches)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"subset of {list(METHODS) + list(EXTRA_METHODS)}; add 'ablations' to run the "
                             "ablations of the setting chosen on dev among the DRIFT methods given (default: every "
                             "method and the ablations)")
    parser.add_argument("--no-library-check", action="store_true")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="continued-SFT runs in parallel, forked processes of one torch thread each (default: "
                             "min(2, cores)); results do not depend on it")
    parser.add_argument("--stat-seeds", type=int, nargs="*", default=None,
                        help="extra seeds for the chosen setting and its closest comparators (default 3 4)")
    parser.add_argument("--second-round", action="store_true",
                        help="also two rounds of refine + continued SFT: the chosen setting vs the best baseline")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only re-render results.md / results.png from a results.json into --out")
    parser.add_argument("--variants", action="store_true",
                        help="only the DRIFT variant diagnostics (no SFT): writes variants.json / variants.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = QUICK if args.quick else SMALL if args.small else BenchConfig()
    if args.demo_base:
        if not args.diagnostics_only:
            parser.error("--demo-base has no dev split: use it with --diagnostics-only")
        cfg = replace(cfg, base_model=str(REPO / "drift_stream" / "assets" / "tiny-reasoner"), max_tokens=256,
                      pool_size=3000, queries_per_task=64)
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.methods:
        cfg = replace(cfg, methods=tuple(args.methods))
    if args.stat_seeds is not None:
        cfg = replace(cfg, stat_seeds=tuple(args.stat_seeds))
    if args.second_round:
        cfg = replace(cfg, second_round=True)
    out = args.out or (REPO / "benchmarks" / "results" / ("quick" if args.quick else "small" if args.small else ""))
    if args.render is not None:
        write_outputs(out, json.loads(args.render.read_text()))
        return 0
    if args.variants:
        import torch

        torch.set_num_threads(1)
        rows = explore_variants(build_cache(cfg, args.workdir, Timer()), sys.modules[__name__])
        out.mkdir(parents=True, exist_ok=True)
        (out / "variants.json").write_text(json.dumps({"rows": rows, "config": asdict(cfg)}, indent=1))
        (out / "variants.md").write_text(variants_markdown(rows))
        print(variants_markdown(rows))
        return 0
    if args.diagnostics_only:
        import torch

        torch.set_num_threads(1)
        timer = Timer()
        ctx = build_cache(cfg, args.workdir, timer)
        scorers = sorted(set(DRIFT_SCORERS) | {"loss"})
        with timer("scores"):
            diag = diagnostics(ctx, {k: (k, "", "") for k in scorers}, {})
        info = {"mode": "diagnostics", "config": asdict(cfg), "diagnostics": diag, "wall_s": timer.stages,
                "proximity_gaps": v3.proximity_gaps(ctx), "adaptive_k": ctx["adaptive"]["info"],
                "query_outcomes": {str(k): int(v) for k, v in zip(*np.unique(v3.query_outcomes(ctx),
                                                                             return_counts=True))},
                "base": ctx["base_eval"]}
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnostics.json").write_text(json.dumps(info, indent=1, default=float))
        print(json.dumps({k: info[k] for k in ("proximity_gaps", "adaptive_k", "query_outcomes", "wall_s")},
                         default=float))
        print("\n".join(v3_markdown_diag(info)))
        return 0
    mode = "quick" if args.quick else "small (dev-scale experiment)" if args.small else "full"
    result = run(cfg, args.workdir, mode, library_check=not args.no_library_check, out=out,
                 workers=args.workers)
    write_outputs(out, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
