"""Export a refined run into the layout a trainer loads: `drift-stream export RUN --format trl|llamafactory|repeat`.

RUN is the --out of `drift-stream refine` (its manifest.json says kind "refine"). Each row's weight is its `weight`
column (`--policy weights`), else its `keep` column (`--keep-all`), else 1 (a filter's output holds kept rows only).
Rows are turned back into conversations by the adapter the source run was scored with (recorded in its config.json),
so every input format exports the same way. Rows of weight 0 are left out of `trl` and `llamafactory` (a weighted
trainer would skip them anyway). Output: `OUT/data/train-0000i-of-0000N.parquet` (one per refined shard, written
atomically), `OUT/manifest.json` (counts, written last), and for llamafactory `OUT/dataset_info.yaml`.

* ``trl``: TRL's conversational prompt/completion layout, `{"id", "prompt": [messages before the answer],
  "completion": [{"role": "assistant", ...}], "weight"}` (SFTTrainer's default `completion_only_loss` then trains on
  the answer, as drift scored it), or with `layout="messages"` `{"id", "messages", "weight"}` for multi-turn rows
  (train with `assistant_only_loss=True`: every assistant turn, as drift scored it). Each message is the dict the
  adapter handed the chat template when the row was scored, stored as one JSON object (Arrow's `arrow.json`, which
  `datasets` reads back as its `Json` feature): `tool_calls` (arguments as given, string or object),
  `reasoning_content`, a tool-call-only turn's `content: null`, a tool turn's `tool_call_id` / `name` all reach
  TRL's `apply_chat_template` unchanged, and no key appears that the row did not have (a struct column would add
  every other row's keys as nulls). Text rows: `{"id", "text", "weight"}`. Plain-string prompt/completion rows
  (the `prompt_completion` adapter's `string_format: text`, scored without a chat template): TRL's standard layout
  `{"id", "prompt": str, "completion": str, "weight"}`, which TRL tokenizes without a template; `layout` applies to
  conversations only. `load_dataset("parquet", data_files=OUT + "/data/*.parquet")` then `WeightedSFTTrainer`.
  TRL's completion mask is everything the template renders after the prompt: where the template writes text after
  the end-of-turn token (the shipped one writes a newline) TRL also trains on it, while drift's mask stops at the
  token. Standard (string) rows: TRL tokenizes prompt + completion + EOS in one call, drift each part apart; the
  tokens agree unless the tokenizer merges across the boundary (TRL warns when it does).
* ``llamafactory``: LLaMA-Factory 0.9.5's v1 sample (`llamafactory/v1/utils/types.py` SFTSample): `{"messages":
  [{"role", "content": [{"type": "text", "value"}], "loss_weight"}]}` with the row's weight on every assistant
  message and 0.0 on the others (set explicitly: its renderer reads `message.get("loss_weight", ...)`, so a null
  would break it). An assistant turn's content is its parts in the order templates render them: `reasoning`
  (reasoning_content), `text`, then one `tool_call` per call, valued `{"name", "arguments"}` as a JSON string with
  the arguments as an object (v1 `ToolCall`; its renderer writes `json.dumps(arguments)`). v1 messages have no field
  for a tool turn's `tool_call_id` / `name`: they are left out. Text rows and plain-string prompt/completion rows
  are refused (LLaMA-Factory renders every sample with a chat template; drift scored these without one). v1 reads
  a dataset-info YAML, not v0's dataset_info.json (`v1/core/data_engine.py`: a `.yaml` path is loaded with
  OmegaConf): `OUT/dataset_info.yaml` names the data directory with `source: local`; train with
  `USE_V1=1 llamafactory-cli sft --train_dataset OUT/dataset_info.yaml ...`. Its SFT loss is
  sum_t w_t * nll_t / sum_t w_t over a micro-batch (`v1/trainers/sft_trainer.py`): a token-weighted mean, so a long
  answer counts more than under `WeightedSFTTrainer`'s per-row mean (LLaMA-Factory's own convention).
* ``repeat``: integer copies for trainers without weights, as `refine --policy repeat`: row i appears
  floor(w_i) + Bernoulli(w_i - floor(w_i)) times (expected w_i), drawn from `seed` and the shard's position; copies
  are shuffled within each output shard. The trl layout without a weight column.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.errors import (
    ConfigError,
    IncompleteRunError,
    InputError,
    RunDirMismatchError,
)
from drift_stream.io.atomic import atomic_parquet_writer, write_bytes_atomic
from drift_stream.io.columns import ID, KEEP, WEIGHT
from drift_stream.io.manifest import provenance
from drift_stream.io.run_dir import RunDirectory, open_path

logger = logging.getLogger(__name__)

FORMATS = ("trl", "llamafactory", "repeat")
LAYOUTS = ("prompt_completion", "messages")
BATCH_ROWS = 8192
# one message per JSON object: exactly the keys the adapter passed to the chat template (module docstring)
_MESSAGES = pa.list_(pa.json_())
_LF_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(pa.struct([("type", pa.string()),
                                                                                  ("value", pa.string())]))),
                         ("loss_weight", pa.float32())])


@dataclass(frozen=True)
class ExportConfig:
    """Resolved export settings; recorded in OUT/manifest.json and compared on reruns."""

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


@dataclass
class _Source:
    fs: Any
    shards: list[str]
    adapter: Any
    url: str
    manifest: dict


def _open_refined(run_dir: str, storage_options, allow_incomplete: bool) -> _Source:
    """The data shards of a refine output and the adapter its source run was scored with."""
    from drift_stream.data.formats import Adapter

    fs, root = open_path(run_dir, storage_options)
    manifest = _read_json(fs, f"{root}/manifest.json")
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
    return _Source(fs, shards, adapter, run_dir, manifest)


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def _row_weights(table: pa.Table, path: str, first_row: int = 0) -> np.ndarray:
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


def _conversation(adapter, row: dict, path: str, index: int):
    from drift_stream.data.example_types import RowError

    try:
        example = adapter.to_example(row)
    except RowError as err:
        raise InputError(f"{path} row {index}: {err.reason} (the scorer should have rejected it)") from err
    return example


def _message_json(message, path: str, index: int) -> str:
    """One message as the adapter passed it to the chat template (role and content first), as JSON text."""
    turn = {"role": message["role"], "content": message.get("content"),
            **{k: v for k, v in message.items() if k not in ("role", "content")}}
    try:
        return json.dumps(turn, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path} row {index}: a {turn['role']} message cannot be written as JSON ({err})") from err


def _trl_record(example, layout: str, path: str, index: int) -> dict:
    if example.text is not None:
        return {"text": example.text}
    if example.response is not None:  # scored without a chat template: TRL's standard (string) layout
        return {"prompt": example.prompt, "completion": example.response}
    messages = [_message_json(m, path, index) for m in example.messages]
    if layout == "messages":
        return {"messages": messages}
    turns = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    if turns != [len(messages) - 1]:
        raise InputError(f"{path} row {index} (id {example.id}) has {len(turns)} assistant turns or does not end "
                         "with one: prompt/completion trains the last answer only. Pass --layout messages and "
                         "train with assistant_only_loss=True")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _lf_content(message) -> list[dict]:
    """LLaMA-Factory v1 content parts: reasoning, text, tool calls (assistant turns); text alone otherwise."""
    content = message.get("content") or ""
    if message["role"] != "assistant":
        return [{"type": "text", "value": content}]
    parts = []
    reasoning = message.get("reasoning_content") or message.get("thinking")
    if isinstance(reasoning, str) and reasoning:
        parts.append({"type": "reasoning", "value": reasoning})
    calls = message.get("tool_calls") or []
    if content or not (parts or calls):
        parts.append({"type": "text", "value": content})
    for call in calls:
        fn = call.get("function", call)
        arguments = fn.get("arguments")
        if isinstance(arguments, str):  # OpenAI's JSON-string arguments; v1's ToolCall holds the object
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        parts.append({"type": "tool_call",
                      "value": json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False)})
    return parts


def _lf_record(example, weight: float, path: str, index: int) -> dict:
    if example.messages is None:
        kind = "plain text" if example.text is not None else "a plain-string prompt/completion pair"
        raise InputError(f"{path} row {index} (id {example.id}) is {kind}, scored without a chat template; "
                         "LLaMA-Factory renders every sample with one: export it with --format trl")
    return {"messages": [{"role": m["role"], "content": _lf_content(m),
                          "loss_weight": float(weight) if m["role"] == "assistant" else 0.0}
                         for m in example.messages]}


def _schema(config: ExportConfig, form: str) -> pa.Schema:
    """form: "chat" (conversations), "text" (a `text` column) or "plain" (prompt/completion strings)."""
    fields = [(ID, pa.string())]
    if config.format == "llamafactory":
        fields.append(("messages", pa.list_(_LF_MESSAGE)))
    elif form == "text":
        fields.append(("text", pa.string()))
    elif form == "plain":
        fields += [("prompt", pa.string()), ("completion", pa.string())]
    elif config.layout == "messages":
        fields.append(("messages", _MESSAGES))
    else:
        fields += [("prompt", _MESSAGES), ("completion", _MESSAGES)]
    if config.format != "repeat":
        fields.append((WEIGHT, pa.float32()))
    return pa.schema(fields)


def _to_table(records: list[dict], schema: pa.Schema) -> pa.Table:
    """Records -> table; list<arrow.json> columns are built from their JSON text (from_pylist cannot)."""
    columns = []
    for field in schema:
        values = [r[field.name] for r in records]
        if field.type == _MESSAGES:
            text = pa.array(values, type=pa.list_(pa.string()))
            columns.append(pa.ListArray.from_arrays(text.offsets, pa.ExtensionArray.from_storage(
                _MESSAGES.value_type, text.values)))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _batches(fs, path: str) -> Iterator[pa.Table]:
    with fs.open(path, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS):
            yield pa.Table.from_batches([batch])


def _records(src: _Source, config: ExportConfig, table: pa.Table, path: str, rng, counts: dict,
             state: dict) -> list[dict]:
    """The output records of one batch of a refined shard (weight-0 rows dropped; repeat: each row's copies)."""
    weights = _row_weights(table, path, state["shard_row"])
    draws = rng.random(table.num_rows) if config.format == "repeat" else None
    out = []
    for j, (row, w) in enumerate(zip(table.to_pylist(), weights)):
        index = state["shard_row"]  # position in this shard: what the error messages name
        state["shard_row"] += 1
        counts["rows_in"] += 1
        state["weight_sum"] += float(w)
        copies = 1
        if config.format == "repeat":
            copies = int(math.floor(w)) + int(draws[j] < w - math.floor(w))
        elif w == 0:
            counts["rows_zero_weight"] += 1
            continue
        if copies == 0:
            continue
        example = _conversation(src.adapter, row, path, index)
        form = "text" if example.text is not None else "plain" if example.response is not None else "chat"
        if state["form"] is None:
            state["form"] = form
        elif state["form"] != form:
            raise InputError(f"{path} row {index}: a {form} row among {state['form']} rows (text, plain "
                             "prompt/completion strings and conversations need different layouts); export them apart")
        if config.format == "llamafactory":
            record = _lf_record(example, w, path, index)
        else:
            record = _trl_record(example, config.layout, path, index)
        record[ID] = example.id
        if config.format != "repeat":
            record[WEIGHT] = float(w)
        out.extend([record] * copies)
    return out


def export_run(run_dir: str, fmt: str, out: str, *, layout: str = "prompt_completion", seed: int = 0,
               dataset_name: str = "drift_refined", allow_incomplete: bool = False,
               storage_options: dict | None = None) -> dict:
    """Write the refined run `run_dir` to `out` in format `fmt` (see the module docstring); returns the manifest
    (schemas/export_manifest.schema.json).

    Raises InputError (not a refined run, a bad weight, a row that does not fit the layout), IncompleteRunError
    (an unfinished refine; a refine of an incomplete run unless allow_incomplete), RunDirMismatchError (`out`
    holds another export).
    """
    config = ExportConfig(fmt, layout=layout, seed=seed, dataset_name=dataset_name)
    src = _open_refined(run_dir, storage_options, allow_incomplete)
    out_fs, dst = open_path(out, storage_options)
    source = str(run_dir) if "://" in str(run_dir) else os.path.abspath(run_dir)
    old = _read_json(out_fs, f"{dst}/manifest.json")
    recorded = asdict(config)
    if old is not None and (old.get("kind"), old.get("config"), old.get("source_run")) != ("export", recorded,
                                                                                         source):
        raise RunDirMismatchError(f"{out} holds {old.get('kind')} output of {old.get('source_run')} with config "
                                  f"{old.get('config')}; this export is of {source} with {recorded}: choose another "
                                  "--out or delete it")
    if src.manifest.get("policy", {}).get("kind") == "repeat" and config.format == "repeat":
        raise ConfigError(f"{run_dir} is already a repeat output (copies written): export it with --format trl")

    counts = {"rows_in": 0, "rows_zero_weight": 0, "rows_written": 0}
    state = {"weight_sum": 0.0, "form": None, "shard_row": 0}
    names = [f"{dst}/data/train-{i:05d}-of-{len(src.shards):05d}.parquet" for i in range(len(src.shards))]
    written = []
    for i, (path, dest) in enumerate(zip(src.shards, names)):
        rng = np.random.default_rng([config.seed, i])
        state["shard_row"] = 0
        with contextlib.ExitStack() as stack:
            writer, nrows = None, 0
            held: list[dict] = []  # repeat: the shard's copies, shuffled before writing
            for table in _batches(src.fs, path):
                records = _records(src, config, table, path, rng, counts, state)
                if config.format == "repeat":
                    held.extend(records)
                    continue
                if writer is None:
                    writer = stack.enter_context(atomic_parquet_writer(out_fs, dest, _schema(config, state["form"])))
                writer.write(_to_table(records, writer.schema))
                nrows += len(records)
            if config.format == "repeat":
                held = [held[k] for k in rng.permutation(len(held))]
            schema = _schema(config, state["form"] or "chat")
            if writer is None:  # repeat, or a shard without rows
                writer = stack.enter_context(atomic_parquet_writer(out_fs, dest, schema))
                writer.write(_to_table(held, schema))
                nrows = len(held)
        written.append(nrows)
        counts["rows_written"] += nrows
    form, weight_sum = state["form"], state["weight_sum"]

    if config.format == "llamafactory":
        data_dir = f"{dst}/data" if "://" not in str(out) else f"{out.rstrip('/')}/data"
        info = f"{config.dataset_name}:\n  path: {json.dumps(data_dir)}\n  source: local\n  split: train\n"
        write_bytes_atomic(out_fs, f"{dst}/dataset_info.yaml", info.encode())
    manifest = {
        **provenance("export"),
        "source_run": source,
        "source_policy": src.manifest.get("policy"),
        "config": recorded,
        "form": form or "chat",
        **counts,
        "weight_sum": weight_sum,
        "repeat": ({"copies_total": counts["rows_written"], "expected_copies": weight_sum}
                   if config.format == "repeat" else None),
        "shards": [{"path": f"data/{os.path.basename(p)}", "rows": int(r)} for p, r in zip(names, written)],
    }
    write_bytes_atomic(out_fs, f"{dst}/manifest.json", json.dumps(manifest, indent=2).encode())
    logger.info("export %s -> %s (%s): %d rows in, %d written", run_dir, out, config.format, counts["rows_in"],
                counts["rows_written"])
    return manifest
