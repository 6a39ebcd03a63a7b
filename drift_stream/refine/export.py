"""Export a refined run into the layout a trainer loads: `drift-stream export RUN --format
trl|llamafactory|repeat|tokens|fireworks` (docs/trainers.md: which trainer reads which).

RUN is the --out of `drift-stream refine` (its manifest.json says kind "refine"). Each row's weight is its `weight`
column (`--policy weights`), else its `keep` column (`--keep-all`), else 1 (a filter's output holds kept rows only).
Rows are turned back into conversations by the adapter the source run was scored with (recorded in its config.json),
so every input format exports the same way. Each assistant turn k gets its own weight (export_source.turn_weights_out):
its input message `weight` (OpenAI 0/1, LLaMA-Factory `loss_weight`; else 1) x `turn_weights[k]` (a per-turn weights
refine: the row weight is their mean, so it is not multiplied in again), or x the row's weight x `turn_keep[k]` (a
per-turn filter), or x the row's weight; llamafactory, tokens and fireworks carry it per turn, trl and repeat cut
weight-0 trailing turns only (see each format). Rows of weight 0 are left out of every format but `repeat` (which
writes them 0 times; a weighted trainer would skip them anyway). Output: `OUT/data/train-0000i-of-0000N.parquet`
(`.jsonl` for fireworks; one per refined shard, written atomically), `OUT/completions/0000i.json` (a marker per
finished shard), `OUT/config.json` (what the export was made from), `OUT/manifest.json` (counts, written last), and
for llamafactory `OUT/dataset_info.yaml`.

Resume: a rerun with the same command skips the shards whose marker and file exist and writes the others, so a
killed export (or one on S3) finishes without rewriting what it already wrote; every shard's content depends only on
its source shard and the config (repeat draws come from (seed, shard)), so the result is the one an uninterrupted
export writes. config.json records the export config, the refined run, its refine config and its shard list; a
rerun that differs in any of them is refused (RunDirMismatchError, printing both).

* ``trl``: TRL's conversational prompt/completion layout, `{"id", "prompt": [messages before the answer],
  "completion": [{"role": "assistant", ...}], "weight"}` (SFTTrainer's default `completion_only_loss` then trains on
  the answer, as drift scored it), or with `layout="messages"` `{"id", "messages", "weight"}` for multi-turn rows
  (train with `assistant_only_loss=True`: every assistant turn, as drift scored it). TRL reads no per-turn weight: a
  conversation is cut after its last assistant turn of weight > 0 (dropped or input-weight-0 trailing turns go), and
  prompt/completion takes a row whose only turn of weight > 0 is then the last one (earlier weight-0 turns are its
  prompt); a weight-0 turn before a trained one stays in `--layout messages` and is trained (logged). Each message is
  the dict the adapter handed the chat template when the row was scored, stored as one JSON object (Arrow's
  `arrow.json`, which `datasets` reads back as its `Json` feature): `tool_calls` (arguments as given, string or
  object), `reasoning_content`, a tool-call-only turn's `content: null`, a tool turn's `tool_call_id` / `name` all
  reach TRL's `apply_chat_template` unchanged, and no key appears that the row did not have (a struct column would add
  every other row's keys as nulls). Text rows: `{"id", "text", "weight"}`. Plain-string prompt/completion rows (the
  `prompt_completion` adapter's `string_format: text`, scored without a chat template): TRL's standard layout `{"id",
  "prompt": str, "completion": str, "weight"}`, which TRL tokenizes without a template; `layout` applies to
  conversations only. `load_dataset("parquet", data_files=OUT + "/data/*.parquet")` then `WeightedSFTTrainer`. TRL's
  completion mask is everything the template renders after the prompt: where the template writes text after the
  end-of-turn token (the shipped one writes a newline) TRL also trains on it, while drift's mask stops at the token.
  Standard (string) rows: TRL tokenizes prompt + completion + EOS in one call, drift each part apart; the tokens agree
  unless the tokenizer merges across the boundary (TRL warns when it does).
* ``llamafactory``: LLaMA-Factory 0.9.5's v1 sample (`llamafactory/v1/utils/types.py` SFTSample): `{"messages":
  [{"role", "content": [{"type": "text", "value"}], "loss_weight"}]}` with each assistant turn's weight on its message
  (the row's weight when there are no turn weights) and 0.0 on the others (set explicitly: its renderer reads
  `message.get("loss_weight", ...)`, so a null would break it). An assistant turn's content is its parts in the order
  templates render them: `reasoning` (reasoning_content), `text`, then one `tool_call` per call, valued `{"name",
  "arguments"}` as a JSON string with the arguments as an object (v1 `ToolCall`; its renderer writes
  `json.dumps(arguments)`). v1 messages have no field for a tool turn's `tool_call_id` / `name`: they are left out.
  Text rows and plain-string prompt/completion rows are refused (LLaMA-Factory renders every sample with a chat
  template; drift scored these without one). v1 reads a dataset-info YAML, not v0's dataset_info.json
  (`v1/core/data_engine.py`: a `.yaml` path is loaded with OmegaConf): `OUT/dataset_info.yaml` names the data
  directory with `source: local`; train with `USE_V1=1 llamafactory-cli sft --train_dataset OUT/dataset_info.yaml
  ...`. Its SFT loss is sum_t w_t * nll_t / sum_t w_t over a micro-batch (`v1/trainers/sft_trainer.py`): a
  token-weighted mean, so a long answer counts more than under `WeightedSFTTrainer`'s per-row mean (LLaMA-Factory's
  own convention).
* ``repeat``: integer copies for trainers without weights, as `refine --policy repeat`: row i appears
  floor(w_i) + Bernoulli(w_i - floor(w_i)) times (expected w_i), drawn from `seed` and the shard's position; copies
  are shuffled within each output shard by an external shuffle (export_repeat.py), so memory stays flat whatever the
  shard's size. The trl layout without a weight column.
* ``tokens``: `input_ids`, `labels`, `target_tokens` and float per-token `weights` (loss mask x the token's turn
  weight; labels -100 in a turn of weight 0), as
  the scoring run tokenized each row (export_tokens.py): for Tinker, SageMaker training sessions, and any trainer
  that reads pre-tokenized rows (axolotl, verl, torchtune). `tokenizer` replaces the recorded model path.
* ``fireworks``: Fireworks' SFT JSONL, `{"messages": [...], "weight": w}` with the root-level weight on every row
  (its documented rule: all rows or none); rows with turn weights also get Fireworks' per-message `"weight"` on
  each assistant message, 0 (skipped) where the turn's weight is 0, else 1 (it takes 0 or 1 only). Conversations
  only; upload one file (`cat OUT/data/*.jsonl`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq

from drift_stream.errors import ConfigError, InputError, RunDirMismatchError
from drift_stream.io.atomic import (
    atomic_binary_writer,
    atomic_parquet_writer,
    write_bytes_atomic,
)
from drift_stream.io.columns import ID, WEIGHT
from drift_stream.io.manifest import provenance
from drift_stream.io.run_dir import RunDirectory
from drift_stream.refine.export_layouts import (
    fireworks_line,
    layout_schema,
    lf_record,
    records_table,
    trl_record,
    trl_trains_zero_turns,
)
from drift_stream.refine.export_repeat import RepeatShuffle
from drift_stream.refine.export_source import (
    RefinedRun,
    example_form,
    has_turn_columns,
    open_refined,
    row_weights,
    shard_batches,
    to_example,
    turn_weights_out,
    weight_columns,
)
from drift_stream.refine.export_tokens import (
    TOKENS_SCHEMA,
    chat_tokenizer_for_run,
    token_record,
    tokens_table,
)

logger = logging.getLogger(__name__)

FORMATS = ("trl", "llamafactory", "repeat", "tokens", "fireworks")
LAYOUTS = ("prompt_completion", "messages")


@dataclass(frozen=True)
class ExportConfig:
    """Resolved export settings; recorded in OUT/config.json and OUT/manifest.json, compared on reruns."""

    format: str
    layout: str = "prompt_completion"  # trl / repeat: prompt_completion | messages
    seed: int = 0  # repeat draws
    dataset_name: str = "drift_refined"  # llamafactory: the key in dataset_info.yaml

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}: use prompt_completion or messages")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.dataset_name or not self.dataset_name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"dataset_name must be letters, digits, - and _, got {self.dataset_name!r}")


def _open_out(out: str, storage_options, config: ExportConfig, src: RefinedRun, source: str) -> RunDirectory:
    """The output directory, with this export's identity recorded (first run) or checked (a rerun)."""
    out_dir = RunDirectory(out, storage_options)
    old = out_dir.read_manifest()
    if old is not None and old.get("kind") != "export":
        raise RunDirMismatchError(f"{out} holds {old.get('kind')} output of {old.get('source_run')}, not an export: "
                                  "choose another --out")
    # an export written before config.json was recorded: its manifest says what it holds
    if (old is not None and out_dir.read_config() is None
            and (old.get("config"), old.get("source_run")) != (asdict(config), source)):
        raise RunDirMismatchError(f"{out} holds an export of {old.get('source_run')} with config {old.get('config')}; "
                                  f"this export is of {source} with {asdict(config)}: choose another --out or delete it")
    out_dir.check_config({"export": asdict(config), "source_run": source, "scored_run": src.source,
                          "source_config": src.manifest.get("config"), "source_shards": src.manifest.get("shards")})
    return out_dir


