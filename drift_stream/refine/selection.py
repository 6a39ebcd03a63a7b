"""Which rows `top:P` keeps: one global cut, or one cut per stratum (`--stratify-by`, `--length-buckets`).

Order is (score desc, id asc, position in run asc), so exactly round(P * N) rows are kept even with ties; a cut is
found from the run's (id, score) columns alone, lazily with polars, and applied shard by shard. Ids compare as text
(runs written before every id was a string may hold int64 or null ids: as "7" and "").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from drift_stream.errors import ConfigError
from drift_stream.io.columns import ID, NUM_TOKENS, SCORE


@dataclass(frozen=True)
class TopCut:
    """The last kept row in (score desc, id asc, position asc) order."""

    score: float
    id: str
    row: int


def top_cut(lf: pl.LazyFrame, k: int) -> TopCut:
    """The k-th row (1-based) in (score desc, id asc, position asc) order. lf: (id, score, _row = position in run)."""
    v = lf.select(pl.col(SCORE).top_k(k).min().cast(pl.Float64)).collect().item()
    n_above = lf.filter(pl.col(SCORE) > v).select(pl.len()).collect().item()
    tied = (lf.select(pl.col(ID).cast(pl.Utf8).fill_null(""), SCORE, "_row").filter(pl.col(SCORE) == v)
            .sort([ID, "_row"]).slice(k - n_above - 1, 1).collect())
    return TopCut(float(v), str(tied[ID][0]), int(tied["_row"][0]))


def top_mask(batch: pa.RecordBatch, cut: TopCut, positions: np.ndarray) -> np.ndarray:
    """Rows at or above the cut. positions: [rows] each row's position in the whole run (ties break on it)."""
    score = batch.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
    keep = score > cut.score
    tied = np.flatnonzero(score == cut.score)
    if tied.size:
        ids = pc.fill_null(pc.take(batch.column(ID), pa.array(tied)).cast(pa.string()), "")
        before = pc.less(ids, cut.id).to_numpy(zero_copy_only=False)
        same = pc.equal(ids, cut.id).to_numpy(zero_copy_only=False)
        keep[tied] = before | (same & (positions[tied] <= cut.row))
    return keep


STRATUM = "_stratum"
MAX_STRATA = 10_000


def stratum_expr(config, edges: list[float]) -> pl.Expr:
    """config: a RefineConfig (stratify_by, length_buckets). One string key per row: the stratify_by columns' values, plus the length bucket when asked."""
    parts = [pl.col(c).cast(pl.Utf8).fill_null("<null>") for c in config.stratify_by]
    if config.length_buckets:
        bucket = pl.lit(0, pl.Int64)
        for edge in edges:
            bucket = bucket + (pl.col(NUM_TOKENS).cast(pl.Float64) > edge).cast(pl.Int64)
        parts.append(pl.concat_str([pl.lit("len"), bucket.cast(pl.Utf8)]))
    return pl.concat_str(parts, separator="\x1f").alias(STRATUM)


def allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split `total` kept rows over strata in proportion to their sizes (largest remainders, ties by name)."""
    n = sum(sizes.values())
    exact = {s: total * size / n for s, size in sizes.items()}
    counts = {s: int(math.floor(x)) for s, x in exact.items()}
    order = sorted(sizes, key=lambda s: (-(exact[s] - counts[s]), s))
    for s in order[: total - sum(counts.values())]:
        counts[s] += 1
    return counts


def stratified_cuts(lf: pl.LazyFrame, k: int, config) -> tuple[dict[str, TopCut], dict, list]:
    """Per-stratum top cuts. lf: the run's (id, score, _row, stratify columns, drift_num_tokens)."""
    edges: list[float] = []
    if config.length_buckets:
        qs = [i / config.length_buckets for i in range(1, config.length_buckets)]
        edges = [float(lf.select(pl.col(NUM_TOKENS).cast(pl.Float64).quantile(q, "linear")).collect().item())
                 for q in qs]
    keyed = lf.with_columns(stratum_expr(config, edges))
    sizes = dict(keyed.group_by(STRATUM).len().collect().iter_rows())
    if len(sizes) > MAX_STRATA:
        raise ConfigError(f"--stratify-by {','.join(config.stratify_by)} makes {len(sizes)} groups (max "
                          f"{MAX_STRATA}): stratify by a coarser column")
    counts = allocate(k, sizes)
    cuts = {s: top_cut(keyed.filter(pl.col(STRATUM) == s), c) for s, c in sorted(counts.items()) if c > 0}
    info = {s: {"rows": sizes[s], "kept": counts[s]} for s in sorted(sizes)}
    return cuts, info, edges


def stratified_mask(batch: pa.RecordBatch, cuts: dict[str, TopCut], config, edges: list[float],
                     first_row: int) -> np.ndarray:
    keys = pl.from_arrow(pa.Table.from_batches([batch])).select(stratum_expr(config, edges))[STRATUM].to_numpy()
    keep = np.zeros(batch.num_rows, dtype=bool)
    for key in np.unique(keys):
        cut = cuts.get(key)
        if cut is not None:
            rows = np.flatnonzero(keys == key)
            keep[rows] = top_mask(batch.take(pa.array(rows)), cut, first_row + rows)
    return keep
