"""Tokenization with loss masks: ChatTokenizer (Example -> TokenizedExample) and collate (-> padded tensors).

Plain template, used when the tokenizer has no chat template (built piece by piece, so masks are exact):
    [bos] "System: {c}" "\\n\\n" "User: {c}" "\\n\\n" "Assistant:" " {c}" <eos> "\\n\\n" ...
Loss on " {c}" <eos> of every assistant turn; the generation prompt ends with "Assistant:".
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

from drift_stream.errors import ConfigError
from drift_stream.example_types import Example, Message, RowError, TokenizedExample

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("reject", "truncate")


class ChatTemplateError(ConfigError):
    """The tokenizer's chat template cannot give exact loss masks (a rendered prefix is not a prefix of the whole)."""


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
