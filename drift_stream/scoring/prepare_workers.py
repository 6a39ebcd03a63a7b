"""Tokenization in worker processes (`RunConfig.tokenize_workers`, engines/local.py): chunk i+1 is tokenized in
another process while the model runs chunk i in this one.

Why a process and not the prefetch thread: on a CPU the model is Python-bound like the tokenizer (the chat template is
Jinja, then offsets and turn spans in Python), so a thread shares the GIL with the model's Python; issue 23 measured
the pipeline at 0.40-0.64x of the same rows pre-tokenized with tokenization on the prefetch thread.

What crosses the process boundary: the columns the adapter reads, as one Arrow IPC stream; back, the chunk's rows
packed flat (token ids int32, loss mask int8, turn indexes int32, turn weights float64, one length per row) with
ids, example ids and reject reasons, unpacked into the same TokenizedExample lists that `prepare_chunk` builds, so
the scores are bit-identical to tokenizing in this process (tests/test_overlap.py). The tokenizer's counters come
back per chunk (PreparedRows.tokenization), so each input file's marker counts its own rows.
"""

from __future__ import annotations

import logging
import pickle
from concurrent.futures import Future
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa

from drift_stream.data.example_types import TokenizedExample
from drift_stream.errors import DriftError
from drift_stream.io.background import WorkerDiedError, WorkerProcesses
from drift_stream.scoring.base import ChunkPreparer, PreparedRows, adapter_columns

logger = logging.getLogger(__name__)


class TokenizeWorkers:
    """`submit(table)` tokenizes a chunk in one of `workers` processes; `PendingRows.result()` is its PreparedRows.
    Results are futures, so the order is the caller's. Call `close()` in a `finally`."""

    def __init__(self, preparer: ChunkPreparer, workers: int) -> None:
        self.adapter = preparer.adapter
        self._processes = WorkerProcesses(preparer, workers)

    def submit(self, table: pa.Table) -> PendingRows:
        columns = table.select(adapter_columns(table, self.adapter))
        return PendingRows(self._processes.submit(_prepare_packed, _to_ipc(columns)))

    def close(self) -> None:
        self._processes.close()


class PendingRows:
    """A chunk being tokenized in a worker process."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def result(self) -> PreparedRows:
        try:
            return unpack(self._future.result())
        except WorkerDiedError as exc:
            raise DriftError("a tokenization worker process died (killed, or out of memory): rerun the same command "
                             "to resume, with --tokenize-workers 0 to tokenize in this process") from exc


def tokenize_workers(scorer: Any, workers: int) -> TokenizeWorkers | None:
    """Worker processes that tokenize for `scorer`, or None (tokenize in this process) when `workers` is 0, the
    scorer tokenizes nothing ahead (no `chunk_preparer`), or its adapter / tokenizer cannot be pickled."""
    make = getattr(scorer, "chunk_preparer", None)
    if workers < 1 or make is None:
        return None
    preparer = make()
    try:
        pickle.dumps(preparer)
    except Exception as exc:  # noqa: BLE001 - any pickling failure: the in-thread path works with any tokenizer
        logger.warning("the scorer's tokenizer cannot be sent to a worker process (%s: %s): tokenizing on the "
                       "prefetch thread instead", type(exc).__name__, exc)
        return None
    return TokenizeWorkers(preparer, workers)


def _to_ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _prepare_packed(preparer: ChunkPreparer, ipc: pa.Buffer) -> dict[str, Any]:
    """In a worker process: the chunk's PreparedRows, packed (a chunk of no column the adapter reads keeps its row
    count through IPC)."""
    return pack(preparer(pa.ipc.open_stream(ipc).read_all()))


def pack(prepared: PreparedRows) -> dict[str, Any]:
    """PreparedRows as a few flat arrays and lists of strings (what pickles fast)."""
    kept = [t for t in prepared.tokenized if t is not None]
    turns = [t for t in kept if t.turn_index is not None]
    return {
        "ids": prepared.ids, "reasons": prepared.reasons, "tokenization": prepared.tokenization,
        "present": np.array([t is not None for t in prepared.tokenized], dtype=bool),
        "example_ids": [t.id for t in kept],
        "lengths": np.array([len(t.input_ids) for t in kept], dtype=np.int64),
        "input_ids": np.array(list(chain.from_iterable(t.input_ids for t in kept)), dtype=np.int32),
        "loss_mask": np.array(list(chain.from_iterable(t.loss_mask for t in kept)), dtype=np.int8),
        "has_turns": np.array([t.turn_index is not None for t in kept], dtype=bool),
        "turn_index": np.array(list(chain.from_iterable(t.turn_index for t in turns)), dtype=np.int32),
        "num_weights": np.array([-1 if t.turn_weights is None else len(t.turn_weights) for t in kept], np.int64),
        "turn_weights": np.array(list(chain.from_iterable(t.turn_weights or () for t in kept)), dtype=np.float64),
    }


def unpack(packed: dict[str, Any]) -> PreparedRows:
    """The PreparedRows `pack` was given: equal lists of Python ints and floats, None where a row was rejected."""
    ids_flat, mask_flat = packed["input_ids"].tolist(), packed["loss_mask"].tolist()
    turn_flat, weights_flat = packed["turn_index"].tolist(), packed["turn_weights"].tolist()
    kept: list[TokenizedExample] = []
    at = turn_at = weight_at = 0
    for example_id, n, has_turns, m in zip(packed["example_ids"], packed["lengths"].tolist(),
                                           packed["has_turns"].tolist(), packed["num_weights"].tolist()):
        turn_index = None
        if has_turns:
            turn_index, turn_at = turn_flat[turn_at:turn_at + n], turn_at + n
        weights = None
        if m >= 0:
            weights, weight_at = tuple(weights_flat[weight_at:weight_at + m]), weight_at + m
        kept.append(TokenizedExample(example_id, ids_flat[at:at + n], mask_flat[at:at + n], turn_index, weights))
        at += n
    rows = iter(kept)
    tokenized = [next(rows) if present else None for present in packed["present"].tolist()]
    return PreparedRows(packed["ids"], tokenized, packed["reasons"], packed["tokenization"])

