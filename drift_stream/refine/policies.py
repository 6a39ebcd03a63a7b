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
                   each row is written that many times, shuffled across the output shards (a uniformly random
                   shard per copy, each shard a uniformly random permutation), by a two-pass external shuffle in
                   bounded memory (refine/repeat.py). No weight column (a trainer that reads weights would count
                   them twice).

Only the (id, score) columns of the whole run are ever scanned at once (polars, lazily); rows stream shard by shard.
Resumable: a completion marker per output shard, the fitted cut / weight map recorded before the first row is
written, a rerun with other settings refused (refine/resume.py; refine/plan.py fits the plan).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.bank.checkpoint import kill_point
from drift_stream.errors import ConfigError, InputError, RunDirMismatchError
from drift_stream.io.atomic import atomic_parquet_writer
from drift_stream.io.columns import ID, KEEP, NUM_TOKENS, SCORE, TURN_SCORES, WEIGHT
from drift_stream.io.manifest import provenance
from drift_stream.io.run_dir import RunDirectory, open_path
from drift_stream.io.run_reader import read_completed_shards
from drift_stream.io.schema import append_fields, conform_table, one_output_schema
from drift_stream.refine.chain import Prefilter, survivor_mask
from drift_stream.refine.plan import fit_plan
from drift_stream.refine.repeat import write_repeat
from drift_stream.refine.resume import RefineOutput, source_identities
from drift_stream.refine.selection import (
    TopCut,
    stratified_mask,
    top_mask,
)
from drift_stream.refine.turns import (
    check_turn_config,
    check_turn_shard,
    fit_turn_plan,
    turn_offsets,
    turn_policy_scores,
    write_turn_shard,
)
from drift_stream.refine.weight_map import (
    WEIGHT_MAPS,
    Moments,
    WeightMap,
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
    granularity: str = "row"  # turn: the policy over assistant turns (drift_turn_scores; refine/turns.py)

    def __post_init__(self) -> None:
        policy = Policy.parse(self.policy)
        check_turn_config(self, policy)
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


def _iter_batches(fs: fsspec.AbstractFileSystem, path: str, rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    try:
        with fs.open(path, "rb") as f:
            # pre_buffer (pyarrow's default) reads every row group asked for in one go: the whole shard held at once
            pf = pq.ParquetFile(f, pre_buffer=False)
            yield from pf.iter_batches(batch_size=rows)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read shard {path}: {e}") from e


def _shard_schema(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Schema, int]:
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read shard {path}: {e}") from e


# ------------------------------------------------------------------------------------------------------- policies


# ------------------------------------------------------------------------------------------------------- refine_run


def refine_run(run_dir: str, policy: str | Policy, out: str, *, seed: int = 0, temperature: float = 1.0,
               keep_all: bool = False, stratify_by: tuple[str, ...] | list[str] = (), length_buckets: int = 0,
               storage_options: dict | None = None, progress: bool = True, allow_incomplete: bool = False,
               prefilters: tuple = (), weight_map: str = "rank", clip_z: float = 3.0, granularity: str = "row") -> dict:
    """Apply `policy` to the scored shards of `run_dir`, write `out/data/train-*.parquet` and `out/manifest.json`.

    Only finished input files are read (`io.run_reader.read_completed_shards`); a run with unfinished input files
    is refused (IncompleteRunError naming them and the command that completes the run) unless `allow_incomplete`,
    in which case the finished part is refined and the manifest records `source_fraction_files` < 1.
    prefilters: Prefilter(run, drop_worst) or (run, fraction) pairs, applied first (filters in sequence, chain.py).
    weight_map, clip_z: the weights / repeat map of the score (module docstring); the manifest's `weight_summary`
    gives the spread of the weights written (max, effective sample size, the top 1% of rows' share).
    granularity "turn": the policy over the run's scored assistant turns (refine/turns.py; weight stats over turns).
    Resumable (refine/resume.py): a rerun with the same settings skips the output shards that have a completion
    marker and reuses the recorded cut / weight map; other settings or changed source shards are refused
    (RunDirMismatchError). Returns the refine manifest (schemas/refine_manifest.schema.json).
    """
    from tqdm.auto import tqdm

    policy = Policy.parse(policy)
    config = RefineConfig(str(policy), seed=seed, temperature=float(temperature), keep_all=keep_all,
                          stratify_by=tuple(stratify_by), length_buckets=int(length_buckets),
                          prefilters=tuple(prefilters), weight_map=weight_map, clip_z=clip_z, granularity=granularity)
    turns = config.granularity == "turn"
    source_run = RunDirectory.open(run_dir, storage_options)
    src_fs, src = source_run.fs, source_run.root
    out_fs, dst = open_path(out, storage_options)
    if src_fs.unstrip_protocol(src) == out_fs.unstrip_protocol(dst):
        raise ConfigError(f"refine output {out} is the run directory itself: pass another --out")
    source = str(run_dir) if "://" in str(run_dir) else os.path.abspath(run_dir)
    old = read_json(out_fs, f"{dst}/manifest.json")
    recorded = json.loads(json.dumps(asdict(config)))  # as manifest.json holds it (tuples become lists)
    if not turns:
        del recorded["granularity"]  # row refines record what they did before turns existed
    if old is not None and (old.get("config"), old.get("source_run")) != (recorded, source):
        raise RunDirMismatchError(
            f"{out} holds a refine of {old.get('source_run')} with config {old.get('config')}; this one is of "
            f"{source} with {recorded}: choose another --out or delete it")

    completed = read_completed_shards(source_run, allow_incomplete=allow_incomplete, command="refine")
    shards = completed.data_files
    if not shards:
        raise InputError(f"{run_dir} has no finished input file: nothing to refine")
    target = RefineOutput(out, storage_options)
    identity = ({"refine": recorded, "source_run": source}, source_identities(src_fs, shards, src, source_run.is_local))
    target.check_config(*identity)
    schemas, counts = zip(*(_shard_schema(src_fs, s) for s in shards))
    for path, schema in zip(shards, schemas):
        missing = [c for c in (ID, SCORE) if c not in schema.names]
        if missing:
            raise InputError(f"shard {path} has no {', '.join(missing)} column: refine needs scored shards")
        added = KEEP if policy.is_filter else WEIGHT if policy.kind == "weights" else None
        if added and added in schema.names:
            raise ConfigError(f"shard {path} already has a {added!r} column; refine would overwrite it. "
                              "Drop the column first or refine with another policy")
        if turns:
            check_turn_shard(schema, path)
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
    survive = None  # [run rows] bool: the rows the prefilters keep (None: all)
    if config.prefilters:
        survive, _ = survivor_mask(lf, config.prefilters, lambda run: read_completed_shards(
                                       RunDirectory.open(run, storage_options), allow_incomplete=allow_incomplete,
                                       command="refine").scan().select(ID, SCORE))
    loaded = target.load_plan()
    turn_lf = completed.scan().select(ID, TURN_SCORES) if turns else None
    if loaded is None:
        plan = fit_turn_plan(turn_lf, config, policy, src) if turns else \
            fit_plan(lf, completed, config, policy, survive, offsets, src, run_dir, storage_options, allow_incomplete)
        target.check_config(*identity, record=True)  # before the plan: a plan is always under its config
        target.save_plan(*plan)
        del plan  # the fitted map: every shard uses what is read back (to the bit), and one copy is held
        loaded = target.load_plan()
    else:
        logger.info("refine %s: resuming with the cut / weight map recorded in %s", out, target.url)
    plan, wmap = loaded
    n, stats, n_policy = plan["rows_in"], plan["score_stats_in"], plan["rows_after_prefilters"]
    policy_scores = (lf if survive is None else lf.filter(pl.Series(survive))).select(SCORE)  # the n_policy rows
    if turns:
        policy_scores, first_turns = turn_policy_scores(turn_lf), turn_offsets(turn_lf, offsets)
    top = None if plan["top"] is None else TopCut(**plan["top"])
    strata = None if plan["strata"] is None else \
        ({k: TopCut(**v) for k, v in plan["strata"]["cuts"].items()}, plan["strata"]["edges"])

    num_out = len(shards)
    names = [f"{dst}/data/train-{i:05d}-of-{num_out:05d}.parquet" for i in range(num_out)]
    markers = target.finished(names)
    if len(markers) == num_out and old is not None:
        logger.info("refine %s -> %s is complete: nothing to do", run_dir, out)
        return old
    if markers:
        logger.info("refine %s -> %s: %d of %d output shards already written, skipped", run_dir, out,
                    len(markers), num_out)
    bar = tqdm(total=n, unit="rows", desc=f"refine {policy}", disable=not progress, dynamic_ncols=True)
    try:
        if policy.kind == "repeat":
            acc = _Accumulator()
            write_repeat(lambda i, rows: _iter_batches(src_fs, shards[i], rows), num_out, schemas[0], out_fs, names, wmap,
                         config.seed, n_policy, acc, survive, set(markers),
                         lambda b, rows: markers.__setitem__(b, _commit(target, b, names, rows)),
                         on_batch=bar.update)
        else:
            for i, (path, schema) in enumerate(zip(shards, schemas)):
                if i in markers:
                    bar.update(int(counts[i]))
                    continue
                shard_acc = _Accumulator()
                if turns:
                    rows = write_turn_shard(_iter_batches(src_fs, path), schema, out_fs, names[i], policy, config, top,
                                            wmap, int(first_turns[i]), shard_acc, bar)
                    markers[i] = _commit(target, i, names, rows, shard_acc)
                    continue
                rows = _write_shard(src_fs, path, schema, out_fs, names[i], policy, config, top, wmap,
                                    int(offsets[i]), bar, shard_acc, strata, survive)
                markers[i] = _commit(target, i, names, rows, shard_acc)
            acc = _Accumulator.merged(markers[i] for i in range(num_out))
    finally:
        bar.close()
    written = [int(markers[i]["rows"]) for i in range(num_out)]

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
        "cut": plan["cut"],
        "score_stats_in": stats,
        "score_stats_kept": acc.score_stats(),
        "weight_stats": acc.weight_stats() if wmap is not None else None,
        "weight_summary": weight_summary(wmap, acc.weights, policy_scores, kind=config.weight_map,
                                         temperature=config.temperature, clip_z=config.clip_z) if wmap is not None else None,
        "repeat": ({"copies_total": int(sum(written)), "rows_with_copies": acc.kept,
                    "expected_copies": float(n_policy)} if policy.kind == "repeat" else None),
        "prefilters": plan["prefilters"],
        "rows_after_prefilters": n_policy,
        "shards": [{"path": f"data/{os.path.basename(p)}", "rows": int(r)} for p, r in zip(names, written)],
    }
    target.write_manifest(manifest)
    logger.info("refine %s -> %s: kept %d of %d rows, wrote %d", run_dir, out, acc.kept, n, manifest["rows_written"])
    if not completed.complete:
        logger.warning("refined an incomplete run: %s", completed.describe())
    return manifest


def _commit(target: RefineOutput, index: int, names: list[str], rows: int, acc=None) -> dict:
    """Write output shard `index`'s completion marker (its shard is complete) and return it."""
    marker = {"index": index, "path": f"data/{os.path.basename(names[index])}", "rows": int(rows)}
    if acc is not None:
        marker.update(scores=acc.scores.to_dict(), weights=acc.weights.to_dict())
    target.write_marker(index, marker)
    kill_point("refine", index)  # the SIGKILL resume tests' hook (bank/checkpoint.py); nothing unless asked
    return marker


class _Accumulator:
    """Kept-row count, moments of kept scores and of weights."""

    def __init__(self) -> None:
        self.scores, self.weights = Moments(), Moments()

    @classmethod
    def merged(cls, markers) -> _Accumulator:
        """The moments of the shards' markers, added in shard order (the same sums whether or not a run resumed)."""
        out = cls()
        for marker in markers:
            out.scores.merge(Moments.from_dict(marker["scores"]))
            out.weights.merge(Moments.from_dict(marker["weights"]))
        return out

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
    out_schema = append_fields(schema, pa.field(column, pa.bool_() if policy.is_filter else pa.float32()))
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
