"""The scoring room: the engine-agnostic core, a batch of rows in and the same rows plus `drift_*` score columns out.

base.py (ScoreConfig, BatchScorer, batch types), baselines.py (random, loss, ifd), drift.py (DriftScorer: drift, less,
if; fit_beta, debias statistics), build.py (build_scorer).

`from drift_stream.scoring import X` keeps working for every name the former module drift_stream/scoring.py
exported.
"""

from drift_stream.scoring.base import (
    GRADIENT_SCORERS,
    SCORE_COLUMNS,
    SCORERS,
    BatchScorer,
    ExampleScores,
    ScoreConfig,
    chat_tokenizer_for,
    random_unit,
)
from drift_stream.scoring.baselines import IFDScorer, LossScorer, RandomScorer
from drift_stream.scoring.build import build_scorer
from drift_stream.scoring.drift import DriftScorer, debias_stats, fit_beta
from drift_stream.stats import spearman

__all__ = [
    "GRADIENT_SCORERS", "SCORE_COLUMNS", "SCORERS", "BatchScorer", "DriftScorer", "ExampleScores", "IFDScorer",
    "LossScorer", "RandomScorer", "ScoreConfig", "build_scorer", "chat_tokenizer_for", "debias_stats", "fit_beta",
    "random_unit", "spearman",
]
