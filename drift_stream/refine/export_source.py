"""The input side of `drift-stream export`: a refined run's data shards, the adapter (and for `tokens` the chat
tokenizer) its source run was scored with, each row's weight and each assistant turn's, and a row turned back into its
conversation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.errors import IncompleteRunError, InputError
from drift_stream.io.columns import KEEP, TURN_KEEP, TURN_WEIGHTS, WEIGHT
from drift_stream.io.run_dir import RunDirectory, open_path

logger = logging.getLogger(__name__)

BATCH_ROWS = 8192


@dataclass
class RefinedRun:
    """A finished refine output: its shards (in order), the adapter and the scorer config of its source run."""

    fs: Any
    shards: list[str]
    adapter: Any
    url: str
    manifest: dict
    scorer: dict  # the source run's recorded scorer config (config.json "config" -> "scorer")
    source: str  # the source run's url


def open_refined(run_dir: str, storage_options, allow_incomplete: bool) -> RefinedRun:
    """The data shards of a refine output and the adapter its source run was scored with."""
    from drift_stream.data.formats import Adapter

    fs, root = open_path(run_dir, storage_options)
    manifest = read_json(fs, f"{root}/manifest.json")
    if manifest is None or manifest.get("kind") != "refine":
        if fs.isfile(f"{root}/config.json"):
            raise InputError(f"{run_dir} is a scored run, not a refined one: run `drift-stream refine {run_dir} "
                             "--policy weights --out REFINED` first, then export REFINED")
        if not fs.isdir(f"{root}/data"):
            raise InputError(f"{run_dir} is not the output of `drift-stream refine` (no manifest.json, no data/)")
        # refine writes manifest.json last: without it the shards may be partial and the source run is unknown
        raise IncompleteRunError(f"{run_dir} has data/ but no manifest.json: the refine that writes it did not "
                                 "finish. Rerun it (the same command)")
    shards = [f"{root}/{s['path']}" for s in manifest.get("shards", [])]
    missing = [s for s in shards if not fs.exists(s)]
    if missing:
        raise InputError(f"{run_dir}/manifest.json lists {missing[0]} but it is missing: rerun the refine")
    fraction = manifest.get("source_fraction_files")
    if fraction is not None and fraction < 1.0:
        if not allow_incomplete:
            raise IncompleteRunError(f"{run_dir} refines only {100 * fraction:.1f}% of the input files of "
                                     f"{manifest.get('source_run')} (its score run is incomplete): complete that run "
                                     "and refine again, or pass --allow-incomplete")
        logger.warning("export of a refine of an incomplete run (allowed): %.1f%% of its input files",
                       100 * fraction)
    source = manifest.get("source_run")
    if not source:
        raise InputError(f"{run_dir}/manifest.json names no source_run: cannot tell which adapter scored the rows")
    recorded = RunDirectory.open(source, storage_options).read_config() or {}
    scorer = (recorded.get("config") or {}).get("scorer") or {}
    spec = scorer.get("adapter_spec")
    if not spec:
        raise InputError(f"{source}/config.json records no adapter_spec: cannot turn rows back into conversations")
    # config_dict() records the spec without its free-text description, which the schema requires
    adapter = Adapter({"description": f"as recorded in {source}/config.json", **spec}, source=f"{source}/config.json")
    return RefinedRun(fs, shards, adapter, run_dir, manifest, scorer, source)


def read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def shard_batches(fs, path: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The shard's rows, BATCH_ROWS at a time (one row group decoded at a time)."""
    with fs.open(path, "rb") as handle:
        # pre_buffer (pyarrow's default) would read every row group at once: the whole shard held in memory
        for batch in pq.ParquetFile(handle, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([batch])


def row_weights(table: pa.Table, path: str, first_row: int = 0) -> np.ndarray:
    """[n] float64 weight of each row: `weight`, else `keep` (1/0), else 1; `first_row` (the batch's first row in
    the shard) only names rows in errors."""
    if WEIGHT in table.column_names:
        w = table.column(WEIGHT).to_numpy(zero_copy_only=False).astype(np.float64)
    elif KEEP in table.column_names:
        w = np.asarray(table.column(KEEP).to_pylist(), dtype=object)
        w = np.array([1.0 if k else 0.0 for k in w])
    else:
        return np.ones(table.num_rows)
    bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
    if bad.size:
        raise InputError(f"{path} row {first_row + int(bad[0])}: weight {w[bad[0]]} is not finite and >= 0")
    return w


def weight_columns(fs, path: str) -> list[str]:
    """The columns `row_weights` reads, of those the shard has (a cheap pass reads only these)."""
    with fs.open(path, "rb") as handle:
        names = pq.ParquetFile(handle).schema_arrow.names
    return [c for c in (WEIGHT, KEEP) if c in names][:1]


def to_example(adapter, row: dict, path: str, index: int):
    """The row as the scorer's adapter read it (an Example); InputError if the adapter refuses it now."""
    from drift_stream.data.example_types import RowError

    try:
        return adapter.to_example(row)
    except RowError as err:
        raise InputError(f"{path} row {index}: {err.reason} (the scorer should have rejected it)") from err


def example_form(example) -> str:
    """"text" (a `text` row), "plain" (prompt/completion strings) or "chat" (a conversation)."""
    return "text" if example.text is not None else "plain" if example.response is not None else "chat"


def has_turn_columns(row: dict) -> bool:
    """The row was refined per turn (`turn_weights` or `turn_keep` present and not null)."""
    return row.get(TURN_WEIGHTS) is not None or row.get(TURN_KEEP) is not None


def turn_weights_out(row: dict, example, weight: float, path: str, index: int) -> tuple[float, ...]:
    """The exported weight of each assistant turn k (a text or plain prompt/completion row is one turn):
    input_k x factor_k x base, input_k the message's `weight` (OpenAI 0/1, LLaMA-Factory `loss_weight`; else 1).

    * `turn_weights` (refine per turn, --policy weights): factor_k = turn_weights[k], base 1: the row's `weight` is
      the mean of these turn weights, so multiplying by it too would square them;
    * `turn_keep` (a per-turn filter): factor_k = 1 / 0, base = the row's weight (`keep`: 1);
    * neither: factor_k = 1, base = the row's weight (what every turn got before turn weights existed).
    """
    if example.messages is None:
        inputs = [1.0]
    else:
        inputs = [float(m.get("weight", 1.0)) for m in example.messages if m.get("role") == "assistant"]
    base = float(weight)
    if row.get(TURN_WEIGHTS) is not None:
        name, factors, base = TURN_WEIGHTS, list(row[TURN_WEIGHTS]), 1.0
    elif row.get(TURN_KEEP) is not None:
        name, factors = TURN_KEEP, [None if k is None else float(k) for k in row[TURN_KEEP]]
    else:
        return tuple(base * w for w in inputs)
    if len(factors) != len(inputs):
        raise InputError(f"{path} row {index} (id {example.id}): {name} has {len(factors)} entries for "
                         f"{len(inputs)} assistant turns: was the run refined from another scored run?")
    if not all(f is not None and np.isfinite(f) and f >= 0 for f in factors):
        raise InputError(f"{path} row {index} (id {example.id}): {name} {factors} is not finite and >= 0")
    return tuple(base * w * float(f) for w, f in zip(inputs, factors))
