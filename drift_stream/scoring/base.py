"""The engine-agnostic core: a batch of rows in, the same rows plus `drift_*` score columns out.

Every scorer (drift, less, if, loss, ifd, random) takes the same path: adapter -> canonical example -> tokens with a
loss mask -> per-example numbers -> columns. Rows that cannot be scored keep their place and get a
`drift_reject_reason`; nothing is dropped here (the pipeline routes them to `rejects/`).

Conventions: a higher `drift_score` always means "more worth keeping".
- drift / less / if: mean over queries of <b_j, u(z)> / ||u(z)||^beta (DESIGN.md section 2); weighted by the
  bank's query weights w_j when it has them (query_weighting, bank/contrast.py).
- loss: minus the mean response NLL (low-loss rows rank first).
- ifd: the instruction-following difficulty loss(y|x) / loss(y), ranked high-first as in the IFD paper, except that
  rows with IFD > 1 (the prompt does not help at all) are sent to the bottom as that paper filters them.
- random: uniform in [0, 1) from a hash of (seed, row id): invariant to batching, sharding and resume.

This file holds the shared path (ScoreConfig, batch types, BatchScorer, the model-running base); the scorers are in
baselines.py (random, loss, ifd) and drift.py (drift, less, if); build.py builds any of them by name.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from drift_stream.errors import ConfigError
from drift_stream.io.columns import ID, SCORE_COLUMNS
from drift_stream.io.config_fields import execution_dict, execution_only, output_dict
from drift_stream.model.batching import (
    PaddingStats,
    plan_batches,
    validate_max_batch_tokens,
)

logger = logging.getLogger(__name__)

GRANULARITIES = ("row", "turn")  # --granularity: a score per row, or also one per assistant turn
SCORERS = ("drift", "less", "if", "loss", "ifd", "random")
GRADIENT_SCORERS = ("drift", "less", "if")
# The off-policy baselines are defined by their beta (DESIGN.md section 2): less = LESS's cosine-like normalisation,
# if = the plain inner product. Only drift takes another number or `auto`.
FIXED_BETA = {"less": 1.0, "if": 0.0}


@dataclass(frozen=True)
class ScoreConfig:
    """What a scorer does to each row. Maps one to one onto `drift-stream score` flags (same defaults: tested).

    Fields made with `execution_only` change speed and memory only; a resume compares the others (config_fields.py).
    """

    scorer: str = "drift"
    adapter: str = "messages"
    max_tokens: int = 2048
    overlong: str = "reject"  # reject | truncate
    batch_size: int = execution_only(8)  # examples per forward/backward
    seed: int = 0
    beta: float | str = 1.0  # a number, or "auto"
    calibration_rows: int = 256
    keep_query_scores: bool = False
    device: str = execution_only("auto")
    dtype: str = "auto"
    # padded tokens per forward/backward (rows sorted by length within each batch of rows, cut by tokens; then
    # batch_size is not used): speed and memory only (batching.py)
    max_batch_tokens: int | None = execution_only(None)
    chat_template: str | None = None  # --chat-template FILE: a Jinja template replacing the tokenizer's
    use_chat_template: bool = True  # --no-chat-template: the documented plain format
    stop_tokens: tuple[str, ...] = ()  # --stop-token: more end-of-turn tokens
    granularity: str = "row"  # --granularity turn: also a score per assistant turn (scoring/turns.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
        if self.chat_template and not self.use_chat_template:
            raise ConfigError("chat_template and use_chat_template=False exclude each other: choose one")
        if self.scorer not in SCORERS:
            raise ConfigError(f"unknown scorer {self.scorer!r}: choose one of {', '.join(SCORERS)}")
        if self.granularity not in GRANULARITIES or self.granularity == "turn" and self.scorer == "ifd":
            raise ConfigError(f"granularity must be 'row' or 'turn' (turn: any scorer but ifd), got "
                              f"{self.granularity!r} with scorer {self.scorer!r}")
        if self.overlong not in ("reject", "truncate"):
            raise ConfigError(f"overlong must be 'reject' or 'truncate', got {self.overlong!r}")
        if self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        validate_max_batch_tokens(self.max_batch_tokens)
        if self.calibration_rows < 8:
            raise ConfigError(f"calibration_rows must be >= 8, got {self.calibration_rows}")
        if isinstance(self.beta, str):
            if self.beta != "auto":
                try:
                    object.__setattr__(self, "beta", float(self.beta))
                except ValueError:
                    raise ConfigError(f"beta must be a number or 'auto', got {self.beta!r}") from None
        elif not math.isfinite(float(self.beta)):
            raise ConfigError(f"beta must be finite, got {self.beta}")
        fixed = FIXED_BETA.get(self.scorer)
        # 1.0 is also the --beta default, i.e. "not given": `--scorer if` alone scores with beta 0
        if fixed is not None and (self.beta == "auto" or float(self.beta) not in (fixed, 1.0)):
            given = self.beta if self.beta == "auto" else f"{float(self.beta):g}"
            raise ConfigError(
                f"scorer {self.scorer!r} is defined with beta={fixed:g}, so --beta {given} does not apply to it: "
                f"drop --beta, or score with --scorer drift --beta {given} (an on-policy bank) to "
                f"{'fit' if self.beta == 'auto' else 'use'} that beta")


# ----------------------------------------------------------------------------------------------------------------
# Batch types: datasets.map passes dict[str, list]; Ray Data passes pyarrow / pandas; the pipeline passes pa.Table.


def _to_table(batch: Any) -> tuple[pa.Table, str]:
    if isinstance(batch, pa.Table):
        return batch, "table"
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch]), "record_batch"
    lazy = getattr(batch, "pa_table", None)  # Dataset.map's LazyBatch: its Arrow table has the exact column types
    if isinstance(batch, Mapping) and isinstance(lazy, pa.Table):
        keys = list(batch.keys())
        if lazy.num_rows == len(batch[keys[0]]) if keys else True:
            return lazy, "table"  # Dataset.map accepts a pa.Table back: the score columns keep their Arrow types
    if isinstance(batch, Mapping):  # IterableDataset.map passes a dict (types: map(..., features=), hf_datasets)
        return pa.table({key: batch[key] for key in batch.keys()}), "dict"
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with datasets
        pd = None
    if pd is not None and isinstance(batch, pd.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False), "pandas"
    raise TypeError(
        f"cannot score a batch of type {type(batch).__name__}: pass a dict of columns, a pyarrow Table/RecordBatch "
        "or a pandas DataFrame"
    )


def _from_table(table: pa.Table, kind: str) -> Any:
    if kind == "table":
        return table
    if kind == "record_batch":
        return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    if kind == "dict":
        return table.to_pydict()
    return table.to_pandas()


def random_unit(seed: int, row_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, row id)."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def adapter_columns(table: pa.Table, adapter) -> list[str]:
    """The columns of `table` that `adapter` reads (its fields and id column), in its order; all of them when the
    adapter does not say."""
    return [c for c in dict.fromkeys(getattr(adapter, "columns", None) or table.column_names)
            if c in table.column_names]


def adapter_rows(table: pa.Table, adapter) -> list[dict]:
    """The rows of `table` as dicts of the columns `adapter` reads (its fields and id column) that the table has:
    the other columns (a long `meta`, a pass-through blob) stay in Arrow."""
    names = adapter_columns(table, adapter)
    if not names:
        return [{} for _ in range(table.num_rows)]
    return table.select(names).to_pylist()


def prepare_rows(table: pa.Table, adapter, chat) -> tuple[list[str], list[Any], list[str | None]]:
    """ids, tokenized examples (None where rejected) and reject reasons, one per row: the one tokenization path of
    every scorer, in this thread or in a worker process (scoring/prepare_workers.py)."""
    from drift_stream.data.example_types import RowError

    ids: list[str] = []
    tokenized: list[Any] = []
    reasons: list[str | None] = []
    for row in adapter_rows(table, adapter):
        ids.append(adapter.row_id(row))
        try:
            tokenized.append(chat.encode(adapter.to_example(row)))
            reasons.append(None)
        except RowError as err:
            tokenized.append(None)
            reasons.append(err.reason)
    return ids, tokenized, reasons


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedRows:
    """One chunk's rows as the scorer needs them (`BatchScorer.prepare_chunk`), one entry per row."""

    ids: list[str]
    tokenized: list[Any]  # TokenizedExample, or None where rejected
    reasons: list[str | None]
    tokenization: dict  # the tokenizer's counters for these rows (ChatTokenizer.pop_stats)


