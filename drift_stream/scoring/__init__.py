"""The scoring room: the engine-agnostic core, a batch of rows in and the same rows plus `drift_*` score columns out.

base.py (ScoreConfig, BatchScorer, batch types), baselines.py (random, loss, ifd), drift.py (DriftScorer: drift, less,
if; fit_beta, debias statistics), build.py (build_scorer).

exported.

Import each name from its home module; this package re-exports nothing.
"""
