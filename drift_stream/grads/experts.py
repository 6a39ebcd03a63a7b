"""Fused mixture-of-experts layers (transformers 5): finding them, and a forward that exposes each expert's linears.

Qwen3-MoE, Mixtral, GPT-OSS (and the other `@use_experts_implementation` classes) keep every expert of a layer in
3-D parameters: `gate_up_proj` (or `up_proj`) and `down_proj`, with expert e's weight at index e. Not transposed
(Qwen3-MoE, Mixtral): W_e is [out, in], as in `F.linear` (gate_up [E, 2I, H], down [E, H, I]). Transposed
(GPT-OSS): W_e is [in, out] (gate_up [E, H, 2I], down [E, I, H]), with per-expert biases and an interleaved
gate/up activation (`_apply_gate`). Which kernel computes the layer (`config._experts_implementation`: eager loop,
`batched_mm`, `grouped_mm`, ...) is a runtime choice; all compute the same function, and none of them goes
through an `nn.Linear`, so forward hooks never see an expert's input or output.

`experts_forward` computes that same function as transformers' eager loop (gather the tokens routed to e, up
projection (+ bias), gate or activation, down projection (+ bias), optional post-expert norm, times the routing
weight, scatter-add), handing each per-expert linear's input and output to a callback that may attach a gradient
hook. The featurizer installs it in place of the module's forward only while it tracks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from drift_stream.errors import ConfigError

_UP_NAMES = ("gate_up_proj", "up_proj")
# Set on the class by transformers' `use_experts_implementation`: what a layout needs to be computed here.
_LAYOUT_ATTRS = ("has_gate", "has_bias", "is_transposed")


@dataclass(frozen=True)
class FusedExperts:
    """One fused experts module.

    weights: ((param, in_features, out_features), ...) in forward order: the up (gate_up_proj or up_proj) and
      down_proj weights, each [num_experts, ...] with expert e's matrix mapping in_features -> out_features.
    supported: False when the module lacks the transformers 5 layout attributes (then it cannot be tracked).
    """

    name: str
    num_experts: int
    weights: tuple[tuple[str, int, int], ...]
    is_transposed: bool
    has_bias: bool
    supported: bool


def _three_d(module, attr: str):
    p = module._parameters.get(attr)
    return p if p is not None and p.dim() == 3 else None


def describe_fused_experts(name: str, module) -> FusedExperts | None:
    """The FusedExperts of `module`, or None when it does not hold fused 3-D expert weights."""
    down = _three_d(module, "down_proj")
    up_name = next((n for n in _UP_NAMES if _three_d(module, n) is not None), None)
    if down is None or up_name is None:
        return None
    up = _three_d(module, up_name)
    transposed = bool(getattr(module, "is_transposed", False))
    weights = []
    for attr, p in ((up_name, up), ("down_proj", down)):
        fan_in, fan_out = (p.shape[1], p.shape[2]) if transposed else (p.shape[2], p.shape[1])
        weights.append((attr, int(fan_in), int(fan_out)))
    supported = (
        all(hasattr(module, a) for a in _LAYOUT_ATTRS)
        and bool(module.has_gate) == (up_name == "gate_up_proj")
        and int(getattr(module, "num_experts", -1)) == up.shape[0] == down.shape[0]
        and not getattr(module, "_is_expert_parallel", False)
    )
    return FusedExperts(name, int(up.shape[0]), tuple(weights), transposed, bool(getattr(module, "has_bias", False)),
                        supported)


def find_fused_experts(model) -> list[FusedExperts]:
    """Every fused experts module of `model`, in `named_modules()` order."""
    found = []
    for name, module in model.named_modules():
        desc = describe_fused_experts(name, module)
        if desc is not None:
            found.append(desc)
    return found


def _routing_args(args, kwargs):
    """(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K]) whichever names the model passes them by."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    values = list(args[:3])
    for slot in names[len(values):]:
        key = next((k for k in slot if k in kwargs), None)
        if key is None:
            raise TypeError(f"experts forward called without {slot[0]}: got args {len(args)}, kwargs {sorted(kwargs)}")
        values.append(kwargs[key])
    return values


def _expert_linear(module, attr: str, expert: int, x, transposed: bool, has_bias: bool):
    weight = getattr(module, attr)[expert]
    out = x.matmul(weight) if transposed else x.matmul(weight.t())
    if has_bias:
        out = out + getattr(module, f"{attr}_bias")[expert]
    return out


def experts_forward(module, desc: FusedExperts, on_linear: Callable, *args, **kwargs):
    """The fused experts layer's output [N, H], calling `on_linear` on each per-expert linear.

    on_linear(attr, expert, x [n, in], token_index [n] int64, z [n, out]) -> z: x is the linear's input for the n
    (token, slot) pairs routed to `expert`, token_index their rows in hidden_states, z the linear's output (bias
    included); the returned tensor replaces z (e.g. z made to require grad, with a hook attached).
    """
    import torch

    hidden_states, top_k_index, top_k_weights = _routing_args(args, kwargs)
    (up_attr, _, _), (down_attr, _, _) = desc.weights
    out = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index).tolist():
        if expert >= desc.num_experts:  # expert-parallel sentinels (routing weight 0): nothing to add
            continue
        token_index, slot = torch.where(top_k_index == expert)
        x = hidden_states[token_index]  # [n, H]
        z = _expert_linear(module, up_attr, expert, x, desc.is_transposed, desc.has_bias)
        z = on_linear(up_attr, expert, x, token_index, z)
        h = module._apply_gate(z) if module.has_gate else module.act_fn(z)  # [n, I]
        y = _expert_linear(module, down_attr, expert, h, desc.is_transposed, desc.has_bias)
        y = on_linear(down_attr, expert, h, token_index, y)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        y = y * top_k_weights[token_index, slot, None]
        out.index_add_(0, token_index, y.to(out.dtype))
    return out


def check_trackable(desc: FusedExperts) -> None:
    if not desc.supported:
        raise ConfigError(
            f"{desc.name} holds fused expert weights {[w[0] for w in desc.weights]} but not the transformers 5 "
            f"experts layout ({', '.join(_LAYOUT_ATTRS)}, num_experts, no expert parallelism): track_experts cannot "
            "compute its per-expert gradients; turn track_experts off (its experts then count as not covered)"
        )


def install_forward(module, forward) -> Callable[[], None]:
    """Make `module` run `forward` (accelerate's dispatch hooks kept); returns the function that undoes it."""
    own = module.__dict__
    if "forward" in own and "_old_forward" in own:  # accelerate: forward = hook wrapper around _old_forward
        previous = own["_old_forward"]
        module._old_forward = forward

        def undo():
            module._old_forward = previous
    elif "forward" in own:
        raise ConfigError(f"{type(module).__name__} has an instance-level forward (wrapped by another library): "
                          "its experts cannot be tracked; turn track_experts off")
    else:
        module.forward = forward

        def undo():
            del module.forward
    return undo

