"""THE per-example loss: mean next-token NLL over an example's loss tokens, with the LM head only where the loss is.

Every consumer of a per-example SFT loss goes through `example_losses` (the drift/less/if features, `loss_only`, the
loss and ifd scorers, the bank's reference losses, the trainer integration, rollout log-probs, the benchmarks), so
`drift_loss` is the same number whichever scorer wrote it.

How: run the decoder body (`model.base_model`: the stack of blocks and the final norm), gather the hidden states at
the positions that predict a loss token (position t-1 for a target at t), and apply the model's own output head
(`get_output_embeddings()`, tied or not, with its bias) to `chunk_tokens` of them at a time, followed by what the
model does after the head: Gemma-style `final_logit_softcapping` (cap * tanh(z / cap)), Cohere's `logit_scale`
(z * s), Granite's `logits_scaling` (z / s). Cross-entropy per chunk in float32 (float64 for a float64 head), summed
per example and divided by its number of loss tokens. Peak memory is the body's activations plus ONE
[chunk_tokens, V] block of logits, instead of [B, T, V] logits, their float32 copy and the softmax gradient: at a
151,936-token vocabulary that is the difference between 7.6 GB and ~3 GB for 4 x 1,024 tokens (issue 12).

Whether the split body -> head reproduces `model(...).logits` is checked once per model on a 12-token probe (eval
mode, no grad); where it does not (an unknown post-head transform, a model without a separable head) the full-logits
path is used, with a one-line warning naming the model class.

Gradients: when grad mode is on, the loss is differentiable. With a frozen head (the featurizer: every parameter
frozen, gradients wanted w.r.t. hidden states only) each chunk's d NLL / d h is computed in the forward pass and the
[chunk, V] block is freed at once (an autograd Function whose backward is a scale by the incoming gradient); with a
head that requires grad (training) each chunk is recomputed in the backward (activation checkpointing), so the weight
gradient is exact and memory stays one chunk.

Positions are `cumsum(attention_mask) - 1`, so left and right padding give the same losses.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from drift_stream.errors import ConfigError

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

# One chunk of logits holds at most this many float32 entries (128 MiB): ~220 tokens at a 151,936 vocabulary.
DEFAULT_CHUNK_ELEMENTS = 2**25
_PROBE_TOKENS = 12


@dataclass
class LossOutput:
    """Per-example losses of one batch (tensors on the model's output device).

    loss [B]: mean NLL over the row's loss tokens, float32 (float64 for a float64 model); NaN for a row without loss
      tokens. Differentiable when computed with grad enabled.
    num_tokens [B] int64: loss tokens per row.
    token_nll [B, T] (only with `return_token_nll=True`): NLL of token t (predicted from < t) where loss_mask[t] == 1,
      0 elsewhere; `-token_nll` are the per-token log-probs (rollouts).
    """

    loss: Any
    num_tokens: Any
    token_nll: Any = None


@dataclass(frozen=True)
class _Head:
    """How to get logits from hidden states for one model: its body, output head and post-head transform."""

    body: Any  # module: (input_ids, attention_mask, position_ids) -> last_hidden_state [B, T, H]
    head: Any  # module: [N, H] -> [N, V]
    softcap: float | None
    scale: float | None  # multiply (Cohere logit_scale)
    divide: float | None  # divide (Granite logits_scaling)

    def logits(self, hidden, accum_dtype):
        """hidden [N, H] -> logits [N, V] in accum_dtype, exactly as the model's forward computes them."""
        import torch

        z = self.head(hidden.to(self.head.weight.device)).to(accum_dtype)
        if self.scale is not None:
            z = z * self.scale
        if self.divide is not None:
            z = z / self.divide
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


_HEADS: "weakref.WeakKeyDictionary[Any, _Head | None]" = weakref.WeakKeyDictionary()


def _unwrap(model):
    """The causal LM inside a PEFT wrapper (LoRA layers stay injected), else the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _number(value) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else None


def _split_head(model) -> _Head | None:
    """Body, head and post-head transform of a HF causal LM; None when the model has no separable head."""
    lm = _unwrap(model)
    get_out = getattr(lm, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    body = getattr(lm, "base_model", None)
    if head is None or getattr(head, "weight", None) is None or body is None or body is lm:
        return None
    config = getattr(lm, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return _Head(
        body=body,
        head=head,
        softcap=_number(getattr(text, "final_logit_softcapping", None)),
        scale=_number(getattr(lm, "logit_scale", None)),
        divide=_number(getattr(text, "logits_scaling", None)),
    )


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() (no dropout) for the duration, then every module's own mode back. Free when already in eval."""
    if not model.training:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def resolve_head(model) -> _Head | None:
    """The split head of `model` if it reproduces `model(...).logits` on a probe, else None (full-logits path).

    Cached per model object. Call it outside any forward hooks (the probe runs the model once on 12 tokens).
    """
    import torch

    if model in _HEADS:
        return _HEADS[model]
    split = _split_head(model)
    reason = None if split is not None else "no separable output head (get_output_embeddings / base_model)"
    if split is not None:
        param = split.head.weight
        vocab = int(param.shape[0])
        ids = (torch.arange(_PROBE_TOKENS, device=param.device) * 7 + 3) % vocab  # [L], deterministic token ids
        ids = ids.unsqueeze(0)  # [1, L]
        attn = torch.ones_like(ids)
        try:
            with torch.no_grad(), eval_mode(model):
                full = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[0].double()
                hidden = _body_hidden(split.body, ids, attn, attn.cumsum(-1) - 1)[0]
                ours = split.logits(hidden, torch.float64)
        except Exception as exc:  # any failure means: not this way
            reason = f"probe failed ({type(exc).__name__}: {exc})"
        else:
            exact = param.dtype in (torch.float32, torch.float64)
            tol = (1e-4 if exact else 3e-2) * (1.0 + float(full.abs().max()))
            if ours.shape != full.shape:
                reason = f"head gives {tuple(ours.shape)}, the model {tuple(full.shape)}"
            elif float((ours - full).abs().max()) > tol:
                reason = f"head differs from the model's logits by {float((ours - full).abs().max()):.3g}"
    if reason is not None:
        logger.warning("%s: using full [B, T, V] logits for losses (%s)", type(_unwrap(model)).__name__, reason)
        split = None
    _HEADS[model] = split
    return split


def _body_hidden(body, ids, attn, positions):
    out = body(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]


def input_device(model):
    """The device the model's input ids go to (its input embeddings'; models may be split over devices)."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    weight = getattr(emb, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def prepare_batch(batch: Mapping[str, Any], device):
    """Validate a collated batch and move it to `device`.

    batch: input_ids / attention_mask / loss_mask, each [B, T] (see tokenization.collate); loss_mask[t] == 1 where
    token t is a target predicted from tokens < t. Returns (input_ids long, attention_mask long, loss_mask float32,
    position_ids long), each [B, T]; position_ids = cumsum(attention_mask) - 1 (clamped at 0 on left padding).
    Raises ValueError naming what is wrong.
    """
    import torch

    missing = [k for k in ("input_ids", "attention_mask", "loss_mask") if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}: build it with drift_stream.data.formats.collate")
    ids = torch.as_tensor(batch["input_ids"]).to(device, torch.long)
    attn = torch.as_tensor(batch["attention_mask"]).to(device, torch.long)
    lmask = torch.as_tensor(batch["loss_mask"]).to(device, torch.float32)
    if ids.dim() != 2 or attn.shape != ids.shape or lmask.shape != ids.shape or ids.shape[0] == 0:
        raise ValueError(
            f"input_ids, attention_mask, loss_mask must share a non-empty [B, T] shape, got "
            f"{tuple(ids.shape)}, {tuple(attn.shape)}, {tuple(lmask.shape)}"
        )
    if not bool(((lmask == 0) | (lmask == 1)).all()):
        raise ValueError("loss_mask must hold only 0 and 1")
    if bool((lmask[:, 0] != 0).any()):
        raise ValueError("loss_mask[:, 0] must be 0: the first token is never predicted")
    if bool(((lmask > 0) & (attn == 0)).any()):
        raise ValueError("loss_mask is 1 on a padding position (attention_mask == 0)")
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, lmask, positions


def _autocast(device_type: str, autocast_dtype: str | None):
    import torch

    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, autocast_dtype))


def _chunk_nll_fn(head: _Head, accum_dtype):
    import torch

    def nll(hidden, targets):  # [C, H], [C] -> [C]
        return torch.nn.functional.cross_entropy(head.logits(hidden, accum_dtype), targets, reduction="none")

    return nll


def _fused_linear_nll(head: _Head, hidden, targets, accum_dtype):
    """(NLL [C], d NLL / d hidden [C, H]) for a frozen nn.Linear head, from ONE [C, V] buffer (two with soft-capping).

    With u = h W^T + b, v = u * scale / divide, w = cap * tanh(v / cap): NLL = logsumexp(w) - w[target] and
    d NLL / d u = (softmax(w) - onehot(target)) * (1 - (w / cap)^2) * scale / divide, so d NLL / d h = that @ W.
    Autograd's cross-entropy would keep log_softmax(w) and its gradient as two more [C, V] buffers and read them
    again; here the logits buffer becomes the gradient in place (~5-10% of the featurizer's time at V = 151,936).
    """
    import torch

    weight = head.head.weight  # [V, H]
    z = head.head(hidden.to(weight.device)).to(accum_dtype)  # [C, V]; a fresh buffer we own
    if head.scale is not None:
        z.mul_(head.scale)
    if head.divide is not None:
        z.div_(head.divide)
    deriv = None
    if head.softcap is not None:
        z.div_(head.softcap).tanh_()  # t = tanh(v / cap)
        deriv = 1.0 - z.square()  # d w / d v
        z.mul_(head.softcap)  # w
    lse = torch.logsumexp(z, dim=1)  # [C]
    nll = lse - z.gather(1, targets.unsqueeze(1)).squeeze(1)  # [C]
    z.sub_(lse.unsqueeze(1)).exp_()  # softmax(w)
    z.scatter_add_(1, targets.unsqueeze(1), torch.full_like(nll, -1.0).unsqueeze(1))  # - onehot
    if deriv is not None:
        z.mul_(deriv)
    if head.scale is not None:
        z.mul_(head.scale)
    if head.divide is not None:
        z.div_(head.divide)
    grad = z.to(weight.dtype).matmul(weight)  # [C, H]
    return nll, grad.to(hidden.dtype)


def _frozen_head_nll(head: _Head, hidden, targets, accum_dtype, chunk: int, fused: bool | None = None):
    """NLL [N] of targets [N] given hidden [N, H], differentiable w.r.t. hidden only (the head is frozen).

    Each chunk's d NLL_t / d h_t is computed right away (the FLOPs of autograd: head forward + one [C, V] x [V, H]
    matmul) and only that [N, H] gradient is kept, so no [N, V] block outlives its chunk. fused (default: when the
    head is a plain nn.Linear): `_fused_linear_nll`; else autograd through the head's own forward.
    """
    import torch

    if fused is None:
        fused = type(head.head) is torch.nn.Linear
    nll_of = _chunk_nll_fn(head, accum_dtype)

    class _FrozenHeadNLL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            out, grads = [], []
            for s in range(0, h.shape[0], chunk):
                if fused:
                    value, grad = _fused_linear_nll(head, h[s : s + chunk].detach(), targets[s : s + chunk],
                                                    accum_dtype)
                else:
                    hc = h[s : s + chunk].detach().requires_grad_(True)
                    with torch.enable_grad():
                        value = nll_of(hc, targets[s : s + chunk])  # [C]
                        (grad,) = torch.autograd.grad(value.sum(), hc)  # d NLL_t / d h_t, [C, H]
                out.append(value.detach())
                grads.append(grad)
            ctx.save_for_backward(torch.cat(grads))
            return torch.cat(out)

        @staticmethod
        def backward(ctx, grad_out):  # grad_out [N]
            (grads,) = ctx.saved_tensors
            return grads * grad_out.to(grads.dtype).unsqueeze(1)

    return _FrozenHeadNLL.apply(hidden)


def example_losses(
    model,
    batch: Mapping[str, Any],
    *,
    chunk_tokens: int | None = None,
    autocast_dtype: str | None = None,
    return_token_nll: bool = False,
    prepared: tuple | None = None,
) -> LossOutput:
    """Per-example mean NLL over loss tokens (see LossOutput), with the LM head only at loss positions.

    model: a HF causal LM (PEFT-wrapped or not). batch: `input_ids`, `attention_mask`, `loss_mask` [B, T] (from
    `tokenization.collate`; any padding side). chunk_tokens: loss tokens per head application (default: as many as
    fit 2**25 logits, ~220 at a 151,936 vocabulary); it changes memory, never the result beyond float rounding.
    autocast_dtype: None, "bfloat16" or "float16": body and head under torch.autocast; cross-entropy and the per-row
    sums stay in float32. prepared: (ids, attn, loss_mask, positions) from `prepare_batch`, to skip re-validation.

    Grad: computed under the caller's grad mode. Under `torch.no_grad()` nothing is kept for a backward. With grad on,
    `loss` is differentiable w.r.t. hidden states and, where they require grad, the model's parameters (training).
    Formula: loss_i = sum_{t: m_it = 1} -log softmax(z_{i,t-1})[x_it] / sum_t m_it, z = post(head(h)).
    """
    import torch

    device = input_device(model)
    ids, attn, lmask, positions = prepared if prepared is not None else prepare_batch(batch, device)
    head = resolve_head(model)
    target_mask = lmask[:, 1:] > 0  # [B, T-1]: target t+1 predicted at position t
    rows, cols = target_mask.nonzero(as_tuple=True)  # [N], row-major order
    targets = ids[:, 1:][rows, cols]  # [N]
    num_tokens = target_mask.sum(dim=1)  # [B] int64
    ref = head.head.weight if head is not None else next(model.parameters())
    accum = torch.float64 if ref.dtype == torch.float64 else torch.float32
    with _autocast(ids.device.type, autocast_dtype):
        if head is not None:
            hidden = _body_hidden(head.body, ids, attn, positions)[:, :-1][rows, cols]  # [N, H]
            vocab = int(head.head.weight.shape[0])
        else:
            full = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=False).logits
            hidden = full[:, :-1][rows, cols]  # [N, V]: already logits
            vocab = int(full.shape[-1])
        chunk = chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))
        if hidden.shape[0] == 0:  # no loss token in the whole batch
            parts = []
        elif head is None:
            t_dev = targets.to(hidden.device)
            parts = [
                torch.nn.functional.cross_entropy(hidden[s : s + chunk].to(accum), t_dev[s : s + chunk],
                                                  reduction="none")
                for s in range(0, hidden.shape[0], chunk)
            ]
        elif torch.is_grad_enabled() and any(p.requires_grad for p in head.head.parameters()):
            from torch.utils.checkpoint import checkpoint

            nll_of = _chunk_nll_fn(head, accum)
            t_dev = targets.to(head.head.weight.device)
            parts = [
                checkpoint(nll_of, hidden[s : s + chunk], t_dev[s : s + chunk], use_reentrant=False)
                for s in range(0, hidden.shape[0], chunk)
            ]
        elif torch.is_grad_enabled() and hidden.requires_grad:
            parts = [_frozen_head_nll(head, hidden, targets.to(head.head.weight.device), accum, chunk)]
        else:
            nll_of = _chunk_nll_fn(head, accum)
            t_dev = targets.to(head.head.weight.device)
            parts = [nll_of(hidden[s : s + chunk], t_dev[s : s + chunk]) for s in range(0, hidden.shape[0], chunk)]
    nll = torch.cat(parts) if parts else torch.zeros(0, dtype=accum, device=ids.device)  # [N]
    out_device = nll.device
    rows_o = rows.to(out_device)
    sums = torch.zeros(ids.shape[0], dtype=nll.dtype, device=out_device).index_add(0, rows_o, nll)  # [B]
    num = num_tokens.to(out_device)
    loss = sums / num  # 0 / 0 = NaN for rows without loss tokens
    token_nll = None
    if return_token_nll:
        token_nll = torch.zeros(ids.shape, dtype=nll.dtype, device=out_device)
        token_nll = token_nll.index_put((rows_o, cols.to(out_device) + 1), nll)  # [B, T]
    return LossOutput(loss=loss, num_tokens=num, token_nll=token_nll)


def completion_logprobs(model, prompts, completions, pad_token_id: int, *, chunk_tokens: int | None = None):
    """Mean log-prob of each completion given its prompt under `model` (temperature 1), by `example_losses`.

    prompts, completions: sequences of token-id lists (one pair per row). Returns a float64 CPU tensor [n]: minus
    the mean NLL over the completion's tokens; NaN for an empty completion. Used for rollouts instead of keeping
    generate()'s [B, N, V] step logits (2.5 GB for 16 rollouts x 256 tokens at a 151,936 vocabulary).
    """
    import torch

    from drift_stream.data.example_types import TokenizedExample
    from drift_stream.data.tokenization import collate

    rows = [
        TokenizedExample(id=str(i), input_ids=[*p, *c], loss_mask=[0] * len(p) + [1] * len(c))
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    if not rows:
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad(), eval_mode(model):
        out = example_losses(model, collate(rows, pad_token_id, padding_side="right"), chunk_tokens=chunk_tokens)
    return -out.loss.double().cpu()


# The weighted SFT loss: every trainer here (embedded.training.train_sft, integrations.trl.WeightedSFTTrainer)
# calls it, so the benchmark trains through the same loss users get.
WEIGHTINGS = ("example", "token")


def loss_denominator(loss_mask, weighting: str = "example"):
    """The count a weighted loss divides by: rows with >= 1 loss token ("example") or loss tokens ("token").

    loss_mask [B, T] (1 where token t is a target predicted from < t; position 0 never is) -> 0-dim int64 tensor.
    Summed over every micro-batch of an optimiser step (and every data-parallel rank) it is the step's N.
    """
    import torch

    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    counts = (torch.as_tensor(loss_mask)[:, 1:] > 0).sum(1)  # [B] loss tokens per row
    return (counts > 0).sum() if weighting == "example" else counts.sum()


def weighted_example_loss(model, batch: Mapping[str, Any], weights, *, denominator=None, weighting: str = "example"):
    """The weighted SFT loss of one (micro-)batch: sum_i w_i * l_i / N (`weighting="example"`, the default).

    model: a HF causal LM. batch: `input_ids`, `attention_mask`, `loss_mask` [B, T] (`formats.collate`; a TRL batch
    maps `labels != -100` to loss_mask). weights [B] (>= 0, finite). l_i: row i's mean NLL over its loss tokens (DESIGN.md
    section 2; `example_losses`). denominator: N, the rows of the whole optimiser step across gradient-accumulation
    micro-batches and data-parallel ranks (default: this batch's rows, `loss_denominator`), so that micro-batches summed
    equal one big batch. With mean-1 weights the loss keeps the scale of the unweighted mean.

    `weighting="token"`: sum_i w_i * sum_t nll_it / (loss tokens of the step): every token of row i weighted by w_i,
    TRL's and LLaMA-Factory's token-mean convention; with all weights 1 it is `SFTTrainer`'s own loss.
    Rows without loss tokens contribute 0. Returns a 0-dim float32 tensor (differentiable under grad mode).
    """
    import torch

    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    mask = torch.as_tensor(batch["loss_mask"])
    losses = example_losses(model, batch).loss  # [B]
    w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)  # [B]
    counts = (mask[:, 1:] > 0).sum(1).to(losses.device)  # [B]
    if denominator is None:
        denominator = loss_denominator(mask, weighting)
    per_row = losses if weighting == "example" else losses * counts
    per_row = torch.where(counts > 0, per_row, torch.zeros_like(per_row))  # no loss tokens: 0, never NaN
    return (w * per_row).sum() / torch.as_tensor(denominator, dtype=losses.dtype, device=losses.device).clamp_min(1)
