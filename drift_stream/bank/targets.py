"""Per-query target vectors g_j of a bank: features of the rollouts and reference answers, the signing s_jk, and the
on- / off-policy vectors with their manifest rows (the formulas: bank/build.py's module docstring).
"""

from __future__ import annotations

import math
from typing import Sequence

from drift_stream.bank.contrast import contrast_plan
from drift_stream.model.batching import plan_batches

# --------------------------------------------------------------------------------------------------- signing


def signed_weights(rewards: Sequence[float], signing: str, correct_threshold: float = 1.0):
    """(weights s_k [K] as floats, None) or (None, reason) for one query's valid rollouts' rewards."""
    if not rewards:
        return None, "no_valid_rollouts"
    correct = [r >= correct_threshold - 1e-12 for r in rewards]
    if signing == "sign":
        return [1.0 if c else -1.0 for c in correct], None
    if signing == "positive":
        return ([1.0 if c else 0.0 for c in correct], None) if any(correct) else (None, "no_correct_rollout")
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    std = math.sqrt(sum(c * c for c in centered) / len(rewards))
    if std <= 1e-12:
        return None, "equal_rewards"
    return (centered if signing == "advantage" else [c / std for c in centered]), None


# --------------------------------------------------------------------------------------------------- targets


def _featurize_all(featurizer, examples, pad_id: int, batch_size: int, desc: str, progress: bool, loss_only=False,
                   max_batch_tokens: int | None = None):
    """(features [N, D] float32 | None, loss [N] float64, num_tokens [N], bad [N]) over tokenized examples, in order.

    Batches of batch_size rows, or (max_batch_tokens) rows sorted by length and cut by padded tokens (batching.py).
    """
    import torch

    from drift_stream.data.tokenization import collate

    feats, losses, counts, bad, order = [], [], [], [], []
    bar = None
    if progress and examples:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=desc, unit="seq")
    lengths = [len(ex.input_ids) for ex in examples]
    for idx in plan_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens):
        batch = collate([examples[i] for i in idx], pad_id, padding_side="right")
        if loss_only:
            loss, num = featurizer.loss_only(batch)
            row_bad = [None if n > 0 and math.isfinite(x) else "no_loss" for x, n in zip(loss.tolist(), num.tolist())]
        else:
            out = featurizer.featurize(batch)
            feats.append(out.features.float())
            loss, num, row_bad = out.loss, out.num_tokens, out.bad
        losses.append(loss.double())
        counts.append(num)
        bad.extend(row_bad)
        order.extend(idx)
        if bar is not None:
            bar.update(len(row_bad))
    if bar is not None:
        bar.close()
    if not examples:
        return None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), []
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))  # row i of the output is batch row inverse[i]
    bad = [bad[j] for j in inverse.tolist()]
    return ((None if loss_only else torch.cat(feats)[inverse]), torch.cat(losses)[inverse], torch.cat(counts)[inverse],
            bad)


class _Targets:
    """Features of a list of sequences, addressed by an owner key (a rollout or query index)."""

    def __init__(self, featurizer, examples: dict, pad_id: int, batch_size: int, desc: str, progress: bool,
                 loss_only: bool = False, featurize_all=None, max_batch_tokens: int | None = None):
        self.owners = list(examples)
        budget = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        self.features, self.loss, self.num_tokens, self.bad = (featurize_all or _featurize_all)(
            featurizer, [examples[o] for o in self.owners], pad_id, batch_size, desc, progress, loss_only, **budget)
        self.row = {owner: i for i, owner in enumerate(self.owners)}

    def ok(self, owner) -> bool:
        return owner in self.row and self.bad[self.row[owner]] is None

    def reason(self, owner) -> str | None:
        return None if owner not in self.row or self.bad[self.row[owner]] is None else f"features:{self.bad[self.row[owner]]}"


def _encode_all(items: dict, encode) -> tuple[dict, dict]:
    """({key: TokenizedExample}, {key: RowError reason}) for {key: args} through `encode(*args)`."""
    from drift_stream.data.example_types import RowError

    done, errors = {}, {}
    for key, args in items.items():
        try:
            done[key] = encode(*args)
        except RowError as exc:
            errors[key] = exc.reason
    return done, errors


def _query_row(qid, counts, rollout_loss, reference_loss, excluded, ref_error, reference_target=False) -> dict:
    n = counts["correct"] + counts["incorrect"]
    gap = None if rollout_loss is None or reference_loss is None else reference_loss - rollout_loss
    return {"id": qid, **counts, "pass_rate": counts["correct"] / n if n else None, "rollout_loss": rollout_loss,
            "reference_loss": reference_loss, "proximity_gap": gap, "excluded": excluded, "reference_error": ref_error,
            "reference_target": reference_target, "weight": None}


