"""`run_score`: stream -> scorer -> run directory, resumable and sharded. The one entry point of `drift-stream score`.

Per input file of this shard (file i of N goes to shard i % num_shards) that has no completion marker yet: stream it in
chunks of `batch_rows` rows (read ahead on a background thread), score each chunk, append the scored rows to
`data/` and the rejected ones (undecodable lines and rows the scorer rejected) to `rejects/`, then publish both shards
and write the marker. Output order within a shard is input order. Data rows carry every input column, `id` and the
scorer's `drift_*` columns except `drift_reject_reason` (null there); rejects carry the reason, `drift_row_index` and,
for undecodable lines, `drift_raw_line`.

Bookkeeping is O(files) (issue 23): a process writes its files' markers, lists the marker names once, and returns
(and logs) its own counts; the process that sees the last marker settles the run once (`finish_run`), reading each
marker once: one schema over every shard (io/settle.py), `schema.json`, the repeated-ids report and manifest.json.

What is compared on resume (`config.json`, written once): the expanded input files, the scorer's `config_dict()`
(its output-changing fields), and each input's identity (size and mtime / ETag; an IterableDataset's fingerprint:
io/run_dir.py, InputChangedError). Not compared, because they do not change any output row: the scorer's
execution-only fields (`batch_size`, `device`: recorded under "execution", config_fields.py), `out`, `num_shards`,
`shard_index`, `batch_rows`, `prefetch_batches`, `tokenize_workers`, `on_bad_row`, `allow_all_rejected` and the
storage options (never recorded). beta `auto` is resolved once per run into `OUT/beta.json` (beta.py).

Planning reads nothing twice and nothing of another shard's files: each file is planned from its own footer or first
rows while it is read (io/streams.py `iter_planned`), its plan recorded in its marker; the run's one schema (DESIGN.md
section 4) is the union of those plans, settled when the last marker is written (io/settle.py: shards that differ
from it, rare in a lake written by one tool, are rewritten then), and recorded in `OUT/schema.json`. At the end,
`run_checks.check_rejections` warns when most rows were rejected (naming the top reasons and the likely cause) and
raises AllRejectedError when every row was, unless `allow_all_rejected`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drift_stream.engines.run_checks import check_rejections
from drift_stream.engines.run_summary import scan_complete_run, warn_repeated_ids
from drift_stream.errors import BadRowError, ConfigError, DriftError
from drift_stream.io.background import Publisher, prefetch
from drift_stream.io.columns import (
    ID,
    RAW_LINE,
    REJECT_REASON,
    ROW_INDEX,
    SCORE,
    SOURCE_ID,
)
from drift_stream.io.config_fields import execution_only
from drift_stream.io.manifest import ScoreSummary
from drift_stream.io.run_dir import (
    RunDirectory,
    ShardWriter,
    reason_code,
)
from drift_stream.io.schema import SchemaPlan, conform_table
from drift_stream.io.settle import plan_to_dict, settle_shards, union_plan
from drift_stream.io.streams import (
    Chunk,
    InputFile,
    expand_inputs,
    is_iterable_dataset,
    iter_planned,
    shard_files,
)
from drift_stream.scoring import prepare_workers
from drift_stream.scoring.beta import resolve_beta

logger = logging.getLogger(__name__)

PLAN_FILE = "schema.json"  # the run's one input schema (io/schema.py SchemaPlan), recorded by the first process
ON_BAD_ROW = ("reject", "error")
ENGINES = ("local", "ray")  # --engine: this process, or an actor pool (engines/ray.py, engines/ray_bank.py)


@dataclass(frozen=True)
class RunConfig:
    """How to run `drift-stream score` over files (or one `datasets.IterableDataset`) into a run directory."""

    data: Any  # tuple of URLs / paths / globs, or a datasets.IterableDataset
    out: str
    num_shards: int = 1
    shard_index: int = 0
    batch_rows: int = execution_only(1024)  # rows per chunk handed to the scorer; bounds memory
    on_bad_row: str = "reject"  # reject: bad rows go to rejects/; error: the first bad row stops the run
    prefetch_batches: int = execution_only(2)  # chunks read ahead on the background thread
    # processes that tokenize the chunks read ahead (scoring/prepare_workers.py); 0: the prefetch thread does
    tokenize_workers: int = execution_only(0)
    allow_all_rejected: bool = False  # else a run whose every row is rejected raises AllRejectedError (CLI exit 2)
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)  # never recorded

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, bytes)):
            object.__setattr__(self, "data", (str(self.data),))
        elif isinstance(self.data, (list, tuple)):
            object.__setattr__(self, "data", tuple(str(d) for d in self.data))
            if not self.data:
                raise ConfigError("no input given: pass at least one --data URL")
        elif not is_iterable_dataset(self.data):
            raise ConfigError(f"data must be URLs or a datasets.IterableDataset, got {type(self.data).__name__}")
        if not str(self.out):
            raise ConfigError("--out is required")
        if self.num_shards < 1:
            raise ConfigError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.batch_rows < 1:
            raise ConfigError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.prefetch_batches < 0:
            raise ConfigError(f"prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if self.tokenize_workers < 0:
            raise ConfigError(f"tokenize_workers must be >= 0, got {self.tokenize_workers}")
        if self.on_bad_row not in ON_BAD_ROW:
            raise ConfigError(f"on_bad_row must be 'reject' or 'error', got {self.on_bad_row!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ConfigError("storage_options must be a dict (CLI: --storage-options '{\"key\": ...}')")


def recorded_config(files: list[InputFile], scorer: Any) -> dict[str, Any]:
    """What config.json records and a rerun must match."""
    return {"input_files": [f.url for f in files], "scorer": scorer.config_dict()}


def run_score(
    config: RunConfig,
    scorer: Callable[[pa.Table], pa.Table],
    progress: bool = True,
    score_files: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Score this shard's input files into `config.out`; skip finished ones. Returns the manifest.

    `score_files(todo, run, scorer, config, progress)` scores the files that have no marker yet, each through
    `score_file`; the default runs them in this process, `integrations.ray.RayEngine` on a Ray actor pool. Listing,
    assignment, calibration, the config check and the manifest stay here, so every engine writes the same run.
    """
    files = expand_inputs(config.data, config.storage_options)
    run = RunDirectory(config.out, config.storage_options)
    record = recorded_config(files, scorer)
    execution = scorer.execution_config() if hasattr(scorer, "execution_config") else None
    # before the schema pass: a changed input is refused before it is read
    run.check_config(record, execution, inputs={f.url: dict(f.identity) for f in files})
    # beta: auto is fitted once per run on the first rows of the WHOLE input and recorded in OUT/beta.json; every
    # other shard process and every resume reads that record (beta.py).
    resolve_beta(scorer, lambda: head_rows(files, scorer.config.calibration_rows, config, _strict(scorer)), run)
    for pop in ("pop_padding_stats", "pop_tokenization_stats"):  # calibration rows are no input file's: the
        if hasattr(scorer, pop):  # markers count only their own
            getattr(scorer, pop)()
    mine = shard_files(files, config.num_shards, config.shard_index)
    done = run.completed_indexes()
    todo = [f for f in mine if f.index not in done]
    logger.info(
        "shard %d/%d: %d of %d input files, %d already complete, %d to score into %s",
        config.shard_index, config.num_shards, len(mine), len(files), len(mine) - len(todo), len(todo), run.url,
    )
    if todo:
        (score_files or _score_files)(todo, run, scorer, config, progress)
    manifest = finish_run(run, record, files, mine)
    check_rejections(manifest, scorer, allow_all_rejected=config.allow_all_rejected)
    return manifest


