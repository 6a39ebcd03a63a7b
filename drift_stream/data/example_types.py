"""The canonical example types shared by adapters (formats.py) and tokenization (tokenization.py).

Reject reasons (`RowError.reason`): missing_field:COL, wrong_type:COL, empty_field:COL, invalid_role:NAME,
unsupported_content:TYPE, empty_conversation, misplaced_system, conflicting_system, no_assistant_turn, empty_response,
template_error:WHERE: MESSAGE (the template's own), template_span:assistant turn N ..., too_long:N>M,
no_loss_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# {"role": "system" | "user" | "assistant" | "tool", "content": str} plus, passed to the chat template as given:
# tool_calls (OpenAI form) and reasoning_content on assistant turns, tool_call_id / name on tool turns.
Message = Mapping[str, Any]


class RowError(ValueError):
    """A row cannot be turned into a training example. `reason` is short and machine-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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

