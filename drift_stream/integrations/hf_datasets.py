"""Hugging Face `datasets` helpers. A scorer is already a `map(batched=True)` function; these add the common steps.

    scorer = DriftScorer.from_pretrained("model_dir", bank="bank_dir", adapter="messages")
    scored = ds.map(scorer, batched=True, batch_size=64)
    kept = scored.filter(keep_positive, batched=True)
"""

from __future__ import annotations

from typing import Any


def keep_positive(batch: Any) -> list[bool]:
    """`filter(..., batched=True)` predicate: scored rows with drift_score > 0 (rejected rows have a null score)."""
    return [s is not None and s > 0 for s in batch["drift_score"]]


def keep_above(threshold: float):
    """A batched `filter` predicate keeping scored rows with drift_score > threshold."""

    def predicate(batch: Any) -> list[bool]:
        return [s is not None and s > threshold for s in batch["drift_score"]]

    return predicate


def score_dataset(dataset, scorer, *, batch_size: int = 64, calibration_rows: int | None = None):
    """`dataset.map(scorer, batched=True)` for a `Dataset` or `IterableDataset`.

    With beta: auto, the scorer is first calibrated on the first `calibration_rows` rows (default: the scorer's
    config), the same rows the CLI uses, so the two give identical scores.
    """
    if getattr(scorer.config, "beta", None) == "auto" and getattr(scorer, "beta", 0) is None:
        n = calibration_rows or scorer.config.calibration_rows
        import pyarrow as pa

        rows = list(dataset.take(n))  # Dataset and IterableDataset both iterate as dicts

        scorer.calibrate(pa.Table.from_pylist(rows))
    return dataset.map(scorer, batched=True, batch_size=batch_size)
