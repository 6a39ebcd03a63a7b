"""Refine per assistant turn (`RefineConfig(granularity="turn")`, a run scored with `--granularity turn`).

The policy sees every scored turn of the run (the non-null entries of `drift_turn_scores`) instead of every row:
* ``top:P``  keeps exactly round(P * N) of the N scored turns, in (turn score desc, id asc, position asc) order,
  position being the turn's place among all the run's turn entries (rows in run order, turns in conversation order);
* ``threshold:T`` / ``positive`` keep the turns scoring > T (> 0);
* ``weights`` maps each turn's score with the weight map fitted on the turn scores (mean 1 over scored turns).
A row gets `turn_keep` (list<bool>) or `turn_weights` (list<float32>), one entry per assistant turn; an unscored turn
(input weight 0, truncated, non-finite) is never kept and weighs 0. Row columns: `keep` = any turn kept (rows with no
kept turn are dropped unless --keep-all), `weight` = the mean weight of the row's scored turns. A conversation with
one bad turn therefore keeps its clean turns. Export reads the list columns (per-message weights / tokens);
repeat, --prefilter and stratification work on rows only and are refused with turns.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from drift_stream.errors import ConfigError
from drift_stream.io.atomic import atomic_parquet_writer
from drift_stream.io.columns import (
    ID,
    KEEP,
    SCORE,
    TURN_KEEP,
    TURN_SCORES,
    TURN_WEIGHTS,
    WEIGHT,
)
from drift_stream.io.schema import append_fields, conform_table
from drift_stream.refine.plan import check_scores
from drift_stream.refine.selection import TopCut, top_cut, top_mask
from drift_stream.refine.weight_map import WeightMap, fit_weight_map

GRANULARITIES = ("row", "turn")


def check_turn_config(config, policy) -> None:
    """ConfigError for what a turn-level refine cannot do."""
    if config.granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be 'row' or 'turn', got {config.granularity!r}")
    if config.granularity != "turn":
        return
    if policy.kind == "repeat":
        raise ConfigError("repeat copies whole rows: refine per turn with weights (turn_weights) or a filter")
    if config.prefilters or config.stratify_by or config.length_buckets:
        raise ConfigError("--prefilter / --stratify-by / --length-buckets work on rows, not with granularity turn")


def check_turn_shard(schema: pa.Schema, path: str) -> None:
    if TURN_SCORES not in schema.names:
        raise ConfigError(f"shard {path} has no {TURN_SCORES} column: score the run with --granularity turn "
                          "(ScoreConfig(granularity='turn')) to refine per turn")
    for name in (TURN_KEEP, TURN_WEIGHTS):
        if name in schema.names:
            raise ConfigError(f"shard {path} already has a {name!r} column; refine would overwrite it")


def turn_frame(lf: pl.LazyFrame) -> pl.LazyFrame:
    """(id, drift_score = the turn's score, _row = the turn's position among the run's turn entries) of every scored
    turn. lf: the run's rows with ID and TURN_SCORES."""
    return (lf.select(ID, pl.col(TURN_SCORES).alias(SCORE))
            .filter(pl.col(SCORE).list.len() > 0)
            .explode(SCORE)
            .with_row_index("_row")
            .filter(pl.col(SCORE).is_not_null() & pl.col(SCORE).is_not_nan()))


def fit_turn_plan(lf: pl.LazyFrame, config, policy, src: str) -> tuple[dict, WeightMap | None]:
    """The plan of a turn-level refine (as refine/plan.py's fit_plan, over turns). lf: (ID, TURN_SCORES)."""
    turns = turn_frame(lf)
    n_turns, stats = check_scores(turns.select(SCORE), src)
    if not n_turns:
        raise ConfigError(f"{src} has no scored turn to refine")
    n_rows = int(lf.select(pl.len()).collect().item())
    cut: dict[str, Any] | None = None
    top = wmap = None
    if policy.kind == "top":
        k = int(math.floor(policy.value * n_turns + 0.5))
        top = top_cut(turns, k) if k else None
        cut = {"score": None if top is None else top.score, "id": None if top is None else top.id,
               "row": None if top is None else top.row, "rows_target": k}
    elif policy.kind in ("threshold", "positive"):
        cut = {"score": float(policy.value or 0.0)}
    else:
        wmap = fit_weight_map(turns.select(SCORE), stats, n_turns, kind=config.weight_map,
                              temperature=config.temperature, clip_z=config.clip_z)
    plan = {"rows_in": n_rows, "turns_in": n_turns, "score_stats_in": stats, "rows_after_prefilters": n_rows,
            "prefilters": None, "cut": cut, "top": None if top is None else {"score": top.score, "id": top.id,
                                                                               "row": top.row}, "strata": None}
    return plan, wmap


def turn_policy_scores(lf: pl.LazyFrame) -> pl.LazyFrame:
    """The scores the turn-level weight map saw (for the manifest's weight summary)."""
    return turn_frame(lf).select(SCORE)


def write_turn_shard(batches, schema: pa.Schema, out_fs, dest: str, policy, config, top: TopCut | None,
                     wmap: WeightMap | None, first_turn: int, acc, bar) -> int:
    """One scored shard -> one refined shard, per turn. batches: the shard's record batches; first_turn: the
    position of the shard's first turn entry in the run (`turn_offsets`). Returns the rows written."""
    filtering = policy.is_filter
    out_schema = append_fields(schema, pa.field(KEEP if filtering else WEIGHT, pa.bool_() if filtering else pa.float32()),
                             pa.field(TURN_KEEP if filtering else TURN_WEIGHTS,
                                      pa.list_(pa.bool_() if filtering else pa.float32())))
    written = 0
    with atomic_parquet_writer(out_fs, dest, out_schema) as writer:
        for batch in batches:
            lists = batch.column(TURN_SCORES)
            lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            # null entries -> NaN; a null list (not in scored shards) has no entry, as in turn_frame
            flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
            scored = np.isfinite(flat)
            row_of = np.repeat(np.arange(batch.num_rows), lengths)
            positions = first_turn + np.arange(flat.size)
            if filtering:
                keep = np.zeros(flat.size, dtype=bool)
                if policy.kind == "top":
                    if top is not None and flat.size:
                        ids = batch.column(ID).take(pa.array(row_of, pa.int64()))
                        keep = top_mask(pa.RecordBatch.from_arrays([ids, pa.array(flat)], [ID, SCORE]), top, positions)
                else:
                    keep = flat > (policy.value or 0.0)
                keep &= scored
                acc.scores.add(flat[keep].astype(np.float32))
                row_keep = np.bincount(row_of, weights=keep, minlength=batch.num_rows) > 0
                table = pa.Table.from_batches([batch]).append_column(KEEP, pa.array(row_keep, pa.bool_()))
                table = table.append_column(TURN_KEEP, _split(keep, lengths, pa.bool_()))
                if not config.keep_all:
                    table = table.filter(pa.array(row_keep))
            else:
                weight = np.where(scored, wmap(np.where(scored, flat, 0.0)), 0.0).astype(np.float32)
                acc.scores.add(flat[scored].astype(np.float32))
                acc.weights.add(weight[scored])
                count = np.bincount(row_of, weights=scored, minlength=batch.num_rows)
                total = np.bincount(row_of, weights=weight.astype(np.float64), minlength=batch.num_rows)
                row_weight = np.divide(total, count, out=np.zeros(batch.num_rows), where=count > 0)
                table = pa.Table.from_batches([batch]).append_column(WEIGHT, pa.array(row_weight, pa.float32()))
                table = table.append_column(TURN_WEIGHTS, _split(weight, lengths, pa.float32()))
            writer.write(conform_table(table, out_schema))
            written += table.num_rows
            first_turn += flat.size
            bar.update(batch.num_rows)
    return written


def turn_offsets(lf: pl.LazyFrame, row_offsets: np.ndarray) -> np.ndarray:
    """[shards + 1] position of each shard's first turn entry (row_offsets: each shard's first row)."""
    lengths = lf.select(pl.col(TURN_SCORES).list.len().fill_null(0)).collect().to_series().to_numpy()
    cum = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))])
    return cum[row_offsets]


def _split(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    """values [sum(lengths)] as one list per row."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type_))
