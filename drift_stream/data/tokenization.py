"""Tokenization with loss masks: ChatTokenizer (Example -> TokenizedExample) and collate (-> padded tensors).

Plain template, used when the tokenizer has no chat template (built piece by piece, so masks are exact):
    [bos] "System: {c}" "\\n\\n" "User: {c}" "\\n\\n" "Assistant:" " {c}" <eos> "\\n\\n" ...
Loss on " {c}" <eos> of every assistant turn; the generation prompt ends with "Assistant:". Tool turns are
"Tool: {c}"; an assistant's reasoning_content and tool_calls are written into its text (`_plain_assistant_text`).
Chat templates: one render per row, spans located as in template_spans.py.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Mapping, Sequence

from drift_stream.data.example_types import Example, Message, RowError, TokenizedExample
from drift_stream.data.template_spans import (
    END_OF_TURN_TEXTS,
    cut_points,
    locate_assistant_turns,
    token_turns,
)
from drift_stream.errors import ConfigError

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("reject", "truncate")
_PLAIN_ANNOUNCED: set[str] = set()  # tokenizers whose fallback to the plain format was logged (once per process)


class ChatTemplateError(ConfigError):
    """A chat template was asked for but none is available (or cannot be read)."""


def read_chat_template(path: str) -> str:
    """The Jinja text of a `--chat-template FILE`; ChatTemplateError when it cannot be read."""
    from pathlib import Path

    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatTemplateError(f"--chat-template {path}: cannot read it ({exc.strerror or exc})") from exc
    if not text.strip():
        raise ChatTemplateError(f"--chat-template {path}: the file is empty")
    return text


def _single_token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"--stop-token {text!r} is {len(ids)} tokens for this tokenizer, not one: pass a token "
                          "of its vocabulary (e.g. <|im_end|>)")
    return int(ids[0])


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



class ChatTokenizer:
    """Tokenize Examples with loss masks: the chat template (the tokenizer's, or `chat_template`) when there is
    one, else the plain template.

    A conversation is rendered once and tokenized once with character offsets; each assistant turn's span is
    located in the rendered text (template_spans.py: from the end of the generation prompt through the turn's
    end-of-turn token) and the tokens overlapping it carry the loss. No template is refused as a whole: a row the
    template cannot render, or whose assistant turn cannot be located, raises RowError with a reason naming the
    turn and, for a template error, the template's own message.

    tokenizer: a HF (fast, for offsets) tokenizer. chat_template: Jinja text replacing the tokenizer's.
    use_chat_template: False -> the plain template even when a chat template exists. stop_tokens: extra
    end-of-turn token strings (each must be one token). Counters: `reasoning_dropped` (assistant turns whose
    reasoning the template did not render).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_tokens: int = 2048,
        overlong: str = "reject",
        stop_token_ids: Sequence[int] = (),
        use_chat_template: bool | None = None,
        chat_template: str | None = None,
        stop_tokens: Sequence[str] = (),
    ):
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise ConfigError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
        if overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlong = overlong
        own = getattr(tokenizer, "chat_template", None)
        template = chat_template or own
        if isinstance(template, dict):  # tokenizers with several named templates
            template = template.get("default") or next(iter(template.values()), None)
        self.uses_chat_template = bool(template) if use_chat_template is None else use_chat_template
        # a template given for a tokenizer that has none of its own: fingerprinting (bank/store.py) should see the
        # tokenizer that carries it (`tokenizer_with_template`)
        self._completes_tokenizer = bool(chat_template) and not own
        if use_chat_template is None and not template:
            _announce_plain(tokenizer)
        if self.uses_chat_template and not template:
            raise ChatTemplateError("use_chat_template=True but the tokenizer has no chat_template: pass "
                                    "chat_template= (--chat-template FILE) or use the plain format (--no-chat-template)")
        if chat_template and not self.uses_chat_template:
            raise ConfigError("chat_template was given together with use_chat_template=False: choose one")
        self.template = template if self.uses_chat_template else None
        self.template_name = "the given chat_template" if chat_template else "the tokenizer's chat template"
        self._template_sha1 = hashlib.sha1(str(self.template).encode()).hexdigest() if self.template else None
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token (it ends text and plain-template turns): set one")
        extra = [int(t) for t in stop_token_ids] + [_single_token_id(tokenizer, t) for t in stop_tokens]
        self.stop_ids = frozenset(extra) | {self.eos_token_id} | frozenset(self._template_stop_ids())
        self._lead = self._leading_special_ids()
        bos = getattr(tokenizer, "bos_token_id", None)
        self._start = self._lead or ([bos] if bos is not None else [self.eos_token_id])  # response_only's start
        self.reasoning_dropped = 0
        self._warned_reasoning = False
        if self.uses_chat_template:
            if not getattr(tokenizer, "is_fast", False):
                raise ConfigError("chat templates need a fast tokenizer (character offsets locate each assistant "
                                  "turn): load it with use_fast=True, or use the plain format (--no-chat-template)")
            self._stop_texts = sorted({tokenizer.convert_ids_to_tokens(int(i)) for i in self.stop_ids}
                                      | {t for t in END_OF_TURN_TEXTS if t in self.template}, key=len, reverse=True)
            self._gen_suffix = self._generation_suffix()
            specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
            specials += [t for t in getattr(tokenizer, "added_tokens_encoder", {})]
            self._cuts = cut_points(self._gen_suffix, specials, self._user_header())
            self._special_ids = frozenset(int(i) for i in tokenizer.convert_tokens_to_ids(specials))

    @classmethod
    def from_options(cls, tokenizer: Any, *, chat_template: str | None = None, use_chat_template: bool = True,
                     stop_tokens: Sequence[str] = (), **kwargs: Any) -> "ChatTokenizer":
        """What ScoreConfig / BankConfig carry: `chat_template` is a Jinja FILE path (--chat-template),
        use_chat_template=False the plain format (--no-chat-template), stop_tokens extra end-of-turn tokens."""
        if chat_template and not use_chat_template:
            raise ConfigError("--chat-template and --no-chat-template exclude each other: choose one")
        text = read_chat_template(chat_template) if chat_template else None
        chat = cls(tokenizer, chat_template=text, use_chat_template=None if use_chat_template else False,
                   stop_tokens=tuple(stop_tokens), **kwargs)
        if chat_template:
            chat.template_name = f"--chat-template {chat_template}"
        return chat

    def tokenizer_with_template(self) -> Any | None:
        """A shallow copy of the tokenizer carrying the given chat template, when the tokenizer has none of its own
        (else None): the tokenizer a bank built from the templated model recorded. The copy shares the vocabulary."""
        if not self._completes_tokenizer:
            return None
        import copy

        completed = copy.copy(self.tokenizer)
        completed.chat_template = self.template
        return completed

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

    def stats(self) -> dict:
        """Counters for a run manifest: {"reasoning_dropped": assistant turns whose reasoning was not rendered}."""
        return {"reasoning_dropped": self.reasoning_dropped}

    def pop_stats(self) -> dict:
        """`stats()` since the last call (per input file of a run), then reset."""
        out, self.reasoning_dropped = self.stats(), 0
        return out

    # -- public encoders

    def encode(self, example: Example) -> TokenizedExample:
        """input_ids [T] and loss_mask [T] of an example, with the overlong policy applied. A chat row also gets
        turn_index [T] and turn_weights (one per assistant turn); a turn of weight 0 is out of the loss mask."""
        if example.messages is None:
            ids, mask = self._build(example)
            return self._finish(example.id, ids, mask)
        ids, turns = self._build(example)
        weights = tuple(float(m.get("weight", 1.0)) for m in example.messages if m.get("role") == "assistant")
        mask = [int(k >= 0 and weights[k] != 0.0) for k in turns]
        return self._finish(example.id, ids, mask, turns, weights)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Generation prompt [T]: the tokens of `messages` rendered with the generation prompt (header + prefill).

        The loss span of an assistant turn in `encode` starts where this text ends, so the prompt is a token prefix
        of the encoded row except where the template renders earlier turns differently once a later turn exists
        (Qwen3 and R1 strip reasoning), or where a token merges across the header's end (content starting "\n")."""
        messages = _template_messages(messages)
        if self.uses_chat_template:
            ids = self._tokenize([self._render(messages, True, None)])[0]
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

    def response_only(self, example: TokenizedExample) -> TokenizedExample:
        """The loss tokens of a tokenized example alone, after the start token(s) (what the tokenizer puts before
        text, else BOS, else EOS): loss(y) without x, as IFD needs. The one response-only builder."""
        body = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
        ids = self._start + body
        return TokenizedExample(id=example.id, input_ids=ids, loss_mask=[0] * len(self._start) + [1] * len(body))

    def encode_response_only(self, example: Example) -> TokenizedExample:
        """`response_only(encode(example))`; a plain-text example is its own response."""
        if example.text is not None:
            return self.encode(example)
        return self.response_only(self.encode(example))

    # -- internals

    def _build(self, example: Example) -> tuple[list[int], list[int]]:
        """(ids, loss mask); for a chat row (ids, turn index per token: the assistant turn, -1 elsewhere)."""
        if example.text is not None:
            ids = self._lead + self._tokenize([example.text])[0] + [self.eos_token_id]
            return ids, [0] + [1] * (len(ids) - 1)
        if example.response is not None:
            prompt, response = self._tokenize([example.prompt, example.response])
            body = response + [self.eos_token_id]
            return self._lead + prompt + body, [0] * (len(self._lead) + len(prompt)) + [1] * len(body)
        messages = _template_messages(example.messages)
        if self.uses_chat_template:
            return self._chat(messages)
        return self._plain(messages, generation_prompt=False, turns=True)

    def _finish(self, id: str, ids: list[int], mask: list[int], turns: list[int] | None = None,
                weights: tuple[float, ...] | None = None) -> TokenizedExample:
        if len(ids) > self.max_tokens:
            if self.overlong == "reject":
                raise RowError(f"too_long:{len(ids)}>{self.max_tokens}")
            ids, mask = ids[: self.max_tokens], mask[: self.max_tokens]
            turns = None if turns is None else turns[: self.max_tokens]
        if mask:
            mask[0] = 0  # token 0 has no context to be predicted from
        if not any(mask):
            raise RowError("no_loss_tokens")
        return TokenizedExample(id=id, input_ids=ids, loss_mask=mask, turn_index=turns, turn_weights=weights)

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

    def _template_stop_ids(self) -> list[int]:
        """End-of-turn tokens the template writes (END_OF_TURN_TEXTS it mentions that are single tokens). GPT-OSS
        writes <|end|> between the analysis and final messages of one turn: with <|return|> present it is no stop."""
        if not self.uses_chat_template:
            return []
        texts = [t for t in END_OF_TURN_TEXTS if t in self.template]
        if "<|return|>" in texts:
            texts = [t for t in texts if t != "<|end|>"]
        ids = []
        for text in texts:
            tid = self.tokenizer.convert_tokens_to_ids(text)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.append(tid)
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool, what: str | None) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in templates (e.g. roles must alternate)
            message = " ".join(str(exc).split())[:200]
            raise RowError(f"template_error:{what or 'conversation'}: {type(exc).__name__}: {message}") from exc

    def _failing_turn(self, messages: list[dict]) -> str:
        """"message N (role)": the first message whose prefix the template cannot render (only run on failure)."""
        for n in range(1, len(messages) + 1):
            try:
                self._render(messages[:n], False, None)
            except RowError:
                return f"message {n - 1} ({messages[n - 1].get('role')})"
        return "conversation"

    def _user_header(self) -> str:
        """What the template writes before a lone user turn's text (BOS, default system prompt, user header)."""
        try:
            text = self._render([{"role": "user", "content": "Hi"}], False, None)
        except RowError:
            return ""
        return text[: max(text.find("Hi"), 0)]

    def _generation_suffix(self) -> str:
        """The text the generation prompt adds after a one-user-turn chat (header + prefill), cut back to a token
        boundary (Phi-3 ends the chat with EOS when there is no generation prompt). "" when the template has none
        or cannot render the probe (then each turn's span starts at its own text)."""
        for probe in ([{"role": "user", "content": "Hi"}],
                      [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]):
            try:
                with_prompt = self._render(probe, True, None)
                without = self._render(probe, False, None)
            except RowError as exc:
                logger.debug("generation-prompt probe failed: %s", exc.reason)
                continue
            common = 0
            for a, b in zip(with_prompt, without):
                if a != b:
                    break
                common += 1
            enc = self.tokenizer(with_prompt, add_special_tokens=False, return_offsets_mapping=True)
            for s, e in enc["offset_mapping"]:
                if e > common:
                    common = min(common, s)
                    break
            return with_prompt[common:]
        return ""

    def _chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        try:
            text = self._render(messages, False, None)
        except RowError as exc:
            raise RowError(exc.reason.replace("conversation", self._failing_turn(messages), 1)) from exc.__cause__
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        special_ends = [] if self._gen_suffix else [e for t, (_, e) in zip(ids, offsets) if t in self._special_ids]
        located = locate_assistant_turns(text, messages, self._gen_suffix, self._cuts, self._stop_texts, special_ends)
        if located.reasoning_dropped:
            self.reasoning_dropped += located.reasoning_dropped
            if not self._warned_reasoning:
                self._warned_reasoning = True
                logger.warning(
                    "%s (sha1 %s) drops the reasoning of some assistant turns (Qwen3 and R1 templates "
                    "keep it only after the last user turn): those turns are scored as rendered, without it; the "
                    "run counts them as reasoning_dropped. Pass a template that keeps it (--chat-template, e.g. "
                    "TRL's *_training.jinja) to score the reasoning",
                    self.template_name, (self._template_sha1 or "")[:12])
        return ids, token_turns(offsets, located.spans)

    def _plain(self, messages: list[dict], generation_prompt: bool, turns: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss mask), or with `turns` (ids, the assistant turn of each token, -1 elsewhere)."""
        # (text, turn) pieces in order, turn -1 outside the loss; "\n\n" separates turns; tokenized in one call
        pieces: list[tuple[str, int]] = []
        turn = -1
        for i, m in enumerate(messages):
            if i:
                pieces.append(("\n\n", -1))
            if m["role"] == "assistant":
                turn += 1
                pieces += [("Assistant:", -1), (" " + _plain_assistant_text(m), turn), ("", turn)]  # "" marks EOS
            else:
                pieces.append((f"{m['role'].capitalize()}: {m.get('content') or ''}", -1))
        if generation_prompt:
            pieces += [("\n\n", -1)] * bool(messages) + [("Assistant:", -1)]
        ids, mask = list(self._lead), [-1] * len(self._lead)
        for (text, k), toks in zip(pieces, self._tokenize([t for t, _ in pieces]) if pieces else []):
            toks = toks if text else [self.eos_token_id]
            ids += toks
            mask += [k] * len(toks)
        return ids, mask if turns else [int(k >= 0) for k in mask]


def _template_messages(messages: Sequence[Message]) -> list[dict]:
    """Messages as the chat template gets them: a turn's loss `weight` is ours, not the template's."""
    return [{k: v for k, v in m.items() if k != "weight"} if "weight" in m else dict(m) for m in messages]


def _announce_plain(tokenizer: Any) -> None:
    """Warn, once per tokenizer and process, that rows are rendered in the plain format (module docstring)."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name in _PLAIN_ANNOUNCED:
        return
    _PLAIN_ANNOUNCED.add(name)
    logger.warning(
        "tokenizer %s has no chat template: rows are rendered in drift-stream's plain format (\"User: ...\\n\\n"
        "Assistant: ...<eos>\"). If the model was trained on a chat format, pass its template as --chat-template FILE "
        "(a Jinja file); pass --no-chat-template to use the plain format without this warning", name)


def _plain_assistant_text(message: Mapping[str, Any]) -> str:
    """An assistant turn in the plain format: <think>reasoning</think> when given as reasoning_content, the
    content, then one <tool_call>{json}</tool_call> line per tool call."""
    import json

    text = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        text = f"<think>\n{reasoning}\n</think>\n\n{text}"
    for call in message.get("tool_calls") or ():
        fn = call.get("function", call)
        text += "\n<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")},
                                             ensure_ascii=False) + "</tool_call>"
    return text
