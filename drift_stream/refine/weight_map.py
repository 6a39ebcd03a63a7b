"""The weight maps of the `weights` and `repeat` policies: score -> weight, mean 1 over the rows the policy sees.

Maps (T = temperature, N rows; the formulas and their bounds are in refine/policies.py's docstring):
`rank` (default) exp(Phi^-1((rank - 0.5) / N) / T); `clipped_z` exp(clip(z, -c, c) / T); `exp_z` exp(z / T), the
unbounded map of earlier versions. Phi^-1 is scipy.special.ndtri. `weight_summary` gives the spread the refine
manifest records: max weight, effective sample size (sum w)^2 / sum w^2 (Kish), the top 1%'s share of the weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.special import ndtri

from drift_stream.errors import ConfigError, InputError
from drift_stream.io.columns import SCORE

WEIGHT_MAPS = ("rank", "clipped_z", "exp_z")


@dataclass(frozen=True)
class WeightMap:
    """score -> weight for the weights / repeat policies, fitted on the rows the policy sees (`fit_weight_map`).

    z maps: weight = exp(a(s) - top - log_norm) with a = z / T (z clipped for clipped_z) and top = the largest a,
    so no term overflows. rank: a lookup table over the distinct scores (ranks are what the weight depends on)."""

    kind: str
    mean: float = 0.0
    scale: float = 1.0  # std * T
    clip: float = math.inf  # on z / T
    top: float = 0.0
    log_norm: float = 0.0
    values: np.ndarray | None = None  # rank: [u] distinct scores, ascending (float64, -0.0 as 0.0)
    table: np.ndarray | None = None  # rank: [u] the weight of each

    def __call__(self, score: np.ndarray) -> np.ndarray:
        """float64 weights, mean 1 over the fitted rows.  score: [n] -> [n]"""
        s = score.astype(np.float64)
        if self.kind == "rank":
            # a fitted score is found exactly (others: rows the policy does not use). Sorted keys: numpy's binary
            # search starts from the previous hit: 3x faster than in row order on 4M distinct scores.
            order = np.argsort(s, kind="stable")
            idx = np.empty(s.size, dtype=np.int64)
            idx[order] = np.searchsorted(self.values, s[order] + 0.0)
            return self.table[np.minimum(idx, self.values.size - 1)]
        if self.kind == "ones":
            return np.ones_like(s)
        return np.exp(np.clip((s - self.mean) / self.scale, -self.clip, self.clip) - self.top - self.log_norm)

    def to_record(self) -> dict:
        """The map's scalars as JSON (floats round-trip exactly; an infinite clip is null). rank's arrays are not in
        it: `rank_table` / `from_record(record, table)` carry them (refine/resume.py stores them as parquet)."""
        return {"kind": self.kind, "mean": self.mean, "scale": self.scale,
                "clip": None if math.isinf(self.clip) else self.clip, "top": self.top, "log_norm": self.log_norm}

    @classmethod
    def from_record(cls, record: dict, values: np.ndarray | None = None, table: np.ndarray | None = None) -> WeightMap:
        clip = math.inf if record["clip"] is None else float(record["clip"])
        return cls(record["kind"], mean=record["mean"], scale=record["scale"], clip=clip, top=record["top"],
                   log_norm=record["log_norm"], values=values, table=table)


def fit_weight_map(scores: pl.LazyFrame, stats: dict[str, float], n: int, *, kind: str = "rank",
                   temperature: float = 1.0, clip_z: float = 3.0,
                   batches: Callable[[], Iterable[np.ndarray]] | None = None) -> WeightMap:
    """The weight map `kind` (WEIGHT_MAPS) over `scores` (the [SCORE] column of the n rows the policy sees; stats:
    their mean, population std and max; T = temperature; clip_z: c of clipped_z).

    rank sorts the n scores and keeps their distinct values and the weight of each: `batches()` yields the scores in
    pieces (refine reads them shard by shard), copied into one float64 array sorted in place, whose front then holds
    the distinct values; the weights overwrite the positions array. Peak ~18 bytes a row while fitting (scores,
    change flags, positions), 16 a row after (values and weights; 8 more while a run has few distinct scores).
    Without `batches` the lazy frame is collected. The z maps need one lazy pass for their normaliser."""
    if kind not in WEIGHT_MAPS:
        raise ConfigError(f"unknown weight_map {kind!r}: use one of {', '.join(WEIGHT_MAPS)}")
    if not n or not stats["std"] > 0:  # all scores equal (or no row): every map gives 1
        return WeightMap("ones")
    if kind == "rank":
        return _fit_rank(_score_array(scores, n, batches), n, temperature)
    s = pl.col(SCORE).cast(pl.Float64)
    scale = stats["std"] * temperature
    a = (s - stats["max"]) / scale  # exp_z: exactly the earlier map, exp((s - max) / (std * T) - log_norm)
    mean, clip, top = stats["max"], math.inf, 0.0
    if kind == "clipped_z":  # z in [-c, c] is a = z / T in [-c / T, c / T]
        mean, clip = stats["mean"], clip_z / temperature
        top = min(clip, (stats["max"] - mean) / scale)
        a = ((s - mean) / scale).clip(-clip, clip) - top
    total = scores.select(a.exp().sum()).collect().item()
    return WeightMap(kind, mean=mean, scale=scale, clip=clip, top=top, log_norm=math.log(total / n))


_CHUNK = 1 << 20  # rows of the rank fit's chunked passes (the weights' normaliser sums chunk by chunk: keep it)
_PIECE = 1 << 16  # rows of its elementwise steps


def _score_array(scores: pl.LazyFrame, n: int, batches: Callable[[], Iterable[np.ndarray]] | None) -> np.ndarray:
    """The n policy scores as one writable float64 array [n], filled batch by batch (no column-sized transient)."""
    if batches is None:
        return np.array(scores.select(pl.col(SCORE).cast(pl.Float64)).collect()[SCORE].to_numpy(), np.float64)
    out = np.empty(n, dtype=np.float64)
    at = 0
    for batch in batches():
        if at + batch.size > n:
            raise InputError(f"the policy's score column has more than the {n} rows counted before")
        out[at: at + batch.size] = batch
        at += batch.size
    if at != n:
        raise InputError(f"the policy's score column has {at} rows, {n} were counted before")
    return out


def _fit_rank(ordered: np.ndarray, n: int, temperature: float) -> WeightMap:
    """rank's table from the n scores (`ordered`: [n] float64, overwritten): exp(Phi^-1((rank - 0.5) / n) / T) per
    distinct score, ties at their mean rank, mean 1 over the n rows."""
    ordered += 0.0  # -0.0 -> 0.0: one key for both zeros (WeightMap.__call__ looks scores up the same way)
    ordered.sort()
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # [u] first position of each value
    u = first.size
    for lo in range(0, u, _CHUNK):  # the distinct values to the front: first[k] >= k, so no read is overwritten
        ordered[lo: min(lo + _CHUNK, u)] = ordered[first[lo: lo + _CHUNK]]
    values = ordered[:u].copy() if 2 * u < n else ordered[:u]  # [u] ascending; few distinct: free the rest
    del ordered
    upto = first  # [u] rows with a score <= the value: first shifted down by one, in place
    for lo in range(0, u - 1, _CHUNK):
        upto[lo: min(lo + _CHUNK, u - 1)] = first[lo + 1: min(lo + _CHUNK, u - 1) + 1]
    upto[u - 1] = n

    def log_weight(end: np.ndarray, count: np.ndarray) -> np.ndarray:  # q / T; ties at their mean rank
        return ndtri((end - (count - 1) / 2 - 0.5) / n) / temperature

    top = log_weight(upto[-1:], upto[-1:] - (upto[-2:-1] if u > 1 else 0))[0]  # no exp overflows
    table, total, before = upto.view(np.float64), 0.0, 0  # the weights overwrite `upto`, chunk by chunk
    counts = np.empty(min(u, _CHUNK), dtype=np.int64)  # one chunk's rows per value, then count x weight
    for lo in range(0, u, _CHUNK):
        end = upto[lo: lo + _CHUNK]
        count = counts[: end.size]
        count[0] = end[0] - before
        np.subtract(end[1:], end[:-1], out=count[1:])
        before = int(end[-1])
        for at in range(0, end.size, _PIECE):  # elementwise, in pieces: no chunk-sized temporaries
            piece = slice(at, at + _PIECE)
            table[lo + at: lo + min(at + _PIECE, end.size)] = np.exp(log_weight(end[piece], count[piece]) - top)
        product = count.view(np.float64)  # count x weight in place: the same products and sum as count * weight
        np.multiply(count, table[lo: lo + end.size], out=product)
        total += float(product.sum())
    table /= total / n
    return WeightMap("rank", values=values, table=table)


class Moments:
    """Running count / sum / sum of squares / min / max (float64)."""

    def __init__(self) -> None:
        self.n, self.sum, self.sumsq, self.min, self.max = 0, 0.0, 0.0, math.inf, -math.inf

    def add(self, x: np.ndarray) -> None:
        if x.size:
            x = x.astype(np.float64)
            self.n += int(x.size)
            self.sum += float(x.sum())
            self.sumsq += float(np.square(x).sum())
            self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    def merge(self, other: Moments) -> None:
        """Add `other`'s rows (refine merges per-shard moments in shard order, so a resumed run sums alike)."""
        if other.n:
            self.n += other.n
            self.sum += other.sum
            self.sumsq += other.sumsq
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def to_dict(self) -> dict:
        """JSON-exact (a completion marker holds it); min / max null while empty."""
        return {"n": self.n, "sum": self.sum, "sumsq": self.sumsq, "min": self.min if self.n else None,
                "max": self.max if self.n else None}

    @classmethod
    def from_dict(cls, record: dict) -> Moments:
        out = cls()
        if record["n"]:
            out.n, out.sum, out.sumsq = int(record["n"]), float(record["sum"]), float(record["sumsq"])
            out.min, out.max = float(record["min"]), float(record["max"])
        return out

    def stats(self) -> dict[str, float] | None:
        if not self.n:
            return None
        mean = self.sum / self.n
        return {"mean": mean, "std": math.sqrt(max(self.sumsq / self.n - mean * mean, 0.0)), "min": self.min,
                "max": self.max}


