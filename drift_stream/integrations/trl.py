"""`WeightedSFTTrainer`: TRL's `SFTTrainer` that reads drift-stream's `weight` column (optional import: `pip install
drift-stream[trl]`).

    from drift_stream.integrations.trl import WeightedSFTTrainer
    trainer = WeightedSFTTrainer(model=model, args=SFTConfig(...), train_dataset=load_dataset("parquet", ...)["train"])
    trainer.train()

The loss (`integrations.trainers.weighted_example_loss`, the same function `train_sft` and the benchmark use) is

    loss = sum_i w_i * l_i / N

over the rows i of one optimiser step, with l_i the mean NLL of row i's loss tokens (the mask TRL builds:
`completion_only_loss` for prompt/completion rows, `assistant_only_loss` for messages rows, else every token) and N
the number of rows of the step with at least one loss token. `refine --policy weights` writes weights with mean 1, so
the loss keeps the scale of the unweighted per-example mean. `weighting="token"` weights every token of row i by w_i
and divides by the step's loss tokens: with all weights 1 that is exactly `SFTTrainer`'s own loss.

Normalisation is global, not per micro-batch: before the micro-batches of a step run, `get_batch_samples` counts N
over all of them (gradient accumulation) and sums it over data-parallel ranks (`accelerator.gather`); each rank's loss
is multiplied by the number of ranks because DDP averages gradients. So accumulation steps x micro-batch size, and
ranks x per-device batch, give the gradient of one big batch (tests/test_trl.py: accumulation 1 vs 4, and
two gloo ranks vs one process).

Rows of weight 0 are removed from the dataset before TRL prepares it: they are never tokenized, drawn or run (the
same as removing them from the file). Packing and padding-free batches are refused: they concatenate rows, and the
per-row weight needs the row boundaries that TRL's padding-free collator flattens away.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from drift_stream.errors import ConfigError, InputError
from drift_stream.io.columns import WEIGHT
from drift_stream.model.losses import (
    WEIGHTINGS,
    loss_denominator,
    weighted_example_loss,
)

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("drift_stream.integrations.trl needs TRL: pip install 'drift-stream[trl]'") from err

logger = logging.getLogger(__name__)

__all__ = ["WeightedSFTTrainer", "SFTConfig", "WEIGHT_KEY"]

WEIGHT_KEY = WEIGHT  # the key the collator puts the [B] weights under, and the refine policy's column name


def _check_weight(value: Any, where: str) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: weight must be a number, got {value!r}; fill it or drop the row")
    w = float(value)
    if not (math.isfinite(w) and w >= 0):
        raise InputError(f"{where}: weight must be finite and >= 0, got {w}; fix the refine output")
    return w


def drop_zero_weights(dataset, weight_column: str = WEIGHT):
    """`dataset` (datasets.Dataset or IterableDataset) without its rows of weight 0; every weight is checked.

    Raises InputError naming the column, or the first bad row (a Dataset is checked eagerly, an IterableDataset as it
    streams).
    """
    from datasets import IterableDataset

    names = dataset.column_names
    if names is not None and weight_column not in names:
        raise InputError(f"train_dataset has no {weight_column!r} column (columns: {', '.join(names)}): export it "
                         "with `drift-stream export RUN --format trl` or pass weight_column=")
    if isinstance(dataset, IterableDataset):
        return dataset.filter(lambda w: _check_weight(w, f"column {weight_column!r}") > 0, input_columns=weight_column)
    weights = dataset[weight_column]
    keep = [i for i, w in enumerate(weights) if _check_weight(w, f"row {i} of column {weight_column!r}") > 0]
    if len(keep) == len(weights):
        return dataset
    logger.info("WeightedSFTTrainer: %d of %d rows have weight 0 and are skipped", len(weights) - len(keep),
                len(weights))
    if not keep:
        raise InputError(f"every row has {weight_column} 0: nothing to train on")
    return dataset.select(keep)


class _WeightCollator:
    """Wraps TRL's collator: pops each example's weight, collates the rest, adds `weight` [B] float32 (1 if absent)."""

    def __init__(self, inner, weight_column: str):
        self.inner = inner
        self.weight_column = weight_column

    def __call__(self, examples):
        import torch

        weights = [float(e.pop(self.weight_column, 1.0)) for e in examples]
        batch = self.inner(examples)
        batch[WEIGHT_KEY] = torch.tensor(weights, dtype=torch.float32)
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose loss weights each row's mean token loss by its `weight` (see the module docstring).

    Extra keyword arguments: `weight_column` (default "weight"), `weighting` ("example": w_i times the row's mean
    token loss, the default; "token": w_i on every token, TRL's token-mean convention). Everything else is
    SFTTrainer's. Raises ConfigError for packing / padding_free / a custom `compute_loss_func` / label smoothing /
    a non-"nll" `loss_type`, and InputError for a missing or bad weight column.
    """

    # compute_loss returns the loss already divided by the step's N: Trainer must not divide it again by the
    # accumulation steps (transformers.Trainer.loss_is_scaled_for_ga).
    loss_is_scaled_for_ga = True

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, *, weight_column: str = WEIGHT, weighting: str = "example", **kwargs):
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if args is not None:
            if getattr(args, "packing", False) or getattr(args, "padding_free", False):
                raise ConfigError(
                    "WeightedSFTTrainer does not support packing or padding_free: they concatenate rows into one "
                    "sequence, and a per-row weight needs the row boundaries. Set packing=False and padding_free=False "
                    "in SFTConfig (or train unweighted on `drift-stream export --format repeat` output)")
            if getattr(args, "loss_type", "nll") != "nll" or getattr(args, "label_smoothing_factor", 0.0):
                raise ConfigError(f"WeightedSFTTrainer computes a weighted NLL; loss_type={args.loss_type!r} / "
                                  f"label_smoothing_factor={args.label_smoothing_factor} are not supported")
        if kwargs.get("compute_loss_func") is not None:
            raise ConfigError("WeightedSFTTrainer computes its own loss; do not pass compute_loss_func")
        self.weight_column = weight_column
        self.weighting = weighting
        self._step_denominator = None
        if train_dataset is not None:
            train_dataset = drop_zero_weights(train_dataset, weight_column)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        self.data_collator = _WeightCollator(self.data_collator, weight_column)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.weight_column not in self._signature_columns:  # else remove_unused_columns drops the weights
            self._signature_columns = [*self._signature_columns, self.weight_column]

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """Trainer's prefetch of one optimiser step's micro-batches, plus N: their rows (or loss tokens) over ranks."""
        import torch

        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        local = sum((loss_denominator(b["labels"] != -100, self.weighting) for b in batch_samples),
                    torch.tensor(0, dtype=torch.int64))
        if self.accelerator.num_processes > 1:
            local = self.accelerator.gather(local.reshape(1).to(device)).sum()
        self._step_denominator = local.to(device)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The weighted loss of one micro-batch: `weighted_example_loss` with the step's N (training) or this
        batch's N (evaluation). inputs: TRL's collated batch (input_ids, attention_mask, labels [B, T]) + weight [B]."""
        import torch

        weights = inputs.pop(WEIGHT_KEY, None)
        labels = inputs["labels"]
        if weights is None:
            weights = torch.ones(labels.shape[0], dtype=torch.float32)
        batch = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])),
            "loss_mask": (labels != -100).to(torch.float32),  # labels[t] is the target predicted from < t
        }
        training = model.training and self._step_denominator is not None
        denominator = self._step_denominator if training else None
        loss = weighted_example_loss(model, batch, weights.to(labels.device), denominator=denominator,
                                     weighting=self.weighting)
        if training and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients; N is already global
        if return_outputs:
            with torch.no_grad():
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return loss, outputs
        return loss
