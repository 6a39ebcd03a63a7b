"""The canonical example types shared by adapters (formats.py) and tokenization (tokenization.py).

Reject reasons (`RowError.reason`): missing_field:COL, wrong_type:COL, empty_field:COL, invalid_role:NAME,
unsupported_content:TYPE, empty_conversation, misplaced_system, conflicting_system, no_assistant_turn, empty_response,
invalid_weight:COL (a message `weight` / `loss_weight` that is not a finite number >= 0, or both keys differing),
no_weighted_turn (every assistant turn has weight 0: nothing to train on), template_error:WHERE: MESSAGE (the template's own), template_span:assistant turn N ..., too_long:N>M,
no_loss_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# {"role": "system" | "user" | "assistant" | "tool", "content": str} plus, passed to the chat template as given:
# tool_calls (OpenAI form) and reasoning_content on assistant turns, tool_call_id / name on tool turns. An assistant
# turn may carry `weight` (float >= 0; OpenAI's 0/1 `weight`, LLaMA-Factory's `loss_weight`): 0 takes the turn out of
# the loss; tokenization keeps it away from the chat template.
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
    # chat rows: the assistant turn (0, 1, ... in order) whose loss span holds token t, -1 elsewhere; [T]. A weight-0
    # turn keeps its index but has loss_mask 0. None: the row is one turn (text, prompt + response, rollouts).
    turn_index: list[int] | None = None
    turn_weights: tuple[float, ...] | None = None  # the input weight of each assistant turn (1.0 when not given)

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask {len(self.loss_mask)}")
        if self.turn_index is not None and len(self.turn_index) != len(self.input_ids):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but turn_index {len(self.turn_index)}")

    @property
    def num_turns(self) -> int:
        """Assistant turns of the row (1 when it has no turn structure)."""
        return 1 if self.turn_weights is None else len(self.turn_weights)

    def turn_masks(self) -> list[list[int]]:
        """One loss mask [T] per assistant turn: loss_mask restricted to that turn (all zero for a weight-0 turn)."""
        if self.turn_index is None:
            return [list(self.loss_mask)]
        return [[int(m and t == k) for m, t in zip(self.loss_mask, self.turn_index)] for k in range(self.num_turns)]

