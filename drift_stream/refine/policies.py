"""Refinement policies over a scored run directory: keep, weight or repeat rows by `drift_score`.

Policies (DESIGN.md section 2):

* ``top:P``        keep the top fraction P of rows by score over the whole run: exactly round(P * N) rows
                   (half rounds up); ties on the score are broken by `id`, then by position in the run.
* ``threshold:T``  keep rows with score > T.
* ``positive``     keep rows with score > 0.
* ``weights``      keep every row and add ``weight`` (float32), mean 1 over the rows the policy sees, from one of
                   three maps of the score s (``weight_map``; T = ``temperature``; N rows):
                   - ``rank`` (default): q = Phi^-1((rank(s) - 0.5) / N), ties given their average rank;
                     weight = exp(q / T) / mean. The weights are log-normal whatever the scores: the top row
                     weighs exp(Phi^-1(1 - 0.5 / N) / T) / mean (22 at N = 3,000, T = 1), the effective sample
                     size tends to N exp(-1 / T^2) (37% of the rows at T = 1), and a row's weight depends on its
                     rank only, so one outlier moves no other weight beyond the shift of ranks.
                   - ``clipped_z``: z = (s - mean) / std (population std) clipped to [-c, c] (``clip_z``, default 3);
                     weight = exp(z / T) / mean: at most exp(c / T) / mean, and exp(2c / T) times the smallest.
                   - ``exp_z``: weight = exp(z / T) / mean, unclipped (the map of earlier versions): one outlier
                     among N rows reaches z ~ sqrt(N) and can take most of the weight.
                   Every map is monotone non-decreasing in the score. Low temperature -> sharper weights.
* ``repeat``       integer copies from the same weights: ``floor(w) + Bernoulli(w - floor(w))`` drawn from ``seed``;
                   each row is written that many times, shuffled across the output shards. No weight column
                   (a trainer that reads weights would count them twice).

Only the (id, score) columns of the whole run are ever scanned at once (polars, lazily); rows stream shard by shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.errors import ConfigError, InputError, RunDirMismatchError
from drift_stream.io.atomic import atomic_parquet_writer, write_bytes_atomic
from drift_stream.io.columns import ID, KEEP, NUM_TOKENS, SCORE, WEIGHT
from drift_stream.io.manifest import provenance
from drift_stream.io.run_dir import RunDirectory, open_path
from drift_stream.io.run_reader import read_completed_shards
from drift_stream.io.schema import conform_table, one_output_schema
from drift_stream.refine.chain import Prefilter, mask_scores, survivor_mask
from drift_stream.refine.selection import (
    TopCut,
    stratified_cuts,
    stratified_mask,
    top_cut,
    top_mask,
)
from drift_stream.refine.weight_map import (
    WEIGHT_MAPS,
    Moments,
    WeightMap,
    fit_weight_map,
    weight_summary,
)

logger = logging.getLogger(__name__)

POLICY_KINDS = ("top", "threshold", "positive", "weights", "repeat")
FILTER_KINDS = ("top", "threshold", "positive")
BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Policy:
    """A refinement policy; build it from a string with `Policy.parse("top:0.1")`."""

    kind: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ConfigError(f"unknown refine policy {self.kind!r}: use one of top:P, threshold:T, positive, "
                              "weights, repeat")
        if self.kind in ("top", "threshold"):
            if self.value is None or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
                raise ConfigError(f"policy {self.kind} needs a finite number, got {self.value!r} "
                                  f"(e.g. {'top:0.1' if self.kind == 'top' else 'threshold:0.0'})")
            if self.kind == "top" and not 0.0 < self.value <= 1.0:
                raise ConfigError(f"top fraction must be in (0, 1], got {self.value} (top:0.1 keeps the top 10%)")
        elif self.value is not None:
            raise ConfigError(f"policy {self.kind} takes no value, got {self.kind}:{self.value}")

    @classmethod
    def parse(cls, spec: str | Policy) -> Policy:
        """Parse ``top:P``, ``threshold:T``, ``positive``, ``weights`` or ``repeat``."""
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"refine policy must be a non-empty string such as 'top:0.1', got {spec!r}")
        kind, sep, raw = spec.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in POLICY_KINDS:
            raise ConfigError(f"unknown refine policy {spec!r}: use one of top:P, threshold:T, positive, weights, "
                              "repeat")
        if not sep:
            return cls(kind)
        if kind not in ("top", "threshold"):
            raise ConfigError(f"policy {kind} takes no value, got {spec!r}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"policy {kind} needs a number after ':', got {raw!r} in {spec!r}") from None
        return cls(kind, value)

    @property
    def is_filter(self) -> bool:
        return self.kind in FILTER_KINDS

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        text = repr(float(self.value))  # shortest text that parses back to the same float
        return f"{self.kind}:{text.removesuffix('.0')}"


@dataclass(frozen=True)
class RefineConfig:
    """Resolved refine settings; recorded in the refine manifest and compared on reruns."""

    policy: str
    seed: int = 0
    temperature: float = 1.0
    keep_all: bool = False
    stratify_by: tuple[str, ...] = ()  # top:P inside each group of these columns (keeps the pool's mix)
    length_buckets: int = 0  # with stratify_by: also split by quantile bucket of drift_num_tokens
    prefilters: tuple[Prefilter, ...] = ()  # --prefilter RUN X: drop the worst X by RUN's score first (chain.py)
    weight_map: str = "rank"  # weights / repeat: rank | clipped_z | exp_z (module docstring)
    clip_z: float = 3.0  # weight_map clipped_z: z is clipped to [-clip_z, clip_z]

    def __post_init__(self) -> None:
        policy = Policy.parse(self.policy)
        object.__setattr__(self, "stratify_by", tuple(self.stratify_by))
        object.__setattr__(self, "prefilters", tuple(Prefilter.coerce(p) for p in self.prefilters))
        if self.prefilters and (self.stratify_by or self.length_buckets):
            raise ConfigError("--prefilter does not combine with --stratify-by / --length-buckets")
        if (self.stratify_by or self.length_buckets) and policy.kind != "top":
            raise ConfigError(f"--stratify-by / --length-buckets only apply to top:P, not {policy}")
        if not isinstance(self.length_buckets, int) or self.length_buckets < 0 or self.length_buckets == 1:
            raise ConfigError(f"length_buckets must be 0 (off) or >= 2, got {self.length_buckets!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature <= 0:
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.weight_map not in WEIGHT_MAPS:
            raise ConfigError(f"unknown weight_map {self.weight_map!r}: use one of {', '.join(WEIGHT_MAPS)}")
        if not isinstance(self.clip_z, (int, float)) or isinstance(self.clip_z, bool) \
                or not math.isfinite(self.clip_z) or self.clip_z <= 0:
            raise ConfigError(f"clip_z must be a finite number > 0, got {self.clip_z!r} (3 clips z to [-3, 3])")
        if self.keep_all and not policy.is_filter:
            raise ConfigError(f"keep_all (--keep-all) only applies to top/threshold/positive, not {policy}")


# ---------------------------------------------------------------------------------------------------------- I/O


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """The JSON object at `path`, or None when the file does not exist."""
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e


def _iter_batches(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[pa.RecordBatch]:
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            yield from pf.iter_batches(batch_size=BATCH_ROWS)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read shard {path}: {e}") from e


def _shard_schema(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Schema, int]:
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read shard {path}: {e}") from e


def _add_field(schema: pa.Schema, field: pa.Field) -> pa.Schema:
    """Append `field`; keep the metadata, updating a `datasets` feature list so HF readers see the new column."""
    meta = dict(schema.metadata or {})
    if b"huggingface" in meta:
        try:
            hf = json.loads(meta[b"huggingface"])
            feats = hf.get("info", {}).get("features")
            if isinstance(feats, dict):
                dtype = {pa.bool_(): "bool", pa.float32(): "float32"}[field.type]
                feats[field.name] = {"dtype": dtype, "_type": "Value"}
                meta[b"huggingface"] = json.dumps(hf).encode()
        except ValueError:
            del meta[b"huggingface"]
    return schema.append(field).with_metadata(meta)


# ------------------------------------------------------------------------------------------------------- policies


def _check_scores(lf: pl.LazyFrame, root: str) -> tuple[int, dict[str, float]]:
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



# ------------------------------------------------------------------------------------------------------- refine_run


def refine_run(run_dir: str, policy: str | Policy, out: str, *, seed: int = 0, temperature: float = 1.0,
               keep_all: bool = False, stratify_by: tuple[str, ...] | list[str] = (), length_buckets: int = 0,
               storage_options: dict | None = None, progress: bool = True, allow_incomplete: bool = False,
               prefilters: tuple = (), weight_map: str = "rank", clip_z: float = 3.0) -> dict:
    """Apply `policy` to the scored shards of `run_dir`, write `out/data/train-*.parquet` and `out/manifest.json`.

    Only finished input files are read (`io.run_reader.read_completed_shards`); a run with unfinished input files
    is refused (IncompleteRunError naming them and the command that completes the run) unless `allow_incomplete`,
    in which case the finished part is refined and the manifest records `source_fraction_files` < 1.
    prefilters: Prefilter(run, drop_worst) or (run, fraction) pairs, applied first (filters in sequence, chain.py).
    weight_map, clip_z: the weights / repeat map of the score (module docstring); the manifest's `weight_summary`
    gives the spread of the weights written (max, effective sample size, the top 1% of rows' share).
    Returns the refine manifest (schemas/refine_manifest.schema.json).
    """
    from tqdm.auto import tqdm

    policy = Policy.parse(policy)
    config = RefineConfig(str(policy), seed=seed, temperature=float(temperature), keep_all=keep_all,
                          stratify_by=tuple(stratify_by), length_buckets=int(length_buckets),
                          prefilters=tuple(prefilters), weight_map=weight_map, clip_z=clip_z)
    source_run = RunDirectory.open(run_dir, storage_options)
    src_fs, src = source_run.fs, source_run.root
    out_fs, dst = open_path(out, storage_options)
    if src_fs.unstrip_protocol(src) == out_fs.unstrip_protocol(dst):
        raise ConfigError(f"refine output {out} is the run directory itself: pass another --out")
    source = str(run_dir) if "://" in str(run_dir) else os.path.abspath(run_dir)
    old = read_json(out_fs, f"{dst}/manifest.json")
    recorded = json.loads(json.dumps(asdict(config)))  # as manifest.json holds it (tuples become lists)
    if old is not None and (old.get("config"), old.get("source_run")) != (recorded, source):
        raise RunDirMismatchError(
            f"{out} holds a refine of {old.get('source_run')} with config {old.get('config')}; this one is of "
            f"{source} with {recorded}: choose another --out or delete it")

    completed = read_completed_shards(source_run, allow_incomplete=allow_incomplete, command="refine")
    shards = completed.data_files
    if not shards:
        raise InputError(f"{run_dir} has no finished input file: nothing to refine")
    schemas, counts = zip(*(_shard_schema(src_fs, s) for s in shards))
    for path, schema in zip(shards, schemas):
        missing = [c for c in (ID, SCORE) if c not in schema.names]
        if missing:
            raise InputError(f"shard {path} has no {', '.join(missing)} column: refine needs scored shards")
        added = KEEP if policy.is_filter else WEIGHT if policy.kind == "weights" else None
        if added and added in schema.names:
            raise ConfigError(f"shard {path} already has a {added!r} column; refine would overwrite it. "
                              "Drop the column first or refine with another policy")
        needed = list(config.stratify_by) + ([NUM_TOKENS] if config.length_buckets else [])
        absent = [c for c in needed if c not in schema.names]
        if absent:
            raise ConfigError(f"shard {path} has no column {', '.join(absent)} to stratify by; columns: "
                              f"{', '.join(schema.names)}")
    # One schema out: shards written by other tools or older versions may differ (column sets, string / list
    # flavours); every refined shard gets their union (io/schema.py), nulls where a shard lacked a column.
    schemas = one_output_schema(schemas)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    lf = completed.scan().select(ID, SCORE)
    n, stats = _check_scores(lf, src)
    if n != offsets[-1]:
        raise InputError(f"shard row counts ({offsets[-1]}) disagree with the scan ({n}) under {src}/data")
    logger.info("refine %s: %d scored rows in %d shards, policy %s", run_dir, n, len(shards), policy)
    survive, chained, n_policy = None, None, n  # rows the policy sees: all, or those the prefilters keep
    if config.prefilters:
        survive, chained = survivor_mask(lf, config.prefilters, lambda run: read_completed_shards(
                                             RunDirectory.open(run, storage_options), allow_incomplete=allow_incomplete,
                                             command="refine").scan().select(ID, SCORE))
        n_policy = int(survive.sum())
        if not n_policy:
            raise ConfigError(f"the prefilters {[str(p.run) for p in config.prefilters]} leave no row of {run_dir}")
        _, stats = _check_scores(lf.filter(pl.Series(survive)), src)
    policy_scores = (lf if survive is None else lf.filter(pl.Series(survive))).select(SCORE)  # the n_policy rows
    if config.prefilters:
        lf = mask_scores(lf, survive)

    cut: dict[str, Any] | None = None
    top: TopCut | None = None
    strata: tuple[dict[str, TopCut], list[float]] | None = None
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
            strata = (cuts, edges)
        else:
            top = top_cut(lf.with_row_index("_row"), k)
        cut = {"score": None if top is None else top.score, "id": None if top is None else top.id,
               "row": None if top is None else top.row, "rows_target": k}
        if strata is not None:
            cut["strata"] = [{"key": key.split("\x1f"), **groups[key]} for key in sorted(groups)]
            cut["length_edges"] = strata[1] or None
    elif policy.kind in ("threshold", "positive"):
        cut = {"score": float(policy.value or 0.0)}
    else:
        wmap = fit_weight_map(policy_scores, stats, n_policy, kind=config.weight_map,
                              temperature=config.temperature, clip_z=config.clip_z)

    num_out = len(shards)
    names = [f"{dst}/data/train-{i:05d}-of-{num_out:05d}.parquet" for i in range(num_out)]
    bar = tqdm(total=n, unit="rows", desc=f"refine {policy}", disable=not progress, dynamic_ncols=True)
    acc = _Accumulator()
    try:
        if policy.kind == "repeat":
            written = _write_repeat(src_fs, shards, schemas, out_fs, names, wmap, config, bar, acc, survive)
        else:
            written = []
            for i, (path, schema) in enumerate(zip(shards, schemas)):
                written.append(_write_shard(src_fs, path, schema, out_fs, names[i], policy, config, top, wmap,
                                            int(offsets[i]), bar, acc, strata, survive))
    finally:
        bar.close()

    manifest = {
        **provenance("refine"),
        "source_run": source,
        "source_rows_rejected": completed.rows_rejected,
        "source_fraction_files": completed.fraction_files,
        "policy": {"spec": str(policy), "kind": policy.kind, "value": policy.value},
        "config": recorded,
        "rows_in": n,
        "rows_kept": acc.kept,
        "rows_written": int(sum(written)),
        "cut": cut,
        "score_stats_in": stats,
        "score_stats_kept": acc.score_stats(),
        "weight_stats": acc.weight_stats() if wmap is not None else None,
        "weight_summary": weight_summary(wmap, acc.weights, policy_scores, kind=config.weight_map,
                                         temperature=config.temperature, clip_z=config.clip_z) if wmap is not None else None,
        "repeat": ({"copies_total": int(sum(written)), "rows_with_copies": acc.kept,
                    "expected_copies": float(n_policy)} if policy.kind == "repeat" else None),
        "prefilters": chained,
        "rows_after_prefilters": n_policy,
        "shards": [{"path": f"data/{os.path.basename(p)}", "rows": int(r)} for p, r in zip(names, written)],
    }
    write_bytes_atomic(out_fs, f"{dst}/manifest.json", json.dumps(manifest, indent=2).encode())
    logger.info("refine %s -> %s: kept %d of %d rows, wrote %d", run_dir, out, acc.kept, n, manifest["rows_written"])
    if not completed.complete:
        logger.warning("refined an incomplete run: %s", completed.describe())
    return manifest


class _Accumulator:
    """Kept-row count, moments of kept scores and of weights."""

    def __init__(self) -> None:
        self.scores, self.weights = Moments(), Moments()

    @property
    def kept(self) -> int:
        return self.scores.n

    def score_stats(self) -> dict[str, float] | None:
        return self.scores.stats()

    def weight_stats(self) -> dict[str, float] | None:
        return self.weights.stats()


def _write_shard(src_fs, path: str, schema: pa.Schema, out_fs, dest: str, policy: Policy, config: RefineConfig,
                 top: TopCut | None, wmap: WeightMap | None, first_row: int, bar, acc,
                 strata: tuple[dict[str, TopCut], list[float]] | None = None, survive: np.ndarray | None = None) -> int:
    """One input shard -> one output shard for the filter and weights policies; returns rows written.
    survive: [run rows] bool, the rows the prefilters keep (None: all)."""
    column = KEEP if policy.is_filter else WEIGHT
    out_schema = _add_field(schema, pa.field(column, pa.bool_() if policy.is_filter else pa.float32()))
    written = 0
    with atomic_parquet_writer(out_fs, dest, out_schema) as writer:
        for batch in _iter_batches(src_fs, path):
            score = batch.column(SCORE).to_numpy(zero_copy_only=False)
            if policy.kind == "top":
                if strata is not None:
                    keep = stratified_mask(batch, strata[0], config, strata[1], first_row)
                elif top is not None:
                    keep = top_mask(batch, top, first_row + np.arange(batch.num_rows))
                else:
                    keep = np.zeros(len(score), dtype=bool)
            elif policy.is_filter:
                keep = score.astype(np.float64) > (policy.value or 0.0)
            alive = np.ones(batch.num_rows, dtype=bool) if survive is None else \
                survive[first_row: first_row + batch.num_rows]
            if policy.is_filter:
                keep = keep & alive
                acc.scores.add(score[keep])
                table = pa.Table.from_batches([batch]).append_column(KEEP, pa.array(keep, pa.bool_()))
                if not config.keep_all:
                    table = table.filter(pa.array(keep))
            else:
                weight = wmap(score).astype(np.float32)
                acc.scores.add(score[alive])
                acc.weights.add(weight[alive])
                table = pa.Table.from_batches([batch]).append_column(WEIGHT, pa.array(weight, pa.float32()))
                if survive is not None:  # rows the prefilters drop are not written
                    table = table.filter(pa.array(alive))
            writer.write(conform_table(table, out_schema))
            written += table.num_rows
            first_row += batch.num_rows
            bar.update(batch.num_rows)
    return written


def _write_repeat(src_fs, shards: list[str], schemas, out_fs, names: list[str], wmap: WeightMap,
                  config: RefineConfig, bar, acc, survive: np.ndarray | None = None) -> list[int]:
    """Two-pass external shuffle: copies go to random buckets on local disk, then each bucket is permuted."""
    num_out = len(names)
    schema = schemas[0]  # one_output_schema: the same for every shard
    with tempfile.TemporaryDirectory(prefix="drift-repeat-") as tmp:
        parts: list[list[str]] = [[] for _ in range(num_out)]
        first_row = 0
        for i, path in enumerate(shards):
            rng = np.random.default_rng([config.seed, 0, i])
            writers: dict[int, pq.ParquetWriter] = {}
            for batch in _iter_batches(src_fs, path):
                score = batch.column(SCORE).to_numpy(zero_copy_only=False)
                weight = wmap(score)
                alive = np.ones(len(weight), dtype=bool) if survive is None else \
                    survive[first_row: first_row + len(weight)]
                first_row += len(weight)
                weight = np.where(alive, weight, 0.0)  # rows the prefilters drop get no copy
                base = np.floor(weight)
                copies = (base + (rng.random(len(weight)) < weight - base)).astype(np.int64)
                acc.scores.add(score[copies > 0])
                acc.weights.add(weight[alive].astype(np.float32))
                index = np.repeat(np.arange(len(copies)), copies)
                bucket = rng.integers(0, num_out, size=index.size)
                table = pa.Table.from_batches([batch]).take(pa.array(index))
                for b in np.unique(bucket):
                    if b not in writers:
                        part = os.path.join(tmp, f"bucket-{b:05d}-part-{i:05d}.parquet")
                        parts[b].append(part)
                        writers[b] = pq.ParquetWriter(part, schema)
                    writers[b].write_table(conform_table(table.filter(pa.array(bucket == b)), schema))
                bar.update(batch.num_rows)
            for w in writers.values():
                w.close()
        written = []
        for b, dest in enumerate(names):
            table = (pa.concat_tables([pq.read_table(p) for p in parts[b]]) if parts[b]
                     else schema.empty_table())
            perm = np.random.default_rng([config.seed, 1, b]).permutation(table.num_rows)
            with atomic_parquet_writer(out_fs, dest, schema) as writer:
                writer.write(table.take(pa.array(perm, pa.int64())))
            written.append(table.num_rows)
            for p in parts[b]:
                os.remove(p)
    return written
