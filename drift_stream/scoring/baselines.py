"""The baseline scorers that need no bank: random (a hash of seed and row id), loss (minus the mean response NLL) and
ifd (instruction-following difficulty loss(y|x) / loss(y), rows with IFD > 1 sent to the bottom).
"""

from __future__ import annotations

import math

import numpy as np

from drift_stream.scoring.base import (
    BatchScorer,
    ExampleScores,
    _ModelScorer,
    random_unit,
)
from drift_stream.scoring.turns import max_turns, per_example, turn_index_batch, turn_losses


class RandomScorer(BatchScorer):
    name = "random"

    def _score_examples(self, examples):
        n = len(examples)
        score = np.array([random_unit(self.config.seed, ex.id) for ex in examples])
        turns = None
        if self.config.granularity == "turn":  # turn k: U[0, 1) from (seed, "id\x1fk"); NaN on a weight-0 turn
            turns = [np.array([random_unit(self.config.seed, f"{ex.id}\x1f{k}") if w != 0 else np.nan
                               for k, w in enumerate(ex.turn_weights or (1.0,))]) for ex in examples]
        return ExampleScores(score=score, grad_norm=np.full(n, np.nan), loss=np.full(n, np.nan), bad=[None] * n,
                             turn_scores=turns)


class LossScorer(_ModelScorer):
    name = "loss"

    def _score_examples(self, examples):
        if self.config.granularity == "turn":
            return self._score_turns(examples)
        loss, bad = self._losses(examples)
        return ExampleScores(score=-loss, grad_norm=np.full(len(loss), np.nan), loss=loss, bad=bad)

    def _score_turns(self, examples):
        """Row loss and each turn's mean NLL from one forward per batch (scoring/turns.py)."""
        loss = np.full(len(examples), np.nan)
        turn_loss = np.full((len(examples), max_turns(examples)), np.nan)
        for idx, batch in self._planned(examples):
            chunk = [examples[i] for i in idx]
            index = turn_index_batch(chunk, batch["input_ids"].shape[1])
            loss[idx], turn_loss[idx, : max_turns(chunk)] = turn_losses(self.model, batch, index, max_turns(chunk))
        bad = [None if math.isfinite(v) else "nonfinite_loss" for v in loss]
        return ExampleScores(score=-loss, grad_norm=np.full(len(loss), np.nan), loss=loss, bad=bad,
                             turn_scores=per_example(-turn_loss, examples))


class IFDScorer(_ModelScorer):
    name = "ifd"

    def _score_examples(self, examples):
        loss_cond, bad = self._losses(examples)
        alone = [self.chat.response_only(ex) for ex in examples]  # the one response-only builder
        loss_alone, bad_alone = self._losses(alone)
        ifd = loss_cond / np.maximum(loss_alone, 1e-12)
        score = np.where(ifd > 1.0, -ifd, ifd)
        bad = [a or b for a, b in zip(bad, bad_alone)]
        return ExampleScores(score=score, grad_norm=np.full(len(ifd), np.nan), loss=loss_cond, bad=bad)