def finish_run(run: RunDirectory, record: dict[str, Any], files: list[InputFile],
               mine: list[InputFile]) -> dict[str, Any]:
    """O(files) bookkeeping: the process that sees the last marker (one listing of names) settles the run once,
    reading each marker once (one schema over every shard, schema.json, ONE scan of the data for the repeated ids
    and the summary's numbers, manifest.json); any other process returns the counts of its own markers, reading
    back only those an earlier process wrote (`complete` false, `num_completed_files` of the run). Two processes finishing together may both settle:
    the result is the same."""
    urls = [f.url for f in files]
    listing = run.list_markers()  # the one listing: whether this process settles, and which markers it reads
    names = run.completed_indexes(listing)
    if len(names) < len(files):
        own = run.completed({f.index for f in mine} & names, listing)  # read: only those of an earlier process
        counts = run.build_manifest(record, urls, own)
        counts.update(complete=False, num_completed_files=len(names))
        logger.info("this shard: %d rows in, %d scored, %d rejected; %d of %d input files of the run are done (the "
                    "process that finishes the last one writes the manifest)", counts["rows_in"],
                    counts["rows_scored"], counts["rows_rejected"], len(names), len(files))
        return counts
    markers = run.completed(listing=listing)
    plan_record = settle_shards(run, markers)
    extra: dict[str, Any] = {}
    if plan_record is not None:
        source = _source_id_column(markers)
        if source is not None:
            plan_record["source_id_column"] = extra["source_id_column"] = source
        if run.read_json(PLAN_FILE) != plan_record:
            run.write_json(PLAN_FILE, plan_record)
        if plan_record["json_columns"]:
            logger.warning("column(s) %s hold values of different JSON types in different rows: they are carried as "
                           "JSON text (%s records it)", ", ".join(plan_record["json_columns"]),
                           f"{run.url}/{PLAN_FILE}")
    extra["repeated_ids"], summary = scan_settled_run(run, record, markers)
    if summary is not None:  # what summarize_run prints, so that it reads this manifest and not the data
        extra["summary"] = summary
    manifest = run.write_manifest(record, urls, markers, extra)
    logger.info("run complete: %d rows in, %d scored, %d rejected", manifest["rows_in"],
                manifest["rows_scored"], manifest["rows_rejected"])
    return manifest


