"""Format adapters -> canonical examples (Example).

An adapter is a small YAML spec (adapters/*.yaml, checked against schemas/adapter.schema.json): data, never executed.
`load_adapter("messages")` loads a built-in, `load_adapter("/path/my.yaml")` a user's own file.

Row ids (`Adapter.row_id`): the adapter's `id_field` column as text when present and non-empty (7 -> "7", and 7.0 ->
"7": pandas stores an int column with nulls as float); otherwise `content_hash` of the adapter's own fields only
(e.g. messages and system, instruction/input/output), nulls dropped at every depth. A row therefore gets the same id
in every run, whichever other files (and their null-filled columns and struct fields) the run holds; identical rows
share an id (repeated ids: engines/local.py reports them, refine/chain.py joins them one to one).

Reject reasons: see example_types.py. Tokenization (ChatTokenizer, collate) lives in tokenization.py.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from drift_stream.data.example_types import Example, Message, RowError
from drift_stream.errors import AdapterError
from drift_stream.io.columns import ID, RESERVED_PREFIX

# An input `id` column that is not text (int64 ids, ...) is kept under this name, its type unchanged (scoring/base.py)

ROLES = ("system", "user", "assistant", "tool")
# Message keys passed on to the chat template besides role and content (OpenAI tool calls, reasoning).
_PASSED_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")

# kind -> (required fields, optional fields); a required field's column defaults to its own name.
_KIND_FIELDS = {
    "conversation": (("messages",), ("system",)),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "instruction": (("instruction", "output"), ("input", "system")),
    "text": (("text",), ()),
    "qa": (("question", "answer"), ("system",)),
}
_KIND_OPTIONS = {
    "conversation": {"message", "roles"},
    "prompt_completion": {"message", "roles", "string_format"},
    "instruction": {"input_separator"},
    "text": set(),
    "qa": {"answer_patterns"},
}
_ALL_OPTIONS = {"message", "roles", "string_format", "input_separator", "answer_patterns"}


def reference_example(example: Example) -> Example:
    """A validation query with its reference answer as the assistant turn (off-policy targets)."""
    if example.messages is None or not example.reference:
        raise RowError("no_reference")
    turn = {"role": "assistant", "content": example.reference}
    return Example(id=example.id, messages=tuple(example.messages) + (turn,), answer=example.answer)


# ----------------------------------------------------------------------------------------------------- adapters


def _builtin_dir():
    return resources.files("drift_stream") / "adapters"


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads((resources.files("drift_stream") / "schemas" / "adapter.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def list_adapters() -> list[tuple[str, str]]:
    """Built-in adapters as (name, description), sorted by name."""
    out = []
    for entry in sorted(_builtin_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            spec = _read_yaml(entry.read_text(), str(entry))
            out.append((spec["name"], spec["description"]))
    return out


def load_adapter(name_or_path: str | Path) -> "Adapter":
    """A built-in adapter by name, or a user's YAML spec by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        if not path.is_file():
            raise AdapterError(f"adapter file {text!r} does not exist")
        return Adapter(_read_yaml(path.read_text(), text), source=str(path))
    entry = _builtin_dir() / f"{text}.yaml"
    if not entry.is_file():
        names = ", ".join(n for n, _ in list_adapters())
        raise AdapterError(f"unknown adapter {text!r}: use one of {names}, or the path of a YAML spec")
    return Adapter(_read_yaml(entry.read_text(), text), source=f"builtin:{text}")


