"""What refine fits on the whole run before it writes a row: the score checks and stats, the prefilters' counts, the
top:P cut (or one per stratum) and the weight map. refine/resume.py records the result (the plan) so that a resumed
refine reuses it instead of fitting again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import polars as pl

from drift_stream.errors import ConfigError, InputError
from drift_stream.io.columns import ID, NUM_TOKENS, SCORE
from drift_stream.io.run_dir import RunDirectory
from drift_stream.io.run_reader import read_completed_shards
from drift_stream.refine.chain import mask_scores, survivor_mask
from drift_stream.refine.selection import TopCut, stratified_cuts, top_cut
from drift_stream.refine.weight_map import WeightMap, fit_weight_map

logger = logging.getLogger(__name__)


def check_scores(lf: pl.LazyFrame, root: str) -> tuple[int, dict[str, float]]:
    stats = lf.select(
        pl.len().alias("n"),
        pl.col(SCORE).null_count().alias("nulls"),
        pl.col(SCORE).is_nan().sum().alias("nans"),
        pl.col(SCORE).cast(pl.Float64).mean().alias("mean"),
        pl.col(SCORE).cast(pl.Float64).std(ddof=0).alias("std"),
        pl.col(SCORE).min().cast(pl.Float64).alias("min"),
        pl.col(SCORE).max().cast(pl.Float64).alias("max"),
    ).collect().row(0, named=True)
    if stats["nulls"] or stats["nans"]:
        raise InputError(f"{root}/data has {stats['nulls']} null and {stats['nans']} NaN drift_score values: scored "
                         "shards must hold finite scores only (unscorable rows belong in rejects/)")
    return int(stats["n"]), {k: stats[k] for k in ("mean", "std", "min", "max")}


def fit_plan(lf: pl.LazyFrame, completed, config, policy, survive: np.ndarray | None,
              offsets: np.ndarray, src: str, run_dir: str, storage_options, allow_incomplete: bool):
    """(plan, weight map | None): what refine fits on the whole run before writing a row (refine/resume.py records
    it). lf: the run's (id, score); survive: the prefilters' mask (None: no prefilter)."""
    n, stats = check_scores(lf, src)
    if n != offsets[-1]:
        raise InputError(f"shard row counts ({offsets[-1]}) disagree with the scan ({n}) under {src}/data")
    logger.info("refine %s: %d scored rows in %d shards, policy %s", run_dir, n, len(offsets) - 1, policy)
    chained, n_policy = None, n  # rows the policy sees: all, or those the prefilters keep
    if config.prefilters:
        chained = survivor_mask(lf, config.prefilters, lambda run: read_completed_shards(
                                    RunDirectory.open(run, storage_options), allow_incomplete=allow_incomplete,
                                    command="refine").scan().select(ID, SCORE))[1]
        n_policy = int(survive.sum())
        if not n_policy:
            raise ConfigError(f"the prefilters {[str(p.run) for p in config.prefilters]} leave no row of {run_dir}")
        _, stats = check_scores(lf.filter(pl.Series(survive)), src)
    policy_scores = (lf if survive is None else lf.filter(pl.Series(survive))).select(SCORE)  # the n_policy rows
    if config.prefilters:
        lf = mask_scores(lf, survive)

    cut: dict[str, Any] | None = None
    top: TopCut | None = None
    strata = None
    wmap: WeightMap | None = None
    if policy.kind == "top":
        k = int(math.floor(policy.value * n_policy + 0.5))
        if k == 0:
            logger.warning("top:%g of %d rows keeps no row", policy.value, n_policy)
        elif config.stratify_by or config.length_buckets:
            columns = list(dict.fromkeys([ID, SCORE, *config.stratify_by]
                                         + ([NUM_TOKENS] if config.length_buckets else [])))
            cuts, groups, edges = stratified_cuts(completed.scan().select(columns).with_row_index("_row"),
                                                   k, config)
            strata = {"cuts": {key: asdict(c) for key, c in cuts.items()}, "edges": edges}
        else:
            top = top_cut(lf.with_row_index("_row"), k)
        cut = {"score": None if top is None else top.score, "id": None if top is None else top.id,
               "row": None if top is None else top.row, "rows_target": k}
        if strata is not None:
            cut["strata"] = [{"key": key.split("\x1f"), **groups[key]} for key in sorted(groups)]
            cut["length_edges"] = edges or None
    elif policy.kind in ("threshold", "positive"):
        cut = {"score": float(policy.value or 0.0)}
    else:
        wmap = fit_weight_map(policy_scores, stats, n_policy, kind=config.weight_map,
                              temperature=config.temperature, clip_z=config.clip_z,
                              batches=lambda: _policy_batches(completed, survive))
    plan = {"rows_in": n, "score_stats_in": stats, "rows_after_prefilters": n_policy, "prefilters": chained,
            "cut": cut, "top": None if top is None else asdict(top), "strata": strata}
    return plan, wmap


def _policy_batches(completed, survive: np.ndarray | None) -> Iterator[np.ndarray]:
    """The scores of the rows the policy sees, shard by shard in run order (survive: [run rows] bool or None)."""
    row = 0
    for batch in completed.iter_column(SCORE):
        yield batch if survive is None else batch[survive[row: row + batch.size]]
        row += batch.size
