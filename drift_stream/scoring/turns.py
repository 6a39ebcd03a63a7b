"""Turn-level scores (`ScoreConfig(granularity="turn")`, `score --granularity turn`): each assistant turn of a row
gets its own score, the row's score formula applied to the loss masked to that turn, in `drift_turn_scores`
(list<float32>, one per assistant turn in conversation order) beside the unchanged row score; the input weight of
each turn (`weight` / `loss_weight` of its message, else 1) in `drift_turn_input_weights`.

A turn of input weight 0 is out of the loss (data/tokenization.py) and has a null score; so has a turn the overlong
policy cut away, and a turn whose feature or loss is not finite. A text or prompt + completion row is one turn.
drift / less / if: turn k's feature is the projected gradient of turn k's mean NLL (grads/turn_features.py), scored
against the same bank with the row's beta; loss: minus turn k's mean NLL; random: U[0, 1) from (seed, id, k).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from drift_stream.io.columns import TURN_INPUT_WEIGHTS, TURN_SCORES

GRANULARITIES = ("row", "turn")
TURN_SCORERS = ("drift", "less", "if", "loss", "random")


def max_turns(examples: Sequence[Any]) -> int:
    return max((ex.num_turns for ex in examples), default=0)


def turn_index_batch(examples: Sequence[Any], length: int):
    """turn_index [B, T] long for examples collated with right padding (tokenization.collate): the example's own
    turn_index, or turn 0 on its loss tokens when it has none; -1 elsewhere."""
    import torch

    out = torch.full((len(examples), length), -1, dtype=torch.long)
    for row, ex in enumerate(examples):
        index = ex.turn_index if ex.turn_index is not None else [0 if m else -1 for m in ex.loss_mask]
        out[row, : len(index)] = torch.tensor(index, dtype=torch.long)
    return out


def turn_losses(model, batch: dict, turn_index, num_turns: int):
    """(row loss [B], turn losses [B, num_turns]) of a collated batch, no grad; NaN where a row has no turn k.
    The row loss is `example_losses(...).loss` itself (token NLLs do not change it)."""
    import torch

    from drift_stream.model.losses import example_losses

    with torch.no_grad():
        out = example_losses(model, batch, return_token_nll=True)
        nll = out.token_nll  # [B, T]
        in_loss = torch.as_tensor(batch["loss_mask"]).to(nll.device) > 0
        turns = torch.as_tensor(turn_index).to(nll.device)
        per_turn = torch.full((nll.shape[0], num_turns), float("nan"), dtype=torch.float64)
        for k in range(num_turns):
            mask = in_loss & (turns == k)
            per_turn[:, k] = (torch.where(mask, nll, 0.0).sum(dim=1) / mask.sum(dim=1)).double().cpu()
    return out.loss.double().cpu().numpy(), per_turn.numpy()


def per_example(values: np.ndarray, examples: Sequence[Any]) -> list[np.ndarray]:
    """values [n, K] -> one array [num_turns] per example (K >= every num_turns)."""
    return [values[i, : ex.num_turns].copy() for i, ex in enumerate(examples)]


def turn_columns(tokenized: Sequence[Any], turn_scores: Sequence[Any], reasons: Sequence[str | None]
                 ) -> list[tuple[str, pa.Array]]:
    """The two list columns of a scored batch: TURN_SCORES (null list on rejected rows, null entries where a turn
    is unscored) and TURN_INPUT_WEIGHTS (null list on rows that were not tokenized)."""
    scores, weights = [], []
    for tok, values, reason in zip(tokenized, turn_scores, reasons):
        if tok is None:
            weights.append(None)
        else:
            weights.append(list(tok.turn_weights) if tok.turn_weights is not None else [1.0])
        if reason is not None or values is None:
            scores.append(None)
        else:
            scores.append([float(v) if np.isfinite(v) else None for v in values])
    return [(TURN_SCORES, pa.array(scores, pa.list_(pa.float32()))),
            (TURN_INPUT_WEIGHTS, pa.array(weights, pa.list_(pa.float32())))]