@dataclass
class ChunkPreparer:
    """`BatchScorer.prepare_chunk` as a picklable object (adapter + chat tokenizer, no model): what a tokenization
    worker process runs (scoring/prepare_workers.py). Its counters are its own copy's, popped per chunk."""

    adapter: Any
    chat: Any

    def __call__(self, table: pa.Table) -> PreparedRows:
        ids, tokenized, reasons = prepare_rows(table, self.adapter, self.chat)
        return PreparedRows(ids, tokenized, reasons, self.chat.pop_stats() if hasattr(self.chat, "pop_stats") else {})


@dataclass
class ExampleScores:
    """Per-example numbers for the rows that were tokenized, in the order they were given."""

    score: np.ndarray  # [n] float64
    grad_norm: np.ndarray  # [n] float64 (NaN where not computed)
    loss: np.ndarray  # [n] float64 (NaN where not computed)
    bad: list[str | None]  # [n] reason when a row turned out unscorable (non-finite)
    query_scores: np.ndarray | None = None  # [n, m]
    turn_scores: list | None = None  # granularity turn: [n] arrays [turns] (NaN: unscored turn; scoring/turns.py)


class BatchScorer:
    """Base class: turns a batch of rows into the same rows plus score columns. Subclasses score tokenized examples."""

    name = "base"

    def __init__(self, adapter, chat_tokenizer, config: ScoreConfig, model_path: str | None = None):
        self.adapter = adapter
        self.chat = chat_tokenizer
        self.config = config
        self.model_path = model_path
        self.padding = PaddingStats()  # real vs padded tokens of the batches run since the last pop_padding_stats()

    # -- the contract ------------------------------------------------------------------------------------------
    def __call__(self, batch: Any) -> Any:
        table, kind = _to_table(batch)
        return _from_table(self.score_table(table), kind)

    def config_dict(self) -> dict:
        """The resolved config: what the run directory records and compares on resume."""
        return {
            "scorer": self.name,
            "model": self.model_path,
            **output_dict(self.config),
            "adapter_spec": self.adapter.config_dict(),
            "tokenization": self.chat.config_dict(),
            **self._extra_config(),
        }

    def execution_config(self) -> dict:
        """The execution-only settings (batch size, device, ...): recorded in config.json, not compared on resume."""
        return execution_dict(self.config)

    def pop_padding_stats(self) -> dict:
        """Token counts of the model batches run since the last call ({real_tokens, padded_tokens, batches, ...})."""
        stats, self.padding = self.padding.to_dict(), PaddingStats()
        return stats

    def pop_tokenization_stats(self) -> dict:
        """{"reasoning_dropped": assistant turns whose reasoning the chat template did not render} since the last
        call (tokenization.ChatTokenizer.stats)."""
        return self.chat.pop_stats() if hasattr(self.chat, "pop_stats") else {}

    def manifest_info(self) -> dict:
        """Facts learned while scoring (e.g. the fitted beta) that the run manifest records."""
        return {}

    def _extra_config(self) -> dict:
        return {}

    def _score_examples(self, examples: Sequence) -> ExampleScores:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the shared path ---------------------------------------------------------------------------------------
    def prepare(self, table: pa.Table) -> tuple[list[str], list[Any], list[str | None]]:
        """ids, tokenized examples (None where rejected) and reject reasons, one per row. Only the columns the
        adapter reads become Python objects (`adapter_rows`)."""
        return prepare_rows(table, self.adapter, self.chat)

    def prepare_chunk(self, table: pa.Table) -> "PreparedRows":
        """`prepare` plus the tokenizer's counters of this chunk alone: what the prefetch thread computes for chunk
        i+1 while the model runs chunk i (engines/local.py). The scores do not depend on where it ran (tested)."""
        ids, tokenized, reasons = self.prepare(table)
        return PreparedRows(ids, tokenized, reasons, self.pop_tokenization_stats())

    def chunk_preparer(self) -> ChunkPreparer:
        """`prepare_chunk` without the model: a picklable copy of the adapter and tokenizer for a worker process."""
        return ChunkPreparer(self.adapter, self.chat)

    def score_table(self, table: pa.Table, prepared: "PreparedRows | None" = None) -> pa.Table:
        """`table` plus the score columns; `prepared`: `prepare_chunk(table)`, computed ahead."""
        n = table.num_rows
        if prepared is None:
            ids, tokenized, reasons = self.prepare(table)
        else:
            ids, tokenized, reasons = prepared.ids, prepared.tokenized, list(prepared.reasons)
        valid = [i for i in range(n) if tokenized[i] is not None]
        score = np.full(n, np.nan)
        grad_norm = np.full(n, np.nan)
        loss = np.full(n, np.nan)
        num_tokens = np.zeros(n, dtype=np.int32)
        query_scores: list[Any] = [None] * n
        turn_scores: list[Any] = [None] * n
        if valid:
            # Sorting by length keeps padding low; per-example numbers do not depend on the batch they fall in.
            order = sorted(valid, key=lambda i: len(tokenized[i].input_ids))
            result = self._score_examples([tokenized[i] for i in order])
            for pos, i in enumerate(order):
                num_tokens[i] = int(sum(tokenized[i].loss_mask))
                if result.bad[pos] is not None:
                    reasons[i] = result.bad[pos]
                    continue
                score[i] = result.score[pos]
                grad_norm[i] = result.grad_norm[pos]
                loss[i] = result.loss[pos]
                if result.query_scores is not None and self.config.keep_query_scores:
                    query_scores[i] = result.query_scores[pos].astype(np.float32).tolist()
                if result.turn_scores is not None:
                    turn_scores[i] = result.turn_scores[pos]
        rejected = np.array([r is not None for r in reasons], dtype=bool)
        score[rejected] = np.nan
        out = _with_ids(table, ids, self.adapter)
        for name in SCORE_COLUMNS:
            if name in out.column_names:
                out = out.drop_columns([name])  # re-scoring a scored table replaces its columns
        out = out.append_column("drift_score", pa.array(_nullable(score), pa.float32()))
        out = out.append_column("drift_grad_norm", pa.array(_nullable(grad_norm), pa.float32()))
        out = out.append_column("drift_num_tokens", pa.array(num_tokens, pa.int32()))
        out = out.append_column("drift_loss", pa.array(_nullable(loss), pa.float32()))
        if self.config.keep_query_scores and self.name in GRADIENT_SCORERS:
            out = out.append_column("drift_query_scores", pa.array(query_scores, pa.list_(pa.float32())))
        if self.config.granularity == "turn":
            from drift_stream.scoring.turns import turn_columns

            for name, column in turn_columns(tokenized, turn_scores, reasons):
                out = out.append_column(name, column)
        out = out.append_column("drift_reject_reason", pa.array(reasons, pa.string()))
        return out


