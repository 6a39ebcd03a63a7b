"""Per-turn features: the projected gradient of each assistant turn's own loss, one forward and 1 + K backwards.

Turn k's loss is the mean NLL over the row's loss tokens that belong to turn k (`turn_index == k`). Its gradient is
not a part of the row's gradient that one backward could split off: the output gradient d_t at position t collects
every later loss token (attention), so turn k's d_t differs from the row's. What is shared is the forward: the
autograd graph is kept (`retain_graph`) and walked once for the row loss (the row feature, bit-identical to
`GradientFeaturizer.featurize`) and once per turn index k for the sum over rows of their turn-k losses (rows never
interact, so each row gets its own turn-k feature). Cost: forward + (1 + K) input-gradient backwards, against
(forward + backward) per turn for pseudo-rows; the hooks fire on every backward and sum into a fresh `state.sums`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drift_stream.grads.features import FeatureOutput, GradientFeaturizer
from drift_stream.model.losses import example_losses

if TYPE_CHECKING:
    import torch


def featurize_turns(featurizer: GradientFeaturizer, batch: dict, turn_index: "torch.Tensor",
                    num_turns: int) -> tuple[FeatureOutput, list[FeatureOutput]]:
    """(row features, [one FeatureOutput per turn index k < num_turns]) of a collated batch.

    turn_index [B, T] long: the assistant turn of each loss token (-1 or anything where loss_mask is 0). A row
    without a turn k (fewer turns, or turn k of weight 0 or truncated away) gets turn k flagged "no_loss_tokens"
    with a zero feature, as any row without loss tokens."""
    import torch

    ids, attn, lmask, positions = featurizer._prepare(batch)
    batch_size = ids.shape[0]
    with torch.inference_mode(False), torch.enable_grad(), featurizer.tracking(attn.bool()) as state:
        out = example_losses(featurizer.model, None, prepared=(ids, attn, lmask, positions),
                             autocast_dtype=featurizer.config.autocast_dtype, return_token_nll=True)
        loss, num_tokens = out.loss.to(featurizer.device), out.num_tokens.to(featurizer.device)
        usable = torch.isfinite(loss) & (num_tokens > 0)
        total = torch.where(usable, loss, 0.0).sum()
        if not state.leaves:
            raise RuntimeError("no tracked module ran in the forward pass: is the model called another way?")
        if total.requires_grad:
            torch.autograd.grad(total, state.leaves, allow_unused=True, retain_graph=num_turns > 0)
        row_features = featurizer._collect(state, batch_size)
        token_nll = out.token_nll  # [B, T], on the loss's device
        in_loss = lmask.to(token_nll.device) > 0
        turns = torch.as_tensor(turn_index).to(token_nll.device, torch.long)
        per_turn = []
        for k in range(num_turns):
            state.sums = {}
            mask = in_loss & (turns == k)  # [B, T]
            count = mask.sum(dim=1)  # [B] int64
            turn_loss = torch.where(mask, token_nll, 0.0).sum(dim=1) / count  # [B]; 0 / 0 = NaN: no turn k
            ok = torch.isfinite(turn_loss) & (count > 0)
            turn_total = torch.where(ok, turn_loss, 0.0).sum()
            if turn_total.requires_grad:
                torch.autograd.grad(turn_total, state.leaves, allow_unused=True, retain_graph=k < num_turns - 1)
            per_turn.append((featurizer._collect(state, batch_size), turn_loss.detach().to(featurizer.device),
                             count.to(featurizer.device)))
    row = featurizer._output(row_features, loss.detach(), num_tokens)
    return row, [featurizer._output(*parts) for parts in per_turn]
