"""Token-budget batches: rows grouped by length and cut by padded tokens instead of by row count.

A batch of rows padded to its longest row costs rows x longest tokens of compute and activation memory. With a
fixed row count, a pool of short rows underfills the device and one long row next to short ones wastes most of its
batch on padding. Here rows are sorted by length within a bounded window (the rows the caller holds at once: one
Arrow batch of `--batch-rows` in `score`, all targets in `bank build`), then cut greedily so that
rows x longest <= max_batch_tokens (a row longer than the budget gets a batch of its own). Per-example results do
not depend on the batch a row falls in, so this changes speed and memory, never a score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from drift_stream.errors import ConfigError


def validate_max_batch_tokens(value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
        raise ConfigError(f"max_batch_tokens must be None or an int >= 2 (padded tokens per batch), got {value!r}")


def plan_batches(lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches; every index appears exactly once.

    max_batch_tokens None: consecutive groups of `batch_size` rows in the given order (the caller sorts).
    Otherwise: rows sorted by (length, index), each batch as many rows as keep rows x longest <= max_batch_tokens
    (batch_size is then not used). Returns list of batches [[i, ...], ...].
    """
    n = len(lengths)
    if max_batch_tokens is None:
        return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    validate_max_batch_tokens(max_batch_tokens)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending length: the row being added is the longest so far
        if current and lengths[i] * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class PaddingStats:
    """Running count of real and padded tokens over the batches a scorer ran (for the run manifest)."""

    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0

    def add(self, lengths: Sequence[int]) -> None:
        """Record one batch of rows with these lengths (padded to the longest)."""
        if lengths:
            self.real_tokens += int(sum(lengths))
            self.padded_tokens += int(max(lengths)) * len(lengths)
            self.batches += 1

    def to_dict(self) -> dict:
        eff = self.real_tokens / self.padded_tokens if self.padded_tokens else None
        return {"real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens, "batches": self.batches,
                "padding_efficiency": eff}