def weight_summary(wmap: WeightMap, weights: Moments, scores: pl.LazyFrame, *, kind: str, temperature: float,
                   clip_z: float) -> dict | None:
    """How spread the written weights are: max, effective sample size (sum w)^2 / sum w^2 and its share of the
    rows, and the share of the total weight on the top 1% of rows (ceil(N / 100) rows, the highest scores: every
    map is monotone, so they are the highest weights too). weights: the moments of the weights written (float32);
    scores: the policy's [SCORE] column (only its top 1% is read). repeat: w are the expected copies."""
    n = weights.n
    if not n or not weights.sumsq > 0:
        return None
    k = math.ceil(n / 100)
    top = scores.select(pl.col(SCORE).top_k(k)).collect()[SCORE].to_numpy()  # [k]
    ess = min(weights.sum ** 2 / weights.sumsq, float(n))  # <= n (Cauchy-Schwarz) but for the last bit
    return {"map": kind, "temperature": temperature, "clip_z": clip_z if kind == "clipped_z" else None, "rows": n,
            "max_weight": weights.max, "effective_sample_size": ess, "effective_sample_share": ess / n,
            "top_1pct_rows": k,
            "top_1pct_weight_share": min(float(wmap(top).astype(np.float32).astype(np.float64).sum()) / weights.sum,
                                         1.0)}
