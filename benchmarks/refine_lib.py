"""Pieces of the refinement benchmark (benchmarks/refine_eval.py): cached gradient features, the DRIFT score
from them, selection policies, and the diagnostics (ROC-AUC, Spearman, kept corruption shares).

Why a feature cache: every DRIFT variant (signing, preconditioner, beta, aggregation, number of queries or rollouts)
is a cheap linear-algebra function of the same three feature matrices -- pool rows, rollouts, reference answers --
produced once by the library's `GradientFeaturizer`. `drift_scores` below follows DESIGN.md section 2 step by step;
refine_eval.py checks it against the library's bank + scorer path on the main setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from drift_stream.errors import ConfigError

# ---------------------------------------------------------------------------------------------------- features


def featurize(model, examples, *, feature_config, batch_size: int = 32):
    """Library features of tokenized examples: (features [n, D] float32, grad_norm [n], loss [n]), input order.

    Examples are processed sorted by length (less padding); features do not depend on the batch they fall in.
    """
    import torch

    from drift_stream.data.tokenization import collate
    from drift_stream.grads.features import GradientFeaturizer

    featurizer = GradientFeaturizer(model, feature_config)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    feats = np.zeros((len(examples), featurizer.dim), dtype=np.float32)
    loss = np.zeros(len(examples))
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        out = featurizer.featurize(collate([examples[i] for i in idx], pad_token_id=0))
        if any(b is not None for b in out.bad):
            raise RuntimeError(f"unscorable rows in the benchmark pool: {[b for b in out.bad if b]}")
        feats[idx] = out.features.to(torch.float32).numpy()
        loss[idx] = out.loss.double().numpy()
    return feats, np.linalg.norm(feats.astype(np.float64), axis=1), loss, featurizer


# ---------------------------------------------------------------------------------------------------- DRIFT math


@dataclass(frozen=True)
class DriftVariant:
    """One way of turning cached features into a DRIFT score (defaults: the library's defaults)."""

    targets: str = "on-policy"  # on-policy | off-policy
    # off-policy targets: "worked" references in the pool's own template (no proximity gap: the best case for them),
    # "prose": worked references in a second, independent author's style (task_references; what a validation set
    # written by other authors gives), or "answer": the dataset's bare answer, what reasoning-gym ships
    references: str = "worked"
    signing: str = "sign"  # sign | advantage | positive
    preconditioner: str = "identity"  # identity | diagonal | block
    damping: float = 0.1
    beta: float = 1.0
    normalize_queries: bool = True  # b_j scaled to unit norm
    aggregate: str = "mean"  # mean of per-query scores | "pooled": one summed query vector | "zmean": mean of
    # per-query scores standardised over the pool (each query an equal vote whatever its spread)
    num_queries: int | None = None  # the first N queries only, N/T of each of T tasks (None: all)
    num_rollouts: int | None = None  # first K rollouts per query only (None: all)
    # task-conditional: a row of a task that has validation queries is scored by the mean over that task's queries
    # only (other rows: over all queries), so each target task's rows compete on their own task's signal
    task_conditional: bool = False
    # the library's bank options (drift_stream/bank/contrast.py): S as a weighted mean over queries (uniform | learnability
    # p(1-p)); queries whose rollouts are all right or all wrong: keep | drop | reference (the reference in style
    # `hybrid_references` as one more correct target when no rollout is correct); adaptive K up to max_rollouts
    query_weighting: str = "uniform"
    no_contrast: str = "keep"
    hybrid_references: str = "prose"
    max_rollouts: int | None = None

    def __post_init__(self):
        if self.targets not in ("on-policy", "off-policy"):
            raise ConfigError(f"targets must be on-policy or off-policy, got {self.targets!r}")
        if self.references not in ("worked", "answer", "prose") or self.hybrid_references not in ("worked", "prose"):
            raise ConfigError(f"references must be worked, prose or answer, got {self.references!r} / "
                              f"{self.hybrid_references!r}")
        if self.query_weighting not in ("uniform", "learnability") or self.no_contrast not in ("keep", "drop",
                                                                                                 "reference"):
            raise ConfigError(f"bad query_weighting {self.query_weighting!r} or no_contrast {self.no_contrast!r}")
        if self.query_weighting != "uniform" and (self.aggregate != "mean" or self.task_conditional):
            raise ConfigError("query_weighting needs aggregate='mean' without task_conditional")
        if self.targets == "off-policy" and (self.query_weighting != "uniform" or self.no_contrast != "keep"
                                             or self.max_rollouts is not None):
            raise ConfigError("query_weighting, no_contrast and max_rollouts need on-policy targets")
        if self.signing not in ("sign", "advantage", "positive"):
            raise ConfigError(f"signing must be sign, advantage or positive, got {self.signing!r}")
        if self.preconditioner not in ("identity", "diagonal", "block"):
            raise ConfigError(f"unknown preconditioner {self.preconditioner!r}")
        if self.aggregate not in ("mean", "pooled", "zmean"):
            raise ConfigError(f"aggregate must be mean, pooled or zmean, got {self.aggregate!r}")
        if self.task_conditional and self.aggregate != "mean":
            raise ConfigError("task_conditional needs aggregate='mean'")


def query_subset(num_queries: int | None, m: int, query_task: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask [m] of the queries used: all, or the first `num_queries`, taken as an equal share of each task
    (in query order) when `query_task` is given, so that a subset never covers one task only."""
    allowed = np.ones(m, dtype=bool)
    if num_queries is None or num_queries >= m:
        return allowed
    if query_task is None:
        allowed[num_queries:] = False
        return allowed
    query_task = np.asarray(query_task)
    tasks = sorted(set(query_task.tolist()))
    allowed[:] = False
    for i, t in enumerate(tasks):
        share = num_queries // len(tasks) + (1 if i < num_queries % len(tasks) else 0)
        allowed[np.flatnonzero(query_task == t)[:share]] = True
    return allowed


def query_vectors(variant: DriftVariant, rollout_feats, rollout_query, rollout_index, rewards, reference_feats,
                  query_task: Sequence[str] | None = None):
    """g_j per query, [m', D] float64, and the positions of the queries kept (used and with a signal).

    rollout_feats [R, D], rollout_query [R] (query position), rollout_index [R], rewards [R]; reference_feats [m, D];
    query_task [m] balances `variant.num_queries` across tasks (query_subset).
    """
    g, kept, _ = query_targets(variant, rollout_feats, rollout_query, rollout_index, rewards, reference_feats,
                               query_task)
    return g, kept


def query_targets(variant: DriftVariant, rollout_feats, rollout_query, rollout_index, rewards, reference_feats,
                  query_task: Sequence[str] | None = None, hybrid_feats=None):
    """(g [m', D] float64, kept query positions [m'], target pass rate of each kept query [m']).

    As query_vectors, plus the library's contrast options: `no_contrast` drop leaves out queries whose rollouts
    are all correct or all wrong; `reference` appends hybrid_feats[j] [m, D] (a reference solution) as one more
    correct target of a query with no correct rollout. The pass rate counts every target (weights: learnability).
    """
    m = reference_feats.shape[0]
    allowed = query_subset(variant.num_queries, m, query_task)
    if variant.targets == "off-policy":
        return reference_feats[allowed].astype(np.float64), np.flatnonzero(allowed), np.full(int(allowed.sum()), 0.5)
    nq = m
    keep = allowed[rollout_query]
    if variant.num_rollouts is not None:
        keep &= rollout_index < variant.num_rollouts
    feats, q, r = rollout_feats[keep].astype(np.float64), rollout_query[keep], rewards[keep]
    n_all = np.bincount(q, minlength=nq)
    n_ok = np.bincount(q, weights=(r >= 1.0).astype(np.float64), minlength=nq)
    mixed = (n_ok > 0) & (n_ok < n_all)
    if variant.no_contrast == "drop":
        sel = mixed[q]
        feats, q, r = feats[sel], q[sel], r[sel]
    elif variant.no_contrast == "reference":
        hyb = np.flatnonzero(allowed & (n_all > 0) & (n_ok == 0))
        feats = np.concatenate([feats, hybrid_feats[hyb].astype(np.float64)])
        q, r = np.concatenate([q, hyb]), np.concatenate([r, np.ones(len(hyb))])
    correct = (r >= 1.0).astype(np.float64)
    if variant.signing == "sign":
        s = 2.0 * correct - 1.0
    elif variant.signing == "positive":
        s = correct
    else:
        mean_r = np.bincount(q, weights=r, minlength=nq) / np.maximum(np.bincount(q, minlength=nq), 1)
        s = r - mean_r[q]
    counts = np.bincount(q, minlength=nq).astype(np.float64)
    g = np.zeros((nq, feats.shape[1]))
    np.add.at(g, q, s[:, None] * feats)
    g /= np.maximum(counts, 1.0)[:, None]
    ok = np.linalg.norm(g, axis=1) > 0
    pass_rate = np.bincount(q, weights=correct, minlength=nq) / np.maximum(counts, 1.0)
    return g[ok], np.flatnonzero(ok), pass_rate[ok]


def fit_preconditioner(kind: str, fisher_feats, block_sizes: Sequence[int], damping: float = 0.1):
    """The library's Preconditioner fitted on training features [n, D] (None for identity)."""
    if kind == "identity":
        return None
    from drift_stream.grads.precondition import Preconditioner, PreconditionerConfig

    pre = Preconditioner(PreconditionerConfig(kind=kind, damping=damping), block_sizes)
    pre.update(fisher_feats)
    return pre.finalize()


def drift_scores(variant: DriftVariant, pool_feats, pool_norm, g, preconditioner=None, weights=None):
    """Per-row score S(z) [n] and per-query scores [n, m] of pool rows, given query vectors g [m, D].

    weights [m]: S = sum_j w_j score_j / sum_j w_j (the library's query weighting); None: the plain mean."""
    import torch

    from drift_stream.scoring.drift import weighted_query_mean

    b = g
    if preconditioner is not None:
        b = preconditioner.apply(torch.from_numpy(g)).double().numpy()
    if variant.aggregate == "pooled":
        b = b.mean(axis=0, keepdims=True)
    if variant.normalize_queries:
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    raw = pool_feats.astype(np.float64) @ b.T  # [n, m]
    per_query = raw / np.power(np.maximum(pool_norm, 1e-30), variant.beta)[:, None]
    if variant.aggregate == "zmean":
        z = (per_query - per_query.mean(axis=0)) / np.maximum(per_query.std(axis=0), 1e-30)
        return z.mean(axis=1), per_query
    return weighted_query_mean(per_query, weights), per_query


def task_conditional_mean(per_query, query_task, row_task) -> np.ndarray:
    """Score [n]: rows of a task that has queries -> mean over that task's queries; other rows -> mean over all."""
    query_task, row_task = np.asarray(query_task), np.asarray(row_task)
    out = per_query.mean(axis=1)
    for t in np.unique(query_task):
        rows = row_task == t
        out[rows] = per_query[rows][:, query_task == t].mean(axis=1)
    return out


# ---------------------------------------------------------------------------------------------------- selection


def top_mask(scores, fraction: float, ids: Sequence[str], k: int | None = None) -> np.ndarray:
    """refine/policies.py's `top:P`: exactly floor(P*n + 0.5) rows (or `k`), by score desc then id asc."""
    n = len(scores)
    if k is None:
        k = int(math.floor(fraction * n + 0.5))
    order = sorted(range(n), key=lambda i: (-float(scores[i]), ids[i]))
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    return keep


def stratified_top_mask(scores, fraction: float, ids: Sequence[str], strata: Sequence[str]) -> np.ndarray:
    """top:P inside each stratum (task, or task x length bucket), so the kept set has the pool's mix of strata.

    The total kept is floor(P*n + 0.5) as for top:P, shared among strata in proportion to their sizes (largest
    remainders; ties by stratum name).
    """
    from drift_stream.embedded.tasks import allocate

    strata = np.asarray(strata)
    names = sorted(np.unique(strata).tolist())
    sizes = {s: int((strata == s).sum()) for s in names}
    counts = allocate(int(math.floor(fraction * len(scores) + 0.5)), sizes)
    keep = np.zeros(len(scores), dtype=bool)
    for s in names:
        idx = np.flatnonzero(strata == s)
        sub = top_mask(np.asarray(scores)[idx], fraction, [ids[i] for i in idx], k=counts[s])
        keep[idx[sub]] = True
    return keep


def softmax_weights(scores, temperature: float = 1.0) -> np.ndarray:
    """refine/policies.py's `weights`: exp(z / T) with z the standardised score, normalised to mean 1."""
    s = np.asarray(scores, dtype=np.float64)
    std = s.std()
    if not std > 0:
        return np.ones_like(s)
    w = np.exp((s - s.max()) / (std * temperature))
    return w / w.mean()


def length_buckets(num_tokens, num_buckets: int = 4) -> np.ndarray:
    """Quantile bucket (0..num_buckets-1) of each row's response length."""
    edges = np.quantile(num_tokens, np.linspace(0, 1, num_buckets + 1)[1:-1])
    return np.searchsorted(edges, num_tokens, side="right")


# ---------------------------------------------------------------------------------------------------- diagnostics


def roc_auc(scores, positive) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U)."""
    from scipy.stats import rankdata

    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(x, y) -> float:
    from drift_stream.scoring.stats import spearman as _spearman

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    return float(_spearman(x[ok], y[ok]))


def kept_shares(kept_weight, labels: Sequence[str], kinds: Sequence[str]) -> dict[str, float]:
    """Share of each label among the kept rows, counting each row by its weight (1/0 for filters)."""
    w = np.asarray(kept_weight, dtype=np.float64)
    labels = np.asarray(labels)
    total = w.sum()
    return {k: float(w[labels == k].sum() / total) if total > 0 else float("nan") for k in kinds}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def score_diagnostics(scores, clean, grad_norm, num_tokens) -> Mapping[str, float]:
    return {
        "auc_clean_vs_corrupted": roc_auc(scores, clean),
        "spearman_grad_norm": spearman(scores, grad_norm),
        "spearman_length": spearman(scores, num_tokens),
    }
