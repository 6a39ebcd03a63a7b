"""Filters in sequence: drop the worst rows by another run's score before a refine policy (`refine --prefilter`).

Curation pipelines chain filters: e.g. drop the worst 20% of the pool by `loss`, then weight or rank the rest by
DRIFT. A prefilter names another scored run of the same pool and a fraction X:

  Prefilter(run="runs/loss", drop_worst=0.2)         CLI: --prefilter runs/loss 0.2   (repeatable)

Each prefilter drops floor(X * N_pre + 0.5) rows of its own run: the last ones in (score desc, id asc, position
asc) order, i.e. it keeps exactly what `top:(1 - X)` would keep of that run (same ties). Rows are joined on `id`
(a string in every run: data/formats.py); an id that repeats (identical rows share their content hash) is joined one
to one, its k-th row in run order with its k-th row in the other run, and the manifest counts such ids
(`prefilters[i].repeated_ids`). A row survives when every prefilter keeps it. The policy then runs as if the refined run held only the surviving
rows: `top:P` keeps round(P * survivors), `weights` has mean 1 over the survivors, `repeat` draws from those
weights; dropped rows are not written (with --keep-all, filter policies write them with keep = false).
A row of the refined run that a prefilter run does not hold (e.g. rejected by that scorer) is dropped, and
counted in the manifest (`prefilters[i].rows_missing`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import polars as pl

from drift_stream.errors import ConfigError
from drift_stream.io.columns import ID, SCORE
from drift_stream.refine.selection import top_cut

logger = logging.getLogger(__name__)

OCCURRENCE = "_occurrence"  # k for the k-th row (0-based, run order) of its id: with ID, the join key


@dataclass(frozen=True)
class Prefilter:
    """Drop the worst `drop_worst` fraction of rows by the score of the scored run at `run` (path or URL)."""

    run: str
    drop_worst: float

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or not self.run:
            raise ConfigError(f"prefilter run must be a run directory path or URL, got {self.run!r}")
        if isinstance(self.drop_worst, bool) or not isinstance(self.drop_worst, (int, float)) \
                or not 0.0 <= self.drop_worst < 1.0:
            raise ConfigError(f"prefilter drop_worst must be a fraction in [0, 1), got {self.drop_worst!r} for "
                              f"{self.run} (0.2 drops the worst 20%)")

    @classmethod
    def coerce(cls, value) -> "Prefilter":
        """A Prefilter from itself, a (run, fraction) pair (the CLI's two values) or a {run, drop_worst} mapping."""
        if isinstance(value, Prefilter):
            return value
        if isinstance(value, dict):
            return cls(str(value.get("run")), _fraction(value.get("drop_worst")))
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return cls(str(value[0]), _fraction(value[1]))
        raise ConfigError(f"a prefilter is (run, drop_worst fraction), got {value!r}")


def _fraction(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"prefilter drop_worst must be a number, got {value!r}") from None


def join_keys(lf: pl.LazyFrame) -> pl.LazyFrame:
    """lf with `id` as text (runs written before ids were always strings) and OCCURRENCE."""
    return lf.with_columns(pl.col(ID).cast(pl.Utf8)).with_columns(pl.int_range(pl.len()).over(ID).alias(OCCURRENCE))


def kept_ids(lf: pl.LazyFrame, drop_worst: float) -> tuple[pl.LazyFrame, dict]:
    """(rows kept by one prefilter as a LazyFrame [id, OCCURRENCE], counts). lf: the prefilter run's (id, score) in
    run order."""
    n, unique = lf.select(pl.len(), pl.col(ID).n_unique()).collect().row(0)
    repeated = lf.group_by(ID).len().filter(pl.col("len") > 1).select(pl.len()).collect().item() if n != unique else 0
    drop = int(math.floor(drop_worst * n + 0.5))
    indexed = join_keys(lf).with_row_index("_row")
    counts = {"rows": n, "repeated_ids": int(repeated), "rows_dropped": drop, "cut": None}
    if drop == 0:
        return indexed.select(ID, OCCURRENCE), counts
    cut = top_cut(indexed, n - drop)  # the last kept row in (score desc, id asc, position asc) order
    s = pl.col(SCORE).cast(pl.Float64)
    keep = (s > cut.score) | ((s == cut.score) & ((pl.col(ID) < cut.id)
                                                  | ((pl.col(ID) == cut.id) & (pl.col("_row") <= cut.row))))
    counts["cut"] = {"score": cut.score, "id": cut.id, "row": cut.row}
    return indexed.filter(keep).select(ID, OCCURRENCE), counts


def survivor_mask(lf: pl.LazyFrame, prefilters: Sequence[Prefilter],
                  read_scores: Callable[[str], pl.LazyFrame]) -> tuple[np.ndarray, list[dict]]:
    """(mask [n] bool in the order of `lf` (the refined run's id, score), one info dict per prefilter).

    read_scores(run) -> that run's (id, score) LazyFrame, read the way refine reads runs."""
    n = lf.select(pl.len()).collect().item()
    mask = np.ones(n, dtype=bool)
    info = []
    for pre in prefilters:
        kept, counts = kept_ids(read_scores(pre.run).select(ID, SCORE), pre.drop_worst)
        rows = join_keys(lf.select(ID)).with_row_index("_main")
        keys = [ID, OCCURRENCE]
        survivors = rows.join(kept, on=keys, how="semi").select("_main").collect()["_main"].to_numpy()
        present = rows.join(join_keys(read_scores(pre.run).select(ID)), on=keys, how="semi").select(pl.len()) \
            .collect().item()
        this = np.zeros(n, dtype=bool)
        this[survivors] = True
        mask &= this
        info.append({"run": pre.run, "drop_worst": pre.drop_worst, **counts, "rows_missing": int(n - present),
                     "rows_kept_of_refined_run": int(this.sum())})
        if counts["repeated_ids"]:
            logger.warning("prefilter %s repeats %d ids: the k-th row of each is joined with the k-th row of that id "
                           "in the refined run", pre.run, counts["repeated_ids"])
        if n - present:
            logger.warning("prefilter %s holds no row for %d of %d rows of the refined run: they are dropped",
                           pre.run, n - present, n)
    logger.info("prefilters keep %d of %d rows", int(mask.sum()), n)
    return mask, info


def mask_scores(lf: pl.LazyFrame, mask: np.ndarray) -> pl.LazyFrame:
    """lf (id, score) with the score of dropped rows set to -inf: they rank last and weigh exp(-inf) = 0."""
    return lf.with_columns(pl.when(pl.Series(mask)).then(pl.col(SCORE).cast(pl.Float64))
                           .otherwise(float("-inf")).alias(SCORE))