def _read_yaml(text: str, source: str) -> dict:
    import yaml

    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AdapterError(f"adapter {source}: not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise AdapterError(f"adapter {source}: expected a mapping at top level, got {type(spec).__name__}")
    return spec


def validate_adapter_spec(spec: Mapping[str, Any], source: str = "<spec>") -> None:
    """Check a spec against schemas/adapter.schema.json and the per-kind rules; AdapterError lists every problem."""
    problems = []
    for err in sorted(_validator().iter_errors(spec), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(map(str, err.absolute_path)) or "(top level)"
        problems.append(f"{where}: {err.message}")
    kind = spec.get("kind")
    if not problems and kind in _KIND_OPTIONS:
        for key in sorted((_ALL_OPTIONS - _KIND_OPTIONS[kind]) & set(spec)):
            problems.append(f"{key}: does not apply to kind {kind!r}")
        for pattern in spec.get("answer_patterns", []):
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"answer_patterns: {pattern!r} is not a valid regular expression ({exc})")
        if kind == "prompt_completion" and spec.get("string_format", "text") == "text" and "system" in spec.get(
            "fields", {}
        ):
            problems.append("fields.system: needs string_format: chat (plain-string pairs have no system turn)")
    if problems:
        raise AdapterError(f"adapter {source} is invalid (schemas/adapter.schema.json):\n  " + "\n  ".join(problems))


def content_hash(row: Mapping[str, Any]) -> str:
    """sha1 hex of the row as canonical JSON (sorted keys, no spaces, UTF-8), leaving out `drift_*` columns and
    nulls at every depth; numbers as text (7, 7.0 and "7" hash alike: a column's type may differ between runs)."""
    kept = {k: v for k, v in row.items() if not str(k).startswith(RESERVED_PREFIX)}
    blob = json.dumps(_canonical(kept), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> Any:
    """`value` with nulls dropped from mappings (recursively), lists as lists, scalars other than str as text."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items() if v is not None}
    items = _as_list(value)
    if items is not None:
        return [_canonical(v) for v in items]
    if isinstance(value, (bool, int, float)) or type(value).__module__ == "numpy":
        return id_text(value)
    return value


def id_text(value: Any) -> str | None:
    """An id value as text: str unchanged, integral numbers without a fraction (7.0 -> "7"), booleans as JSON writes
    them; None (or NaN) -> None."""
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        value = value.item()
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        if value != value:
            return None
        if value.is_integer() and abs(value) < 2**63:
            return str(int(value))
        return repr(value)
    return str(value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    return str(obj)  # datetime, Decimal, ...


def _as_list(value: Any) -> list | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:
        return value.tolist()  # pandas rows hold list columns as numpy object arrays
    return None


def _columnar_turns(value: Mapping[str, Any], col: str) -> list[dict] | None:
    """`datasets`' Sequence({...}) layout, a struct of lists {"role": [...], "content": [...]}, as its list of turns.

    Every value must be a list of one length (else RowError `ragged_turns:COL`); a mapping holding no list is not
    this layout (None: the caller rejects it as `wrong_type`).
    """
    lists = {key: _as_list(item) for key, item in value.items()}
    if not lists or any(v is None for v in lists.values()):
        return None
    lengths = {len(v) for v in lists.values()}
    if len(lengths) != 1:
        raise RowError(f"ragged_turns:{col}")
    return [{key: v[i] for key, v in lists.items()} for i in range(lengths.pop())]


class Adapter:
    """A validated adapter spec; `to_example(row)` maps one row (a dict) to an Example."""

    def __init__(self, spec: Mapping[str, Any], source: str = "<dict>"):
        validate_adapter_spec(spec, source)
        self.source = source
        self.name: str = spec["name"]
        self.description: str = spec["description"]
        self.kind: str = spec["kind"]
        self.id_field: str | None = spec.get("id_field")
        required, optional = _KIND_FIELDS[self.kind]
        given = spec.get("fields", {})
        self.fields: dict[str, str] = {k: given.get(k, k) for k in required}
        self.fields.update({k: given[k] for k in optional if k in given})
        message = spec.get("message", {})
        self.role_key: str = message.get("role", "role")
        self.content_key: str = message.get("content", "content")
        self.roles: dict[str, str] = dict(spec.get("roles") or {r: r for r in ROLES})
        self.string_format: str = spec.get("string_format", "text")
        self.input_separator: str = spec.get("input_separator", "\n\n")
        self.answer_patterns = [re.compile(p) for p in spec.get("answer_patterns", [])]

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, kind={self.kind!r}, source={self.source!r})"

    def config_dict(self) -> dict:
        """The resolved spec (defaults filled in): what a run directory records and compares."""
        out = {"name": self.name, "kind": self.kind, "id_field": self.id_field, "fields": dict(self.fields)}
        if self.kind in ("conversation", "prompt_completion"):
            out.update(message={"role": self.role_key, "content": self.content_key}, roles=dict(self.roles))
        if self.kind == "prompt_completion":
            out["string_format"] = self.string_format
        if self.kind == "instruction":
            out["input_separator"] = self.input_separator
        if self.kind == "qa":
            out["answer_patterns"] = [p.pattern for p in self.answer_patterns]
        return copy.deepcopy(out)

    @property
    def columns(self) -> list[str]:
        """Input columns this adapter reads (the id column included when set)."""
        cols = list(self.fields.values())
        return cols + ([self.id_field] if self.id_field else [])

    def row_id(self, row: Mapping[str, Any]) -> str:
        """The row's id column as text when set and non-empty, else `content_hash` of the adapter's own fields.
        Never raises."""
        if self.id_field is not None:
            text = id_text(row.get(self.id_field))
            if text:
                return text
        return content_hash({col: row.get(col) for col in self.fields.values()})

    def keeps_source_id(self, type_: Any) -> bool:
        """Whether an input `id` column of Arrow type `type_` is kept under SOURCE_ID: when it is not text (its
        values and type would be lost in the string `id`), or when the adapter reads its ids from another column
        (the output `id` replaces it)."""
        import pyarrow.types as pat

        if pat.is_null(type_):
            return False
        return self.id_field != ID or not (pat.is_string(type_) or pat.is_large_string(type_)
                                            or pat.is_string_view(type_))

    def extract_answer(self, answer: str) -> str:
        """First matching answer pattern's group 1 (or whole match), stripped; no match: the whole stripped answer."""
        for pattern in self.answer_patterns:
            found = pattern.search(answer)
            if found:
                return (found.group(1) if pattern.groups else found.group(0)).strip()
        return answer.strip()

    def to_example(self, row: Mapping[str, Any]) -> Example:
        """Map one row to an Example; raises RowError(reason) when the row is unusable."""
        if not isinstance(row, Mapping):
            raise RowError("wrong_type:row")
        rid = self.row_id(row)
        if self.kind == "text":
            text = self._string(row, "text")
            if not text.strip():
                raise RowError(f"empty_field:{self.fields['text']}")
            return Example(id=rid, text=text)
        if self.kind == "qa":
            return self._qa(rid, row)
        if self.kind == "instruction":
            messages = self._instruction(row)
        elif self.kind == "prompt_completion":
            prompt, completion = self._get(row, "prompt"), self._get(row, "completion")
            if isinstance(prompt, str) and isinstance(completion, str) and self.string_format == "text":
                if not completion.strip():
                    raise RowError("empty_response")
                return Example(id=rid, prompt=prompt, response=completion)
            messages = self._turns(prompt, "prompt", "user") + self._turns(completion, "completion", "assistant")
        else:
            messages = self._turns(self._get(row, "messages"), "messages", None)
        messages = self._with_system(row, messages)
        _check_conversation(messages)
        return Example(id=rid, messages=tuple(messages))

    # -- helpers

    def _get(self, row: Mapping[str, Any], key: str, required: bool = True) -> Any:
        col = self.fields.get(key)
        if col is None:
            return None
        value = row.get(col)
        if value is None and required:
            raise RowError(f"missing_field:{col}")
        return value

    def _string(self, row: Mapping[str, Any], key: str, required: bool = True) -> str | None:
        value = self._get(row, key, required)
        if value is not None and not isinstance(value, str):
            raise RowError(f"wrong_type:{self.fields[key]}")
        return value

    def _turns(self, value: Any, key: str, string_role: str | None) -> list[dict]:
        col = self.fields[key]
        if isinstance(value, str) and string_role is not None:
            return [{"role": string_role, "content": value}]
        items = _as_list(value)
        if items is None and isinstance(value, Mapping):
            items = _columnar_turns(value, col)
        if items is None:
            raise RowError(f"wrong_type:{col}")
        turns = []
        for item in items:
            if not isinstance(item, Mapping):
                raise RowError(f"wrong_type:{col}")
            role, content = item.get(self.role_key), item.get(self.content_key)
            if role is None:
                raise RowError(f"missing_field:{col}.{self.role_key}")
            if not isinstance(role, str):
                raise RowError(f"wrong_type:{col}.{self.role_key}")
            if role not in self.roles:
                raise RowError(f"invalid_role:{role[:40]}")
            turn = {"role": self.roles[role]}
            for key in _PASSED_KEYS:
                if item.get(key) is not None:
                    turn[key] = _plain_json(item[key])
            if content is None and not (turn["role"] == "assistant" and turn.get("tool_calls")):
                raise RowError(f"missing_field:{col}.{self.content_key}")
            # an assistant turn holding only tool calls keeps content None: templates test for it (DeepSeek-R1)
            turn["content"] = None if content is None else _content_text(content, f"{col}.{self.content_key}")
            if turn.get("tool_calls") is not None:
                _check_tool_calls(turn["tool_calls"], col)
            weight = _turn_weight(item, col)
            if weight is not None and turn["role"] == "assistant":  # other turns are context already
                turn["weight"] = weight
            turns.append(turn)
        return turns

    def _with_system(self, row: Mapping[str, Any], messages: list[dict]) -> list[dict]:
        system = self._string(row, "system", required=False)
        if system is None:  # an empty system prompt is kept, as a `messages` row's empty system turn is
            return messages
        turns = [m for m in messages if m["role"] == "system"]
        if not turns:
            return [{"role": "system", "content": system}] + messages
        # Both a system column and a system turn, as ShareGPT dumps often have: reconciled as LLaMA-Factory's
        # sharegpt converter does (the conversation's own system turn is the prompt). An empty column, or the same
        # text, leaves one system prompt; two different prompts are set aside, since training on either would be a
        # guess.
        if not system.strip() or any(t.get("content") == system for t in turns):
            return messages
        raise RowError("conflicting_system")

    def _instruction(self, row: Mapping[str, Any]) -> list[dict]:
        instruction = self._string(row, "instruction")
        extra = self._string(row, "input", required=False)
        output = self._string(row, "output")
        if not instruction.strip():
            raise RowError(f"empty_field:{self.fields['instruction']}")
        if not output.strip():
            raise RowError("empty_response")
        user = instruction if extra is None or not extra.strip() else instruction + self.input_separator + extra
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]

    def _qa(self, rid: str, row: Mapping[str, Any]) -> Example:
        question = self._string(row, "question")
        answer = self._get(row, "answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise RowError(f"wrong_type:{self.fields['answer']}")
        if not question.strip():
            raise RowError(f"empty_field:{self.fields['question']}")
        if not answer.strip():
            raise RowError(f"empty_field:{self.fields['answer']}")
        messages = self._with_system(row, [{"role": "user", "content": question}])
        return Example(id=rid, messages=tuple(messages), answer=self.extract_answer(answer), reference=answer.strip())


def _plain_json(value: Any) -> Any:
    """Lists/dicts as plain Python (pandas rows hold numpy arrays); JSON strings kept as they are."""
    items = _as_list(value)
    if items is not None:
        return [_plain_json(v) for v in items]
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v) for k, v in value.items()}
    return value