def _on_policy(queries, rollouts, results, feats: _Targets, encode_errors, ref_loss, ref_errors, config, tokenizer,
               refs: _Targets | None = None):
    """(manifest rows, {query id: g_j [D] float64}, parquet rows, rollout vectors [R, D] | None, {query id: target
    pass rate}). Rollouts are in (query, rollout index) order, K_j of them per query (adaptive K: K_j may vary)."""
    import torch

    rows, vectors, table, target_pass = [], {}, [], {}
    rollout_vectors = torch.zeros(len(rollouts), feats.features.shape[1] if feats.features is not None else 0) \
        if config.save_rollout_vectors else None
    groups: dict[str, list[int]] = {q.id: [] for q in queries}
    for i, r in enumerate(rollouts):
        groups[r.query_id].append(i)
    for j, q in enumerate(queries):
        idx = groups[q.id]
        failures = {i: results[i].failure or encode_errors.get(i) or feats.reason(i)
                    or ("truncated" if config.truncated == "exclude" and rollouts[i].finish_reason == "length" else None)
                    for i in idx}
        valid = [i for i in idx if failures[i] is None]
        correct = {i: results[i].reward >= config.correct_threshold - 1e-12 for i in valid}
        counts = {"correct": sum(correct.values()), "incorrect": len(valid) - sum(correct.values()),
                  "failed": len(idx) - len(valid),
                  "truncated": sum(rollouts[i].finish_reason == "length" for i in idx)}
        target_rewards, why, use_ref = contrast_plan([results[i].reward for i in valid], config.correct_threshold,
                                                     config.no_contrast, refs is not None and refs.ok(j))
        weights = None
        if why is None:
            weights, why = signed_weights(target_rewards, config.signing, config.correct_threshold)
        sign_of = dict(zip(valid, weights or []))
        if weights is not None:
            stack = feats.features[[feats.row[i] for i in valid]].double()  # [K_j, D]
            if use_ref:  # the reference as one more, correct, target: [K_j + 1, D]
                stack = torch.cat([stack, refs.features[refs.row[j]].double()[None]])
            g = (torch.tensor(weights, dtype=torch.float64) @ stack) / len(weights)  # [D]
            target_pass[q.id] = sum(r >= config.correct_threshold - 1e-12 for r in target_rewards) / len(weights)
            if float(g.norm()) > 0:
                vectors[q.id] = g
            else:
                why = "zero_vector"
        scored = [i for i in idx if feats.ok(i)]  # every rollout with a finite loss counts toward the gap
        rollout_loss = _token_mean([float(feats.loss[feats.row[i]]) for i in scored],
                                   [int(feats.num_tokens[feats.row[i]]) for i in scored])
        rows.append(_query_row(q.id, counts, rollout_loss, ref_loss.get(j), why, ref_errors.get(j), use_ref))
        for i in idx:
            r = rollouts[i]
            if rollout_vectors is not None and feats.ok(i):
                rollout_vectors[i] = feats.features[feats.row[i]]
            table.append({
                "query_id": r.query_id, "rollout_index": r.rollout_index, "prompt": tokenizer.decode(list(r.prompt_ids)),
                "completion": r.completion, "reward": results[i].reward, "correct": correct.get(i),
                "sign": sign_of.get(i), "finish_reason": r.finish_reason, "failure_reason": failures[i],
                "completion_ids": list(r.completion_ids), "num_prompt_tokens": len(r.prompt_ids),
                "num_completion_tokens": len(r.completion_ids), "mean_logprob": r.mean_logprob,
                "loss": float(feats.loss[feats.row[i]]) if feats.ok(i) else None,
            })
    return rows, vectors, table, rollout_vectors, target_pass


def _off_policy(queries, refs: _Targets, ref_errors):
    """(manifest rows, {query id: g_j [D] float64}): g_j is the feature of the query with its reference answer."""
    rows, vectors = [], {}
    zero = {"correct": 0, "incorrect": 0, "failed": 0}
    for j, q in enumerate(queries):
        why = ref_errors.get(j) or refs.reason(j)
        if why is None:
            g = refs.features[refs.row[j]].double()
            if float(g.norm()) > 0:
                vectors[q.id] = g
            else:
                why = "zero_vector"
        loss = float(refs.loss[refs.row[j]]) if refs.ok(j) else None
        rows.append(_query_row(q.id, zero, None, loss, why, ref_errors.get(j)))
    return rows, vectors


def _token_mean(losses, counts) -> float | None:
    pairs = [(x, n) for x, n in zip(losses, counts) if n > 0 and math.isfinite(x)]
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs) if pairs else None

