"""What a complete score run's manifest records from its data shards, read in ONE scan by the process that settles
the run (engines/local.py `finish_run`; issue 23: O(files) bookkeeping): the ids repeated across scored rows
(`repeated_ids`) and the numbers of the terminal summary (`summary`: the score's distribution and its Spearman
correlations). `refine.report.summarize_run` then reads manifest.json instead of the data; `refine.report.gather`
(the HTML report) computes the same numbers from the data with the same functions (`score_stats`, `correlations`).

A scan of 1,000 shards on S3 costs ~3 requests per shard whether it reads one column or four, so the ids and the
summary's columns are read together: one scan per complete run instead of one for the ids plus two for the summary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from drift_stream.io.columns import GRAD_NORM, ID, NUM_TOKENS, SCORE
from drift_stream.scoring.stats import spearman

logger = logging.getLogger(__name__)

RAW = "raw score"  # S(z) x ||u(z)||^beta: the score before debiasing, recovered from two columns (not a column)
SUMMARY_COLUMNS = (SCORE, GRAD_NORM, NUM_TOKENS)  # what the summary reads besides the ids
MAX_SPEARMAN_ROWS = 1_000_000  # ranks of 1M rows take ~0.3 s; larger runs use a systematic sample
REPEATED_ID_EXAMPLES = 5


def find_debias(manifest: Mapping[str, Any] | None) -> dict | None:
    """Debiasing facts of a run manifest: `scorer_info` (beta, beta_mode, its `debias` block) or a top-level
    `debias` block."""
    if not manifest:
        return None
    for holder in (manifest, manifest.get("scorer_info")):
        if not isinstance(holder, dict):
            continue
        facts = {k: holder[k] for k in ("beta", "beta_mode") if isinstance(holder.get(k), (int, float, str))}
        if isinstance(holder.get("debias"), dict):
            facts.update(holder["debias"])
        if facts:
            return facts
    return None


def score_stats(score: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """(mean, std, min, p10, median, p90, max, positive_fraction over the finite scores; those scores as float64).
    score: [N] -> [finite]. NaN where there is no finite score."""
    finite = score[np.isfinite(score)].astype(np.float64)
    q = np.quantile(finite, [0.1, 0.5, 0.9]) if finite.size else [math.nan] * 3
    stats = {"mean": float(finite.mean()) if finite.size else math.nan,
             "std": float(finite.std()) if finite.size else math.nan,
             "min": float(finite.min()) if finite.size else math.nan, "p10": float(q[0]), "median": float(q[1]),
             "p90": float(q[2]), "max": float(finite.max()) if finite.size else math.nan,
             "positive_fraction": float((finite > 0).mean()) if finite.size else math.nan}
    return stats, finite


def sample_step(rows: int, max_rows: int) -> int:
    """Correlations use every row up to `max_rows`, else every step-th row (a systematic sample)."""
    return max(1, math.ceil(rows / max_rows))


def correlations(columns: Mapping[str, np.ndarray], beta: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(the columns that hold a finite value, plus RAW when beta != 0 and the norm is there; Spearman of the score,
    and of RAW, against the norm and the token count). columns: name -> [rows] float64 (SUMMARY_COLUMNS)."""
    data = {c: v for c, v in columns.items() if c == SCORE or np.isfinite(v).any()}  # e.g. no grad norm for `loss`
    if GRAD_NORM in data and isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta != 0:
        # the score before debiasing, recovered exactly: S(z) = raw(z) / ||u(z)||^beta (DESIGN.md section 2)
        data[RAW] = data[SCORE] * np.power(data[GRAD_NORM], float(beta))
    rho: dict[str, float] = {}
    for other in (GRAD_NORM, NUM_TOKENS):
        if other in data:
            rho[f"{SCORE}~{other}"] = spearman(data[SCORE], data[other])
            if RAW in data:
                rho[f"{RAW}~{other}"] = spearman(data[RAW], data[other])
    return data, rho


def scan_complete_run(shards: Any, manifest: Mapping[str, Any], examples: int = REPEATED_ID_EXAMPLES
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(repeated_ids, summary) of a complete run from one scan of its data shards (`shards`: io.run_reader's
    CompletedShards; `manifest`: the run's counts and scorer_info, for beta). summary is None when the shards
    have no score column (every row rejected): the summary then reads the data and says so."""
    import polars as pl

    frame = shards.read_columns([ID, *SUMMARY_COLUMNS])  # the one read of the data shards
    cols = [c for c in SUMMARY_COLUMNS if c in frame.columns]
    found = repeated_ids(frame.select(ID), examples)
    if SCORE not in cols:
        return found, None
    frame = frame.drop(ID)  # the ids are the largest column: not held while the summary is computed
    stats, _ = score_stats(frame[SCORE].to_numpy())
    step = sample_step(frame.height, MAX_SPEARMAN_ROWS)  # read here: tests lower it
    sample = frame.select(cols).gather_every(step) if step > 1 else frame.select(cols)
    del frame
    _, rho = correlations({c: sample[c].cast(pl.Float64).to_numpy() for c in cols},
                          (find_debias(manifest) or {}).get("beta"))
    return found, {"score_stats": _to_json(stats), "spearman": _to_json(rho)}


def summary_numbers(record: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(score_stats, spearman) of a manifest's `summary` block as `scan_complete_run` computed them (null -> NaN)."""
    def back(values: Mapping[str, Any]) -> dict[str, float]:
        return {k: math.nan if v is None else float(v) for k, v in values.items()}

    return back(record["score_stats"]), back(record["spearman"])


def _to_json(values: Mapping[str, float]) -> dict[str, float | None]:
    """NaN (no finite score, a constant column) as null: JSON has no NaN. The summary's numbers are finite
    otherwise (statistics of float32 values, correlations in [-1, 1]), so the record is exact."""
    return {k: None if math.isnan(v) else v for k, v in values.items()}


def repeated_ids(ids: Any, examples: int = REPEATED_ID_EXAMPLES) -> dict[str, Any]:
    """{"ids", "rows", "examples"} of the ids that occur on more than one row of `ids` (a polars frame of the ID
    column), most repeated first, ties by id.

    DESIGN.md section 4: every input column passes through and rows in = rows scored + rows rejected, so rows with a
    repeated id (identical rows share their content hash; inputs repeat their own ids) are kept as they are. The id
    is what outputs are joined on: refine --prefilter joins the k-th row of an id with the k-th row of that id in the
    other run (refine/chain.py)."""
    import polars as pl

    counts = (ids.group_by(ID).len(name="_n").filter(pl.col("_n") > 1)
              .sort(["_n", ID], descending=[True, False]))
    return {"ids": counts.height, "rows": int(counts["_n"].sum()) if counts.height else 0,
            "examples": [{"id": i, "rows": int(n)} for i, n in counts.head(examples).iter_rows()]}


def warn_repeated_ids(url: str, found: Mapping[str, Any]) -> None:
    """The warning a complete run with repeated ids logs (its manifest records `found` as `repeated_ids`)."""
    if found["ids"]:
        shown = ", ".join(f"{e['id']!r} x{e['rows']}" for e in found["examples"])
        logger.warning("%s: %d ids are repeated, on %d scored rows (e.g. %s): rows keep their ids (identical rows "
                       "share their content hash); refine --prefilter joins the k-th row of an id with the k-th row "
                       "of that id in the other run. Give such rows distinct ids in the input to join them by "
                       "meaning", url, found["ids"], found["rows"], shown)