def _expected_copies(src: RefinedRun, path: str) -> float:
    """Sum of the shard's weights (a pass over the weight column alone): sizes the repeat shuffle."""
    columns = weight_columns(src.fs, path)
    if not columns:
        with src.fs.open(path, "rb") as handle:
            return float(pq.ParquetFile(handle).metadata.num_rows)
    return float(sum(row_weights(t, path).sum() for t in shard_batches(src.fs, path, columns)))


def _export_shard(src: RefinedRun, config: ExportConfig, chat, index: int, path: str, out_fs, dest: str,
                  form_hint: str | None) -> dict:
    """Write one output shard (atomically) from refined shard `path`; returns its counts and row form."""
    fmt = config.format
    counts = {"rows_in": 0, "rows_zero_weight": 0, "rows_written": 0, "weight_sum": 0.0, "form": None}
    rng = np.random.default_rng([config.seed, index])  # repeat: the copy draws, as refine --policy repeat
    shuffle = RepeatShuffle(_expected_copies(src, path), config.seed, index) if fmt == "repeat" else None
    with contextlib.ExitStack() as stack:
        if shuffle is not None:
            stack.callback(shuffle.close)
        sink = None
        first = 0  # the batch's first row in the shard: what errors name
        zero_turns_trained = 0  # trl --layout messages: rows with a weight-0 turn before a trained one
        for table in shard_batches(src.fs, path):
            weights = row_weights(table, path, first)
            draws = rng.random(table.num_rows) if fmt == "repeat" else None
            records: list = []
            for j, (row, w) in enumerate(zip(table.to_pylist(), weights)):
                counts["rows_in"] += 1
                counts["weight_sum"] += float(w)
                copies = math.floor(w) + int(draws[j] < w - math.floor(w)) if fmt == "repeat" else int(w > 0)
                if w == 0 and fmt != "repeat":
                    counts["rows_zero_weight"] += 1
                if copies == 0:
                    continue
                example = to_example(src.adapter, row, path, first + j)
                form = example_form(example)
                expected = counts["form"] or form_hint
                if expected is not None and form != expected:
                    raise InputError(f"{path} row {first + j}: a {form} row among {expected} rows (text, plain "
                                     "prompt/completion strings and conversations need different layouts); export "
                                     "them apart")
                counts["form"] = form
                turns = turn_weights_out(row, example, w, path, first + j)
                if fmt == "tokens":
                    record = token_record(chat, example, w, path, first + j, turns)
                elif fmt == "fireworks":
                    marked = has_turn_columns(row) or any("weight" in m for m in example.messages or ())
                    record = fireworks_line(example, w, path, first + j, turns if marked else None)
                elif fmt == "llamafactory":
                    record = lf_record(example, turns, path, first + j)
                else:
                    record = trl_record(example, config.layout, path, first + j, turns)
                    if config.layout == "messages" and trl_trains_zero_turns(example, turns):
                        zero_turns_trained += 1
                if isinstance(record, dict):
                    record[ID] = example.id
                    if fmt in ("trl", "llamafactory"):
                        record[WEIGHT] = float(w)
                records.extend([record] * copies)
            first += table.num_rows
            if not records:
                continue
            counts["rows_written"] += len(records)
            if fmt == "fireworks":
                sink = sink or stack.enter_context(atomic_binary_writer(out_fs, dest))
                sink.write(b"".join(records))
                continue
            schema = TOKENS_SCHEMA if fmt == "tokens" else layout_schema(fmt, config.layout, counts["form"])
            batch = tokens_table(records) if fmt == "tokens" else records_table(records, schema)
            if shuffle is not None:
                shuffle.add(batch)
                continue
            sink = sink or stack.enter_context(atomic_parquet_writer(out_fs, dest, schema))
            sink.write(batch)
        if sink is None and fmt == "fireworks":
            stack.enter_context(atomic_binary_writer(out_fs, dest))  # an empty file
        elif sink is None:
            form = counts["form"] or form_hint or "chat"
            schema = TOKENS_SCHEMA if fmt == "tokens" else layout_schema(fmt, config.layout, form)
            sink = stack.enter_context(atomic_parquet_writer(out_fs, dest, schema))
            for table in shuffle.drain() if shuffle is not None else ():
                sink.write(table)
    if zero_turns_trained:
        logger.warning("%s: %d rows have a weight-0 assistant turn before a trained one; TRL's assistant_only_loss "
                       "trains every assistant turn of --layout messages: export per-turn weights with --format "
                       "tokens or llamafactory", path, zero_turns_trained)
    return counts


