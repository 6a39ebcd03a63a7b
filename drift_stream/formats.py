"""Format adapters -> canonical examples; tokenization with loss masks.

An adapter is a small YAML spec (adapters/*.yaml, checked against schemas/adapter.schema.json): data, never executed.
`load_adapter("messages")` loads a built-in, `load_adapter("/path/my.yaml")` a user's own file.

Row ids (`Adapter.row_id`): the adapter's `id_field` column as str when present and non-empty; otherwise the sha1 hex
digest of the row as canonical JSON (sorted keys, no spaces, UTF-8), leaving out columns whose name starts with
`drift_`. Identical rows therefore share an id.

Reject reasons (`RowError.reason`): missing_field:COL, wrong_type:COL, empty_field:COL, invalid_role:NAME,
unsupported_content:TYPE, empty_conversation, misplaced_system, duplicate_system, no_assistant_turn, empty_response,
template_error, mask_boundary, too_long:N>M, no_loss_tokens.

Plain template, used when the tokenizer has no chat template (built piece by piece, so masks are exact):
    [bos] "System: {c}" "\\n\\n" "User: {c}" "\\n\\n" "Assistant:" " {c}" <eos> "\\n\\n" ...
Loss on " {c}" <eos> of every assistant turn; the generation prompt ends with "Assistant:".
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from drift_stream.errors import AdapterError, ConfigError

logger = logging.getLogger(__name__)

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")
OVERLONG_POLICIES = ("reject", "truncate")

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


class RowError(ValueError):
    """A row cannot be turned into a training example. `reason` is short and machine-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ChatTemplateError(ConfigError):
    """The tokenizer's chat template cannot give exact loss masks (a rendered prefix is not a prefix of the whole)."""


@dataclass(frozen=True)
class Example:
    """One canonical example: exactly one of `messages`, `text`, or `prompt` + `response` (TRL plain strings).

    `answer` is the extracted reference answer of a validation query; `reference` its whole (stripped) text.
    """

    id: str
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    answer: str | None = None
    prompt: str | None = None
    response: str | None = None
    reference: str | None = None

    def __post_init__(self):
        forms = (self.messages is not None) + (self.text is not None) + (self.response is not None)
        if forms != 1:
            raise ValueError("Example needs exactly one of messages, text, or prompt+response")
        if (self.prompt is None) != (self.response is None):
            raise ValueError("Example.prompt and Example.response go together")


@dataclass(frozen=True)
class TokenizedExample:
    id: str
    input_ids: list[int]  # [T]
    loss_mask: list[int]  # [T]; 1 where token t is a training target; loss_mask[0] == 0

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask {len(self.loss_mask)}")