# A message's loss weight: OpenAI chat fine-tuning's 0/1 `weight`, LLaMA-Factory's float `loss_weight`.
_WEIGHT_KEYS = ("weight", "loss_weight")


def _turn_weight(item: Mapping[str, Any], col: str) -> float | None:
    """The message's `weight` / `loss_weight` as a float >= 0, None when neither is given; RowError
    `invalid_weight:COL.KEY` for another value (not a finite number >= 0, or the two keys differing)."""
    found = None
    for key in _WEIGHT_KEYS:
        value = item.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) and \
                not (type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0):
            raise RowError(f"invalid_weight:{col}.{key}")
        value = float(value)
        if not (value >= 0.0 and value != float("inf")) or (found is not None and value != found):
            raise RowError(f"invalid_weight:{col}.{key}")
        found = value
    return found


def _check_tool_calls(calls: Any, col: str) -> None:
    """OpenAI tool calls: [{"type": "function", "function": {"name": str, "arguments": str | dict}}]."""
    if not isinstance(calls, list):
        raise RowError(f"wrong_type:{col}.tool_calls")
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"wrong_type:{col}.tool_calls.function.name")


def _content_text(content: Any, col: str) -> str:
    if isinstance(content, str):
        return content
    parts = _as_list(content)
    if parts is None:
        raise RowError(f"wrong_type:{col}")
    texts = []
    for part in parts:  # OpenAI content parts: [{"type": "text", "text": ...}]
        if not isinstance(part, Mapping):
            raise RowError(f"wrong_type:{col}")
        if part.get("type") != "text":
            raise RowError(f"unsupported_content:{str(part.get('type'))[:40]}")
        if not isinstance(part.get("text"), str):
            raise RowError(f"wrong_type:{col}")
        texts.append(part["text"])
    return "".join(texts)


def _check_conversation(messages: Sequence[Message]) -> None:
    if not messages:
        raise RowError("empty_conversation")
    if any(m["role"] == "system" for m in messages[1:]):
        raise RowError("misplaced_system")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RowError("no_assistant_turn")
    if any(not (m["content"] or "").strip() and not m.get("tool_calls")
           and not (m.get("reasoning_content") or "").strip() for m in assistant):
        raise RowError("empty_response")
    if all(m.get("weight", 1.0) == 0.0 for m in assistant):
        raise RowError("no_weighted_turn")
