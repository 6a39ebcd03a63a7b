"""`WeightedSFTTrainer`: TRL's `SFTTrainer` that reads drift-stream's `weight` column (optional import: `pip install
drift-stream[trl]`).

    from drift_stream.integrations.trl import WeightedSFTTrainer
    trainer = WeightedSFTTrainer(model=model, args=SFTConfig(...), train_dataset=load_dataset("parquet", ...)["train"])
    trainer.train()

The loss (`integrations.trainers.weighted_example_loss`, the same function `train_sft` and the benchmark use) is

    loss = sum_i w_i * l_i / N

over the rows i of one optimiser step, with l_i the mean NLL of row i's loss tokens (the mask TRL builds:
`completion_only_loss` for prompt/completion rows, `assistant_only_loss` for messages rows, else every token but the
first, which nothing predicts: TRL's loss reads `labels[:, 1:]`, as `loss_mask` says) and N
the number of rows of the step with at least one loss token. `refine --policy weights` writes weights with mean 1, so
the loss keeps the scale of the unweighted per-example mean. `weighting="token"` weights every token of row i by w_i
and divides by the step's loss tokens: with all weights 1 that is exactly `SFTTrainer`'s own loss.

Normalisation is global, not per micro-batch: before the micro-batches of a step run, `get_batch_samples` counts N
over all of them (gradient accumulation) and sums it over data-parallel ranks (`accelerator.gather`); each rank's loss
is multiplied by the number of ranks because DDP averages gradients. So accumulation steps x micro-batch size, and
ranks x per-device batch, give the gradient of one big batch (tests/test_trl.py: accumulation 1 vs 4, and
two gloo ranks vs one process).

Gradient accumulation: `compute_loss` returns the micro-batch's share of the step's loss, so `Trainer` must not
divide it by the accumulation steps. transformers >= 5.19 reads `loss_is_scaled_for_ga`; older versions divide unless
the model accepts loss kwargs and `num_items_in_batch` is set, and there the loss is multiplied back
(`_undo_trainer_ga_division`).

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
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("drift_stream.integrations.trl needs TRL: pip install 'drift-stream[trl]'") from err

# transformers >= 5.19: Trainer.training_step leaves the loss undivided when the class says it is scaled
TRAINER_READS_LOSS_SCALING = hasattr(Trainer, "loss_is_scaled_for_ga")

logger = logging.getLogger(__name__)

__all__ = ["WeightedSFTTrainer", "SFTConfig", "WEIGHT_KEY"]

WEIGHT_KEY = WEIGHT  # the key the collator puts the [B] weights under, and the refine policy's column name


def loss_mask_from_labels(labels):
    """[B, T] float32 loss mask of a TRL batch: 1 where labels[t] != -100, and 0 at t = 0.

    TRL's loss (`add_fused_lm_head`, like transformers' causal LM loss) scores labels[:, 1:] against the logits of
    positions :-1, so labels[:, 0] is never a target even where TRL leaves it unmasked (`text` rows, messages
    without `assistant_only_loss`: labels == input_ids). `loss_mask` marks tokens predicted from earlier ones.
    """
    import torch

    mask = (labels != -100).to(torch.float32)
    mask[:, 0] = 0
    return mask


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
    # accumulation steps (transformers >= 5.19 reads this; older versions: _undo_trainer_ga_division).
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
        local = sum((loss_denominator(loss_mask_from_labels(b["labels"]), self.weighting) for b in batch_samples),
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
            "loss_mask": loss_mask_from_labels(labels),
        }
        training = model.training and self._step_denominator is not None
        denominator = self._step_denominator if training else None
        loss = weighted_example_loss(model, batch, weights.to(labels.device), denominator=denominator,
                                     weighting=self.weighting)
        if training and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients; N is already global
        if training:
            loss = loss * self._undo_trainer_ga_division(num_items_in_batch)
        if return_outputs:
            with torch.no_grad():
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return loss, outputs
        return loss

    def _undo_trainer_ga_division(self, num_items_in_batch) -> int:
        """The factor that cancels `Trainer.training_step`'s division by the accumulation steps: 1 where it does not
        divide (transformers >= 5.19 reads `loss_is_scaled_for_ga`), else the steps. Before 5.19 it divided when
        `(not model_accepts_loss_kwargs or num_items_in_batch is None) and compute_loss_func is None`."""
        if TRAINER_READS_LOSS_SCALING:
            return 1
        divides = ((not getattr(self, "model_accepts_loss_kwargs", False) or num_items_in_batch is None)
                   and getattr(self, "compute_loss_func", None) is None)
        return int(self.current_gradient_accumulation_steps) if divides else 1