def collate(examples: Sequence[TokenizedExample], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of tokenized examples into tensors: input_ids/attention_mask [B, T] long, loss_mask [B, T] float32."""
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    loss_mask = torch.zeros((batch, length), dtype=torch.float32)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, sl] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, sl] = 1
        loss_mask[row, sl] = torch.tensor(ex.loss_mask, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


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
    """sha1 hex of the row as canonical JSON, leaving out `drift_*` columns."""
    kept = {k: v for k, v in row.items() if not str(k).startswith("drift_")}
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


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
        """The row's id column as str when set and non-empty, else its content hash. Never raises."""
        if self.id_field is not None:
            value = row.get(self.id_field)
            if value is not None and str(value) != "":
                return str(value)
        return content_hash(row)

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
            if content is None:
                raise RowError(f"missing_field:{col}.{self.content_key}")
            turns.append({"role": self.roles[role], "content": _content_text(content, f"{col}.{self.content_key}")})
        return turns

    def _with_system(self, row: Mapping[str, Any], messages: list[dict]) -> list[dict]:
        system = self._string(row, "system", required=False)
        if system is None or not system.strip():
            return messages
        if any(m["role"] == "system" for m in messages):
            raise RowError("duplicate_system")
        return [{"role": "system", "content": system}] + messages

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
    if any(not m["content"].strip() for m in assistant):
        raise RowError("empty_response")


# ------------------------------------------------------------------------------------------------- tokenization


class ChatTokenizer:
    """Tokenize Examples with loss masks: the tokenizer's chat template when it has one, else the plain template.

    Masks come from rendering conversation prefixes and diffing token counts: for each assistant turn, loss on
    the tokens between the generation prompt before it and the end of the turn, cut after the turn's last stop
    token (EOS or `stop_token_ids`), so the template's role header and separators after EOS carry no loss.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_tokens: int = 2048,
        overlong: str = "reject",
        stop_token_ids: Sequence[int] = (),
        use_chat_template: bool | None = None,
    ):
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise ConfigError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
        if overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlong = overlong
        template = getattr(tokenizer, "chat_template", None)
        self.uses_chat_template = bool(template) if use_chat_template is None else use_chat_template
        if self.uses_chat_template and not template:
            raise ChatTemplateError("use_chat_template=True but the tokenizer has no chat_template")
        self._template_sha1 = hashlib.sha1(str(template).encode()).hexdigest() if self.uses_chat_template else None
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token (it ends text and plain-template turns): set one")
        self.stop_ids = frozenset(int(t) for t in stop_token_ids) | {self.eos_token_id}
        self._lead = self._leading_special_ids()
        self._start = self._lead or [self.eos_token_id]
        if self.uses_chat_template:
            self._probe_template()

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token, else EOS (for `collate`)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_id

    def config_dict(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "overlong": self.overlong,
            "template": "chat" if self.uses_chat_template else "plain",
            "chat_template_sha1": self._template_sha1,
            "stop_token_ids": sorted(self.stop_ids),
        }

    # -- public encoders

    def encode(self, example: Example) -> TokenizedExample:
        """input_ids [T] and loss_mask [T] of an example, with the overlong policy applied."""
        ids, mask = self._build(example)
        return self._finish(example.id, ids, mask)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Generation prompt [T]: exactly the tokens `encode` puts before an assistant turn that follows `messages`."""
        messages = [dict(m) for m in messages]
        if self.uses_chat_template:
            ids = self._tokenize([self._render(messages, True)])[0]
        else:
            ids = self._plain(messages, generation_prompt=True)[0]
        if len(ids) >= self.max_tokens:
            raise RowError(f"too_long:{len(ids)}>{self.max_tokens - 1}")
        return ids

    def encode_rollout(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], id: str = "") -> TokenizedExample:
        """prompt + completion tokens, loss on the completion; anything after its first stop token is cut."""
        completion = list(completion_ids)
        for pos, tok in enumerate(completion):
            if tok in self.stop_ids:
                completion = completion[: pos + 1]
                break
        ids = list(prompt_ids) + completion
        mask = [0] * len(prompt_ids) + [1] * len(completion)
        return self._finish(id, ids, mask)

    def encode_response_only(self, example: Example) -> TokenizedExample:
        """The response alone: a start token (BOS, else EOS) then every assistant span of `encode`, loss on all of it."""
        if example.text is not None:
            return self.encode(example)
        if example.response is not None:
            body = self._tokenize([example.response])[0] + [self.eos_token_id]
        else:
            ids, mask = self._build(example)
            body = [t for t, m in zip(ids, mask) if m]
        ids = self._start + body
        return self._finish(example.id, ids, [0] * len(self._start) + [1] * len(body))

    # -- internals

    def _build(self, example: Example) -> tuple[list[int], list[int]]:
        if example.text is not None:
            ids = self._lead + self._tokenize([example.text])[0] + [self.eos_token_id]
            return ids, [0] + [1] * (len(ids) - 1)
        if example.response is not None:
            prompt, response = self._tokenize([example.prompt, example.response])
            body = response + [self.eos_token_id]
            return self._lead + prompt + body, [0] * (len(self._lead) + len(prompt)) + [1] * len(body)
        messages = [dict(m) for m in example.messages]
        if self.uses_chat_template:
            return self._chat(messages)
        return self._plain(messages, generation_prompt=False)

    def _finish(self, id: str, ids: list[int], mask: list[int]) -> TokenizedExample:
        if len(ids) > self.max_tokens:
            if self.overlong == "reject":
                raise RowError(f"too_long:{len(ids)}>{self.max_tokens}")
            ids, mask = ids[: self.max_tokens], mask[: self.max_tokens]
        if mask:
            mask[0] = 0  # token 0 has no context to be predicted from
        if not any(mask):
            raise RowError("no_loss_tokens")
        return TokenizedExample(id=id, input_ids=ids, loss_mask=mask)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _leading_special_ids(self) -> list[int]:
        """Tokens the tokenizer puts before text by default (BOS), found by comparing with/without specials."""
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return list(full[:start])
        return []

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in templates (e.g. roles must alternate)
            logger.debug("chat template failed: %s", exc)
            raise RowError("template_error") from exc

    def _chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        full = self._render(messages, False)
        bounds = []  # (text before the turn's content, text through the turn's end)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                bounds.append((self._render(messages[:i], True), self._render(messages[: i + 1], False)))
        for turn, (before, through) in enumerate(bounds):
            for name, prefix in (("generation prompt", before), ("conversation prefix", through)):
                if not full.startswith(prefix):
                    raise ChatTemplateError(
                        f"chat template: the {name} of assistant turn {turn} is not a prefix of the whole "
                        f"conversation, so loss masks cannot be computed (the template renders earlier turns "
                        f"differently, e.g. strips reasoning): pass a template without that, or use_chat_template=False"
                    )
        texts = list(dict.fromkeys([full] + [text for pair in bounds for text in pair]))  # the last turn ends at `full`
        tokens = dict(zip(texts, self._tokenize(texts)))
        ids, mask = tokens[full], [0] * len(tokens[full])
        for before_text, through_text in bounds:
            before, through = tokens[before_text], tokens[through_text]
            if ids[: len(before)] != before or ids[: len(through)] != through:
                raise RowError("mask_boundary")  # tokens merge across a turn boundary for this row's text
            start, end = len(before), len(through)
            stops = [p for p in range(start, end) if ids[p] in self.stop_ids]
            if stops:
                end = stops[-1] + 1
            mask[start:end] = [1] * (end - start)
        return ids, mask

    def _plain(self, messages: list[dict], generation_prompt: bool) -> tuple[list[int], list[int]]:
        # (text, loss) pieces in order; "\n\n" separates turns; tokenized in one call
        pieces: list[tuple[str, int]] = []
        for i, m in enumerate(messages):
            if i:
                pieces.append(("\n\n", 0))
            if m["role"] == "assistant":
                pieces += [("Assistant:", 0), (" " + m["content"], 1), ("", 1)]  # "" marks the EOS token
            else:
                pieces.append((f"{m['role'].capitalize()}: {m['content']}", 0))
        if generation_prompt:
            pieces += [("\n\n", 0)] * bool(messages) + [("Assistant:", 0)]
        ids, mask = list(self._lead), [0] * len(self._lead)
        for (text, loss), toks in zip(pieces, self._tokenize([t for t, _ in pieces]) if pieces else []):
            toks = toks if text else [self.eos_token_id]
            ids += toks
            mask += [loss] * len(toks)
        return ids, mask

    def _probe_template(self) -> None:
        """Fail at construction, not mid-run, when the template cannot give exact masks."""
        probe = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."},
        ]
        try:
            _, mask = self._chat(probe)
        except RowError as exc:
            raise ChatTemplateError(f"the chat template fails on a plain two-turn chat ({exc.reason})") from exc
        if not any(mask):
            raise ChatTemplateError("the chat template puts no assistant tokens in a plain two-turn chat")
        if self._render(probe[:1], True) == self._render(probe[:1], False):
            logger.warning(
                "the chat template ignores add_generation_prompt: the assistant header will be inside the loss mask"
            )
