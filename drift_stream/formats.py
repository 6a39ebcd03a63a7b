"""Format adapters -> canonical examples; tokenization with loss masks.

STUB: the contract types below are fixed (docs/ARCHITECTURE.md); the implementation is being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class RowError(ValueError):
    """A row cannot be turned into a training example. `reason` is short and machine-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    id: str
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class TokenizedExample:
    id: str
    input_ids: list[int]  # [T]
    loss_mask: list[int]  # [T]; 1 where token t is a training target; loss_mask[0] == 0


def collate(examples: Sequence[TokenizedExample], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of tokenized examples into tensors: input_ids/attention_mask [B, T] long, loss_mask [B, T] float32."""
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
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