def _source_id_column(markers: Mapping[int, dict]) -> dict[str, str] | None:
    """{name, type} of SOURCE_ID (the input's non-string ids, kept) in the run's data shards, if any holds it."""
    from drift_stream.io.settle import schema_from_text

    types = [schema_from_text(m["data_schema"]).field(SOURCE_ID).type for m in markers.values()
             if m.get("data_schema") and SOURCE_ID in schema_from_text(m["data_schema"]).names]
    if not types:
        return None
    kept = union_plan([SchemaPlan(pa.schema([(SOURCE_ID, t)])) for t in types]).schema.field(SOURCE_ID).type
    return {"name": SOURCE_ID, "type": str(kept)}


def scan_settled_run(run: RunDirectory, record: dict[str, Any], markers: Mapping[int, dict]
                     ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(repeated_ids, summary) of a complete run (`markers`: every marker, read once by the settling process) from
    ONE scan of its data shards (engines/run_summary.py); warns when ids repeat."""
    from drift_stream.io.run_reader import CompletedShards

    ordered = dict(sorted(markers.items()))
    shards = CompletedShards(run, tuple(record["input_files"]), ordered, None, record)
    found, summary = scan_complete_run(shards, {"scorer_info": next(iter(ordered.values())).get("scorer_info", {})})
    warn_repeated_ids(run.url, found)
    return found, summary


def _strict(scorer: Any) -> tuple[str, ...]:
    """The columns the scorer's adapter reads (io/schema.py: rows of another type are rejected one by one)."""
    return tuple(getattr(getattr(scorer, "adapter", None), "columns", ()) or ())


def data_schema(plan: SchemaPlan, scorer: Any) -> pa.Schema | None:
    """Schema of a file's data shard: its input plan, `id`, the scorer's columns (the scorer run on zero rows)."""
    try:
        out = scorer(plan.schema.empty_table())
    except Exception:  # noqa: BLE001 - a custom scorer that cannot take zero rows: the first output decides
        return None
    if not isinstance(out, pa.Table) or REJECT_REASON not in out.column_names:
        return None
    return out.drop_columns([REJECT_REASON]).schema


def with_source_id(input_schema: pa.Schema, out_schema: pa.Schema | None) -> pa.Schema:
    """`input_schema` plus SOURCE_ID when the scorer keeps one: what the rejects shards are written with (run_dir's
    rejects_schema makes `id` a string), so a rejected row carries the same ids as a scored one."""
    if out_schema is None or SOURCE_ID not in out_schema.names or SOURCE_ID in input_schema.names:
        return input_schema
    return pa.schema([*input_schema, out_schema.field(SOURCE_ID)], metadata=input_schema.metadata)


def head_rows(files: list[InputFile], num_rows: int, config: RunConfig, strict_columns: tuple[str, ...] = ()
              ) -> pa.Table:
    """The first `num_rows` decodable rows of the input files, in input order, conformed to the union of the plans
    of the files they come from (each file planned from its own first rows)."""
    tables: list[pa.Table] = []
    plans: list[SchemaPlan] = []
    have = 0
    for file in files:
        items = iter_planned(file, min(config.batch_rows, num_rows), config.storage_options, strict_columns)
        try:
            for item in items:
                if isinstance(item, SchemaPlan):
                    plans.append(item)
                    continue
                tables.append(item.table.slice(0, num_rows - have))
                have += tables[-1].num_rows
                if have >= num_rows:
                    break
        finally:
            items.close()
        if have >= num_rows:
            break
    if not tables:
        return pa.table({})
    plan = union_plan(plans)
    return pa.concat_tables([conform_table(t, plan.schema) for t in tables])


def _events(todo: list[InputFile], config: RunConfig, scorer, workers: prepare_workers.TokenizeWorkers | None = None
            ) -> Iterator[tuple[str, InputFile, Any]]:
    """("start", file, its plan), ("chunk", file, (Chunk, prepared rows))..., ("end", file, None) for every file,
    in order. Runs on the prefetch thread: each file is planned from its own first rows / footer while it is read
    (io/streams.py iter_planned), and each chunk is tokenized here (`prepare_chunk`) or sent to the `workers`
    processes, so chunk i+1 is read and tokenized while the model runs chunk i."""
    for file in todo:
        for item in _planned_items(file, config, scorer, workers):
            yield ("start", file, item) if isinstance(item, SchemaPlan) else ("chunk", file, item)
        yield "end", file, None


def _planned_items(file: InputFile, config: RunConfig, scorer,
                   workers: prepare_workers.TokenizeWorkers | None = None) -> Iterator[Any]:
    """The file's plan, then (Chunk, PreparedRows | PendingRows (in `workers`) | None) per chunk."""
    prepare = workers.submit if workers is not None else getattr(scorer, "prepare_chunk", None)
    items = iter_planned(file, config.batch_rows, config.storage_options, _strict(scorer))
    try:
        for item in items:
            if isinstance(item, SchemaPlan):
                yield item
            else:
                yield item, (prepare(item.table) if prepare is not None and item.table.num_rows else None)
    finally:
        items.close()


def _score_files(todo: list[InputFile], run: RunDirectory, scorer, config: RunConfig, progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(desc="scoring", unit="rows", unit_scale=True, disable=not progress, dynamic_ncols=True)
    current: _FileScoring | None = None
    workers = prepare_workers.tokenize_workers(scorer, config.tokenize_workers)  # None: on the prefetch thread
    if workers is not None:  # a lazy model loads while the workers start, not after the first chunk waited for them
        getattr(scorer, "model", None)
    events = prefetch(_events(todo, config, scorer, workers), config.prefetch_batches)
    publisher = Publisher(depth=2)  # a finished file's shards and marker are uploaded while the next is scored
    try:
        for kind, file, payload in events:
            if kind == "start":
                current = _FileScoring.start(run, file, payload, scorer, config.on_bad_row)
            elif kind == "chunk":
                chunk, prepared = payload
                prepared = prepared.result() if isinstance(prepared, prepare_workers.PendingRows) else prepared
                bar.update(current.score(chunk, prepared, scorer=scorer))
            else:
                publisher.submit(_publish, current.writer, current.counts(scorer), current.scores, then=_log_marker)
                current = None
    finally:
        events.close()  # stops the reader thread now, even when an error is propagating
        if workers is not None:
            workers.close()  # what was not started is cancelled; the worker processes are joined
        if current is not None:
            current.writer.abort()
        try:
            publisher.close()  # the files finished before an error are still published
        finally:
            bar.close()


def _publish(writer: ShardWriter, counts: dict[str, Any], scores: ScoreSummary) -> dict[str, Any]:
    try:
        return writer.commit(counts, scores)
    except BaseException:
        writer.abort()
        raise


def _log_marker(marker: dict[str, Any]) -> None:
    logger.info("%s: %d rows in, %d scored, %d rejected", marker["input_file"], marker["rows_in"],
                marker["rows_scored"], marker["rows_rejected"])


def score_file(file: InputFile, run: RunDirectory, scorer, config: RunConfig) -> dict[str, Any]:
    """Score one input file into its data / rejects shards, then write its marker. Returns the marker.

    What a Ray actor runs per file: a failure anywhere leaves no marker, so the file is scored again from its start.
    The file is planned from itself, so the driver reads no input before its actors start.
    """
    current: _FileScoring | None = None
    items = prefetch(_planned_items(file, config, scorer), config.prefetch_batches)
    try:
        for item in items:
            if isinstance(item, SchemaPlan):
                current = _FileScoring.start(run, file, item, scorer, config.on_bad_row)
            else:
                current.score(*item, scorer=scorer)
        return current.commit(scorer)
    except BaseException:
        if current is not None:
            current.writer.abort()
        raise
    finally:
        items.close()


def _bad_row_id(raw: str, scorer) -> str:
    """The id of a row the reader could not give the scorer: the adapter's `row_id` when `raw` is a whole JSON object
    (a row of the wrong type), else the sha1 hex of the raw text (an undecodable line)."""
    adapter = getattr(scorer, "adapter", None)
    if adapter is not None:
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if isinstance(row, dict):
            return adapter.row_id(row)
    return hashlib.sha1(raw.encode("utf-8", errors="replace")).hexdigest()


class _FileScoring:
    """Scores the chunks of one input file into its ShardWriter and keeps its counts."""

    def __init__(self, writer: ShardWriter, on_bad_row: str, out_schema: pa.Schema | None = None,
                 plan: SchemaPlan | None = None) -> None:
        self.writer, self.on_bad_row, self.out_schema = writer, on_bad_row, out_schema
        self.plan = plan
        self.json_columns = plan.json_columns if plan is not None else ()
        self.rows_in = self.rows_scored = self.rows_rejected = 0
        self.by_reason: dict[str, int] = {}
        self.scores = ScoreSummary()
        self.tokenization: dict[str, int] | None = None  # counters of the chunks tokenized ahead (prepare_chunk)

    @classmethod
    def start(cls, run: RunDirectory, file: InputFile, plan: SchemaPlan, scorer, on_bad_row: str) -> "_FileScoring":
        out_schema = data_schema(plan, scorer)
        return cls(run.shard_writer(file, with_source_id(plan.schema, out_schema)), on_bad_row, out_schema, plan)

    def _fail(self, row_index: int, reason: str) -> None:
        raise BadRowError(
            f"input file {self.writer.file.url}, row {row_index} (0-based; jsonl: line index) is bad: {reason}. "
            "Fix the row, or rerun with --on-bad-row reject to send bad rows to rejects/"
        )

    def score(self, chunk: Chunk, prepared: Any = None, *, scorer) -> int:
        """Score one chunk (`prepared`: its rows tokenized ahead, or None); returns the number of input rows."""
        table, n_bad = chunk.table, len(chunk.bad_rows)
        if self.on_bad_row == "error" and chunk.bad_rows:
            self._fail(chunk.bad_rows[0].row_index, chunk.bad_rows[0].reason)
        parts: list[pa.Table] = []
        if prepared is not None:
            self.tokenization = self.tokenization or {}
            for key, value in prepared.tokenization.items():
                self.tokenization[key] = self.tokenization.get(key, 0) + value
        if table.num_rows:
            out = scorer(table) if prepared is None else scorer.score_table(table, prepared)
            if not isinstance(out, pa.Table) or out.num_rows != table.num_rows:
                got = out.num_rows if isinstance(out, pa.Table) else type(out).__name__
                raise DriftError(f"the scorer returned {got} rows for {table.num_rows}: it must keep every row")
            if REJECT_REASON not in out.column_names:
                raise DriftError(f"the scorer's output has no {REJECT_REASON} column")
            rejected = pc.is_valid(out.column(REJECT_REASON)).to_numpy(zero_copy_only=False)
            if self.on_bad_row == "error" and rejected.any():
                first = int(np.flatnonzero(rejected)[0])
                self._fail(int(chunk.row_index[first]), out.column(REJECT_REASON)[first].as_py())
            scored = out.filter(pa.array(~rejected)).drop_columns([REJECT_REASON])
            if self.out_schema is not None:
                scored = conform_table(scored, self.out_schema)  # one schema for every shard of the run
            if scored.num_rows:
                self.writer.write_scored(scored)
                self.scores.add(scored.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float64))
            self.rows_scored += scored.num_rows
            if rejected.any():
                bad = out.filter(pa.array(rejected))
                bad = bad.append_column(ROW_INDEX, pa.array(chunk.row_index[rejected], pa.int64()))
                parts.append(bad)
        if n_bad:
            parts.append(pa.table({
                ID: pa.array([_bad_row_id(b.raw, scorer) for b in chunk.bad_rows], pa.string()),
                REJECT_REASON: pa.array([b.reason for b in chunk.bad_rows], pa.string()),
                ROW_INDEX: pa.array([b.row_index for b in chunk.bad_rows], pa.int64()),
                RAW_LINE: pa.array([b.raw for b in chunk.bad_rows], pa.string()),
            }))
        if parts:
            rejects = pa.concat_tables([conform_table(p, self.writer.rejects_schema) for p in parts])
            rejects = rejects.sort_by(ROW_INDEX)  # input order within the chunk
            self.writer.write_rejects(rejects)
            self.rows_rejected += rejects.num_rows
            for reason in rejects.column(REJECT_REASON).to_pylist():
                code = reason_code(reason)
                self.by_reason[code] = self.by_reason.get(code, 0) + 1
        self.rows_in += table.num_rows + n_bad
        return table.num_rows + n_bad

    def commit(self, scorer) -> dict[str, Any]:
        """Publish the shards and the marker now. Returns the marker."""
        return self.writer.commit(self.counts(scorer), self.scores)

    def counts(self, scorer) -> dict[str, Any]:
        """The marker's counts (and an empty shard's schema); the scorer's per-file counters are taken here."""
        if self.rows_scored == 0 and self.out_schema is not None:
            self.writer.write_scored(self.out_schema.empty_table())  # an empty shard still has the run's schema
        info = scorer.manifest_info() if hasattr(scorer, "manifest_info") else {}
        counts = {
            "rows_in": self.rows_in,
            "rows_scored": self.rows_scored,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(sorted(self.by_reason.items())),
            "json_text_columns": list(self.json_columns),
            "scorer_info": info,
            **({"plan": plan_to_dict(self.plan)} if self.plan is not None else {}),  # io/settle.py unites them
        }
        if hasattr(scorer, "pop_padding_stats"):  # real vs padded tokens of this file's batches (batching.py)
            counts["padding"] = scorer.pop_padding_stats()
        if self.tokenization is not None or hasattr(scorer, "prepare_chunk"):
            # tokenized on the prefetch thread: this file's chunks' own counters (popping the tokenizer's here
            # would take some of the next file's, tokenized ahead); turns whose reasoning the template dropped
            zero = {key: 0 for key in scorer.chat.stats()} if hasattr(getattr(scorer, "chat", None), "stats") else {}
            counts["tokenization"] = {**zero, **(self.tokenization or {})}
        elif hasattr(scorer, "pop_tokenization_stats"):
            counts["tokenization"] = scorer.pop_tokenization_stats()
        return counts
