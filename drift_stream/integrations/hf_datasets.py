"""Hugging Face `datasets` helpers. A scorer is already a `map(batched=True)` function; these add the common steps.

    scorer = DriftScorer.from_pretrained("model_dir", bank="bank_dir", adapter="messages")
    scored = score_dataset(ds, scorer, batch_size=64)          # Dataset or IterableDataset
    kept = scored.filter(keep_positive, batched=True)

Column types. The score columns always carry their Arrow types (`drift_score`, `drift_grad_norm`, `drift_loss`
float32, `drift_num_tokens` int32, `drift_reject_reason` string, `drift_query_scores` list<float32>), whatever the
batch order (a batch of only scored or only rejected rows holds a column of nulls, which `datasets` cannot type):
`Dataset.map(scorer, batched=True)` gets an Arrow table back (the scorer reads the batch's own Arrow table);
`IterableDataset.map` passes plain dicts, so `score_dataset` maps it in Arrow format with
`features=scored_features(...)`; a direct `it.map(scorer, batched=True, features=scored_features(it.features,
scorer))` types the python path (to materialise it: `Dataset.from_generator(..., features=out.features)`).
"""

from __future__ import annotations

from typing import Any

from drift_stream.io.columns import SCORE


def keep_positive(batch: Any) -> list[bool]:
    """`filter(..., batched=True)` predicate: scored rows with drift_score > 0 (rejected rows have a null score)."""
    return [s is not None and s > 0 for s in batch[SCORE]]


def keep_above(threshold: float):
    """A batched `filter` predicate keeping scored rows with drift_score > threshold."""

    def predicate(batch: Any) -> list[bool]:
        return [s is not None and s > threshold for s in batch[SCORE]]

    return predicate


def scored_features(features, scorer):
    """`datasets.Features` of `scorer`'s output for input `features`: the input's, `id` if absent, the score columns.

    Taken from the scorer itself run on zero rows, so the types are exactly those it writes.
    """
    import datasets

    out = scorer(features.arrow_schema.empty_table())
    return datasets.Features.from_arrow_schema(out.schema)


def score_dataset(dataset, scorer, *, batch_size: int = 64, calibration_rows: int | None = None):
    """`dataset.map(scorer, batched=True)` for a `Dataset` or `IterableDataset`, with typed score columns.

    With beta: auto, the scorer is first calibrated on the first `calibration_rows` rows (default: the scorer's
    config), the same rows the CLI uses, so the two give identical scores. Raises TypeError for other objects.
    """
    import datasets
    import pyarrow as pa

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"score_dataset takes a datasets.Dataset or IterableDataset, got {type(dataset).__name__}")
    from drift_stream.scoring.beta import resolve_beta

    def head():
        n = calibration_rows or scorer.config.calibration_rows
        if isinstance(dataset, datasets.Dataset):  # the rows' own Arrow table (exact types), views included
            return dataset.select(range(min(n, len(dataset)))).with_format("arrow")[:]
        return pa.Table.from_pylist(list(dataset.take(n)))

    resolve_beta(scorer, head)  # beta: auto is fitted here (no run directory); a fixed or already fitted beta stays
    if isinstance(dataset, datasets.IterableDataset):
        features = scored_features(dataset.features or dataset._resolve_features().features, scorer)
        # Arrow batches in and out: the scorer's typed table reaches python and Arrow iteration (to_parquet) alike;
        # a python-format map with features= is not cast on the Arrow path (datasets 5.2).
        arrow = dataset.with_format("arrow").map(scorer, batched=True, batch_size=batch_size, features=features)
        return arrow.with_format(None)
    return dataset.map(scorer, batched=True, batch_size=batch_size)
