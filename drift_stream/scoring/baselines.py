"""The baseline scorers that need no bank: random (a hash of seed and row id), loss (minus the mean response NLL) and
ifd (instruction-following difficulty loss(y|x) / loss(y), rows with IFD > 1 sent to the bottom).
"""

from __future__ import annotations

import numpy as np

from drift_stream.scoring.base import (
    BatchScorer,
    ExampleScores,
    _ModelScorer,
    random_unit,
)


class RandomScorer(BatchScorer):
    name = "random"

    def _score_examples(self, examples):
        n = len(examples)
        score = np.array([random_unit(self.config.seed, ex.id) for ex in examples])
        return ExampleScores(score=score, grad_norm=np.full(n, np.nan), loss=np.full(n, np.nan), bad=[None] * n)


class LossScorer(_ModelScorer):
    name = "loss"

    def _score_examples(self, examples):
        loss, bad = self._losses(examples)
        return ExampleScores(score=-loss, grad_norm=np.full(len(loss), np.nan), loss=loss, bad=bad)


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