def _with_ids(table: pa.Table, ids: list[str], adapter) -> pa.Table:
    """`table` whose `id` column holds `ids` (text, in the input's `id` place, else last); an input `id` column that
    is not text, or that the adapter does not read, is kept under SOURCE_ID with its type (formats.py).

    Decided from the schema alone, so every batch and every shard of a run (and `data_schema`'s zero-row call) gets
    the same columns."""
    from drift_stream.io.columns import SOURCE_ID

    column = pa.array(ids, pa.string())
    if ID not in table.column_names:
        return table.append_column(ID, column)
    at = table.column_names.index(ID)
    source = table.column(ID)
    out = table.set_column(at, ID, column)
    if adapter.keeps_source_id(source.type) and SOURCE_ID not in out.column_names:
        out = out.append_column(SOURCE_ID, source)
    return out


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in values]


class _ModelScorer(BatchScorer):
    """Scorers that run the model: loads it lazily so that constructing one is cheap."""

    def __init__(self, adapter, chat_tokenizer, config, model_path=None, model=None):
        super().__init__(adapter, chat_tokenizer, config, model_path)
        self._model = model
        self._featurizer = None

    @property
    def model(self):
        if self._model is None:
            from drift_stream.model.loading import load_model

            self._model = load_model(self.model_path, device=self.config.device, dtype=self.config.dtype)
            positions = getattr(self._model.config, "max_position_embeddings", None)
            if positions and self.config.max_tokens > positions:
                logger.warning(
                    "max_tokens %d exceeds the model's %d positions: rows between the two are scored past the "
                    "context the model was trained on; pass --max-tokens %d to reject them instead",
                    self.config.max_tokens, positions, positions,
                )
        return self._model

    def _collate(self, chunk):
        from drift_stream.data.tokenization import collate

        batch = collate(chunk, pad_token_id=self.chat.pad_token_id)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def _planned(self, examples):
        """(indices into examples, collated batch) per batch: batch_size rows, or max_batch_tokens padded tokens."""
        lengths = [len(ex.input_ids) for ex in examples]
        for idx in plan_batches(lengths, batch_size=self.config.batch_size,
                                max_batch_tokens=self.config.max_batch_tokens):
            self.padding.add([lengths[i] for i in idx])
            yield idx, self._collate([examples[i] for i in idx])

    def _losses(self, examples) -> tuple[np.ndarray, list[str | None]]:
        import torch

        from drift_stream.model.losses import example_losses

        arr = np.full(len(examples), np.nan)
        for idx, batch in self._planned(examples):
            with torch.no_grad():
                loss = example_losses(self.model, batch).loss
            arr[idx] = loss.double().cpu().numpy()
        bad = [None if math.isfinite(v) else "nonfinite_loss" for v in arr]
        return arr, bad


def chat_tokenizer_for(tokenizer: Any, cfg: ScoreConfig):
    """The ChatTokenizer a ScoreConfig describes (max_tokens, overlong, chat template choice, stop tokens)."""
    from drift_stream.data.tokenization import ChatTokenizer

    return ChatTokenizer.from_options(tokenizer, max_tokens=cfg.max_tokens, overlong=cfg.overlong,
                                      chat_template=cfg.chat_template, use_chat_template=cfg.use_chat_template,
                                      stop_tokens=cfg.stop_tokens)

