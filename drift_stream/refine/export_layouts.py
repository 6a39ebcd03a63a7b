"""Row layouts of `drift-stream export` (see export.py's docstring for each format): TRL and LLaMA-Factory records
and their Arrow schemas, Fireworks' JSONL lines, and an atomic writer for JSONL shards."""

from __future__ import annotations

import contextlib
import json

import pyarrow as pa

from drift_stream.errors import InputError
from drift_stream.io.columns import ID, WEIGHT

# one message per JSON object: exactly the keys the adapter passed to the chat template (export.py docstring)
MESSAGES = pa.list_(pa.json_())
LF_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(pa.struct([("type", pa.string()),
                                                                                ("value", pa.string())]))),
                        ("loss_weight", pa.float32())])


def message_dict(message) -> dict:
    """One message as the adapter passed it to the chat template, role and content first."""
    return {"role": message["role"], "content": message.get("content"),
            **{k: v for k, v in message.items() if k not in ("role", "content")}}


def message_json(message, path: str, index: int) -> str:
    """`message_dict` as JSON text (InputError naming the row when a value is not JSON)."""
    turn = message_dict(message)
    try:
        return json.dumps(turn, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path} row {index}: a {turn['role']} message cannot be written as JSON ({err})") from err


def trl_record(example, layout: str, path: str, index: int, turns: tuple[float, ...] | None = None) -> dict:
    """turns: each assistant turn's exported weight (export_source.turn_weights_out). TRL reads no per-turn weight:
    the conversation is cut after its last assistant turn of weight > 0 (later turns are dropped, earlier ones stay);
    prompt/completion then needs that turn to be the only one of weight > 0 (the earlier ones are its prompt)."""
    if example.text is not None:
        return {"text": example.text}
    if example.response is not None:  # scored without a chat template: TRL's standard (string) layout
        return {"prompt": example.prompt, "completion": example.response}
    positions = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    turns = turns if turns is not None else (1.0,) * len(positions)
    trained = [i for i, w in zip(positions, turns) if w > 0]
    # cut only where a trailing assistant turn weighs 0 (a row without turn weights is written whole, as scored)
    end = trained[-1] + 1 if trained and trained[-1] != positions[-1] else len(example.messages)
    messages = [message_json(m, path, index) for m in example.messages[:end]]
    if layout == "messages":
        return {"messages": messages}
    if trained != [len(messages) - 1]:
        weighted = "" if len(trained) == len(positions) else f" of weight > 0 (of {len(positions)})"
        raise InputError(f"{path} row {index} (id {example.id}) has {len(trained)} assistant turns{weighted} or does "
                         "not end with one: prompt/completion trains the last answer only. Pass --layout messages "
                         "and train with assistant_only_loss=True (or export per-turn weights with --format tokens "
                         "or llamafactory)")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def trl_trains_zero_turns(example, turns: tuple[float, ...]) -> bool:
    """A messages-layout row in which TRL's assistant_only_loss trains a turn whose weight is 0 (one before the
    last assistant turn of weight > 0: the conversation cannot be cut there)."""
    if example.messages is None:
        return False
    trained = [k for k, w in enumerate(turns) if w > 0]
    return bool(trained) and any(w == 0 for w in turns[: trained[-1]])


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


def _needs_chat(example, path: str, index: int, trainer: str) -> None:
    if example.messages is None:
        kind = "plain text" if example.text is not None else "a plain-string prompt/completion pair"
        raise InputError(f"{path} row {index} (id {example.id}) is {kind}, scored without a chat template; "
                         f"{trainer} renders every sample with one: export it with --format trl or tokens")


def lf_record(example, turns: tuple[float, ...], path: str, index: int) -> dict:
    """turns: each assistant turn's `loss_weight` (export_source.turn_weights_out); other messages get 0.0."""
    _needs_chat(example, path, index, "LLaMA-Factory")
    weights = iter(turns)
    return {"messages": [{"role": m["role"], "content": _lf_content(m),
                          "loss_weight": float(next(weights)) if m["role"] == "assistant" else 0.0}
                         for m in example.messages]}


def fireworks_line(example, weight: float, path: str, index: int, turns: tuple[float, ...] | None = None) -> bytes:
    """One line of Fireworks' SFT JSONL: {"messages": [...], "weight": w} (root-level weight on every row). With
    `turns`, each assistant message gets Fireworks' per-message `"weight"`: 0 (not trained) where the turn's weight
    is 0, else 1 (it takes 0 or 1 only: a float turn weight is not carried, the root weight is the row's)."""
    _needs_chat(example, path, index, "Fireworks")
    messages = [message_dict(m) for m in example.messages]
    if turns is not None:
        assistants = [m for m in messages if m["role"] == "assistant"]
        for m, w in zip(assistants, turns):
            m["weight"] = 0 if w == 0 else 1
    record = {"messages": messages, "weight": float(weight)}
    try:
        return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as err:
        raise InputError(f"{path} row {index}: the row cannot be written as JSON ({err})") from err


def layout_schema(fmt: str, layout: str, form: str) -> pa.Schema:
    """Schema of a trl / llamafactory / repeat shard; form: "chat", "text" (a `text` column) or "plain"
    (prompt/completion strings)."""
    fields = [(ID, pa.string())]
    if fmt == "llamafactory":
        fields.append(("messages", pa.list_(LF_MESSAGE)))
    elif form == "text":
        fields.append(("text", pa.string()))
    elif form == "plain":
        fields += [("prompt", pa.string()), ("completion", pa.string())]
    elif layout == "messages":
        fields.append(("messages", MESSAGES))
    else:
        fields += [("prompt", MESSAGES), ("completion", MESSAGES)]
    if fmt != "repeat":
        fields.append((WEIGHT, pa.float32()))
    return pa.schema(fields)


def records_table(records: list[dict], schema: pa.Schema) -> pa.Table:
    """Records -> table; list<arrow.json> columns are built from their JSON text (from_pylist cannot)."""
    columns = []
    for field in schema:
        values = [r[field.name] for r in records]
        if field.type == MESSAGES:
            text = pa.array(values, type=pa.list_(pa.string()))
            columns.append(pa.ListArray.from_arrays(text.offsets, pa.ExtensionArray.from_storage(
                MESSAGES.value_type, text.values)))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)
