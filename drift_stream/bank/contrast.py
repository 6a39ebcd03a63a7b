"""Validation queries without a contrast, and query weighting (bank options; used by bank.build_bank).

A query whose valid rollouts are all correct or all incorrect gives no correct-vs-incorrect contrast: under `sign`
its g_j is the mean gradient of one outcome only. Options (BankConfig):

* ``no_contrast``  what to do with such a query after sampling:
    ``keep``       as before (the default)
    ``drop``       leave it out of the bank (manifest reason ``no_contrast``)
    ``reference``  a query with no correct rollout gets its reference solution as one more target, counted as a
                   correct rollout (reward 1): under `sign`, g_j = (u(ref) - sum_k u(tau_k)) / (K_j + 1). A hybrid of
                   on- and off-policy targets; queries with every rollout correct are kept as they are.
* ``max_rollouts`` adaptive K: while a query has no contrast, sample K more rollouts for it (round r uses rollout
                   seed `seed + r`, rollout indices r*K .. r*K + K-1) until both outcomes appear or it has
                   `max_rollouts` in all. None: off.
* ``query_weighting``  how S(z) averages the per-query scores: S(z) = sum_j w_j score_j(z) / sum_j w_j.
    ``uniform``      w_j = 1 (the plain mean; the bank stores no weights, so scores are exactly the unweighted ones)
    ``learnability`` w_j = p_j (1 - p_j), p_j the pass rate of the query's targets (valid rollouts, plus the
                     reference when `no_contrast: reference` used it). A query with p_j in {0, 1} gets weight 0.
                     Source: LearnAlign (arXiv 2506.11480), which weights RL data by this learnability.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

QUERY_WEIGHTINGS = ("uniform", "learnability")
NO_CONTRAST = ("keep", "drop", "reference")


def has_contrast(rewards: Sequence[float], correct_threshold: float = 1.0) -> bool:
    """True when the rewards hold at least one correct and one incorrect outcome."""
    correct = [r >= correct_threshold - 1e-12 for r in rewards]
    return any(correct) and not all(correct)


def contrast_plan(rewards: Sequence[float], correct_threshold: float, no_contrast: str,
                  reference_ok: bool) -> tuple[list[float], str | None, bool]:
    """(rewards of the query's targets, reason to exclude or None, whether the reference is one of the targets).

    `rewards`: the query's valid rollouts. With the reference used, its reward 1.0 is appended last."""
    rewards = list(rewards)
    if not rewards or no_contrast == "keep" or has_contrast(rewards, correct_threshold):
        return rewards, None, False
    if no_contrast == "drop":
        return rewards, "no_contrast", False
    if reference_ok and not any(r >= correct_threshold - 1e-12 for r in rewards):
        return rewards + [1.0], None, True
    return rewards, None, False


def learnability(pass_rate: float) -> float:
    """p (1 - p) of a pass rate p in [0, 1] (LearnAlign, arXiv 2506.11480): 0.25 at p = 0.5, 0 at p in {0, 1}."""
    return float(pass_rate) * (1.0 - float(pass_rate))


def query_weights(pass_rates: Sequence[float], kind: str) -> np.ndarray:
    """w_j [m] float64 for the queries' target pass rates under `kind` (QUERY_WEIGHTINGS)."""
    if kind == "uniform":
        return np.ones(len(pass_rates))
    if kind == "learnability":
        return np.array([learnability(p) for p in pass_rates], dtype=np.float64)
    from drift_stream.errors import ConfigError

    raise ConfigError(f"query_weighting must be one of {QUERY_WEIGHTINGS}, got {kind!r}")


def top_up_rollouts(generate: Callable, verify: Callable, queries: Sequence, rollouts: list, results: list, *,
                    num_rollouts: int, max_rollouts: int | None, seed: int, correct_threshold: float):
    """Adaptive K: more rollouts for queries without a contrast, in rounds of `num_rollouts`.

    generate(queries, seed) -> rollouts of those queries (indices 0..K-1); verify(rollouts) -> results (same
    order). Returns (rollouts, results, info): the inputs plus the new rollouts (re-indexed r*K + k) in
    (query position, rollout index) order, and {"max_rollouts", "rounds", "extra_rollouts", "queries_topped_up",
    "queries_resolved"} for the manifest. Failed rollouts (results[i].failure) count toward the budget only.
    """
    info = {"max_rollouts": max_rollouts, "rounds": 0, "extra_rollouts": 0, "queries_topped_up": 0,
            "queries_resolved": 0}
    if not max_rollouts or max_rollouts <= num_rollouts:
        return rollouts, results, info
    position = {q.id: j for j, q in enumerate(queries)}
    drawn = {q.id: 0 for q in queries}
    rewards: dict[str, list[float]] = {q.id: [] for q in queries}
    for r, res in zip(rollouts, results):
        drawn[r.query_id] += 1
        if res.failure is None:
            rewards[r.query_id].append(res.reward)
    topped: set[str] = set()
    round_index = 0
    while True:
        todo = [q for q in queries if not has_contrast(rewards[q.id], correct_threshold)
                and drawn[q.id] + num_rollouts <= max_rollouts]
        if not todo:
            break
        round_index += 1
        new = [dataclasses.replace(r, rollout_index=r.rollout_index + round_index * num_rollouts)
               for r in generate(todo, seed + round_index)]
        new_results = verify(new)
        for r, res in zip(new, new_results):
            drawn[r.query_id] += 1
            if res.failure is None:
                rewards[r.query_id].append(res.reward)
        topped.update(q.id for q in todo)
        rollouts, results = rollouts + new, results + list(new_results)
        info["extra_rollouts"] += len(new)
    info["rounds"] = round_index
    info["queries_topped_up"] = len(topped)
    info["queries_resolved"] = sum(has_contrast(rewards[q], correct_threshold) for q in topped)
    order = sorted(range(len(rollouts)), key=lambda i: (position[rollouts[i].query_id], rollouts[i].rollout_index))
    if info["rounds"]:
        logger.info("adaptive K: %d queries without a contrast got up to %d rollouts (%d extra in %d rounds); %d "
                    "now have both outcomes", len(topped), max_rollouts, info["extra_rollouts"], round_index,
                    info["queries_resolved"])
    return [rollouts[i] for i in order], [results[i] for i in order], info


def contrast_counts(rows: Sequence[dict]) -> dict[str, int]:
    """Queries by outcome of their valid rollouts: all_correct / all_incorrect / mixed / none (no valid rollout)."""
    out = {"all_correct": 0, "all_incorrect": 0, "mixed": 0, "none": 0}
    for row in rows:
        c, i = row["correct"], row["incorrect"]
        out["none" if c + i == 0 else "mixed" if c and i else "all_correct" if c else "all_incorrect"] += 1
    return out