def export_run(run_dir: str, fmt: str, out: str, *, layout: str = "prompt_completion", seed: int = 0,
               dataset_name: str = "drift_refined", tokenizer: str | None = None, allow_incomplete: bool = False,
               storage_options: dict | None = None) -> dict:
    """Write the refined run `run_dir` to `out` in format `fmt` (see the module docstring); returns the manifest
    (schemas/export_manifest.schema.json). A rerun skips the shards a previous run finished.

    Raises InputError (not a refined run, a bad weight, a row that does not fit the layout), IncompleteRunError
    (an unfinished refine; a refine of an incomplete run unless allow_incomplete), RunDirMismatchError (`out`
    holds another export, or another kind of output), InputChangedError (tokens: the tokenizer does not reproduce
    the scored run's tokenization).
    """
    config = ExportConfig(fmt, layout=layout, seed=seed, dataset_name=dataset_name)
    src = open_refined(run_dir, storage_options, allow_incomplete)
    if src.manifest.get("policy", {}).get("kind") == "repeat" and config.format == "repeat":
        raise ConfigError(f"{run_dir} is already a repeat output (copies written): export it with --format trl")
    source = str(run_dir) if "://" in str(run_dir) else os.path.abspath(run_dir)
    out_dir = _open_out(out, storage_options, config, src, source)
    out_fs, dst = out_dir.fs, out_dir.root
    chat = chat_tokenizer_for_run(src.scorer, src.source, tokenizer) if config.format == "tokens" else None

    done = out_dir.completed()
    ext = "jsonl" if config.format == "fireworks" else "parquet"
    totals = {"rows_in": 0, "rows_zero_weight": 0, "rows_written": 0, "weight_sum": 0.0}
    form, resumed, shards = None, 0, []
    for i, path in enumerate(src.shards):
        rel = f"data/train-{i:05d}-of-{len(src.shards):05d}.{ext}"
        marker = done.get(i)
        if marker is not None and marker.get("path") == rel and out_fs.exists(f"{dst}/{rel}"):
            resumed += 1
        else:
            counts = _export_shard(src, config, chat, i, path, out_fs, f"{dst}/{rel}", form)
            marker = {"input_index": i, "path": rel, "source_shard": os.path.basename(path), **counts}
            write_bytes_atomic(out_fs, f"{dst}/completions/{i:05d}.json", json.dumps(marker, indent=2).encode())
        if marker["form"] is not None:
            if form is not None and marker["form"] != form:
                raise InputError(f"{path}: {marker['form']} rows after {form} rows in earlier shards (text, plain "
                                 "prompt/completion strings and conversations need different layouts)")
            form = marker["form"]
        for key in totals:
            totals[key] += marker[key]
        shards.append({"path": rel, "rows": int(marker["rows_written"])})
    if resumed:
        logger.info("export %s: %d of %d shards were already written (completions/), skipped", out, resumed,
                    len(src.shards))

    if config.format == "llamafactory":
        data_dir = f"{dst}/data" if "://" not in str(out) else f"{out.rstrip('/')}/data"
        info = f"{config.dataset_name}:\n  path: {json.dumps(data_dir)}\n  source: local\n  split: train\n"
        write_bytes_atomic(out_fs, f"{dst}/dataset_info.yaml", info.encode())
    tokenization = None
    if chat is not None:
        tokenization = {"model": tokenizer or src.scorer.get("model"), **chat.config_dict()}
    manifest = {
        **provenance("export"),
        "source_run": source,
        "source_policy": src.manifest.get("policy"),
        "config": asdict(config),
        "form": form or "chat",
        **totals,
        "repeat": ({"copies_total": totals["rows_written"], "expected_copies": totals["weight_sum"]}
                   if config.format == "repeat" else None),
        "tokenization": tokenization,
        "shards_resumed": resumed,
        "shards": shards,
    }
    write_bytes_atomic(out_fs, f"{dst}/manifest.json", json.dumps(manifest, indent=2).encode())
    logger.info("export %s -> %s (%s): %d rows in, %d written", run_dir, out, config.format, totals["rows_in"],
                totals["rows_written"])
    return manifest
