"""Projected per-example gradients from forward/backward hooks (the LoGra / Kronecker trick).

For a tracked module m with inputs a_t and output gradients d_t, the per-example gradient of that example's loss is
G_m = sum_t d_t a_t^T. We only ever form P_out G_m P_in^T = sum_t (P_out d_t)(P_in a_t)^T, a [k_out, k_in] matrix
per example: the forward hook keeps P_in a_t, a tensor hook on the module output receives d_t during ONE backward of
the sum of per-example losses. Examples never interact (no weight gradient is ever formed), so each row of the batch
gets its own feature.

Why it is cheap: every parameter is frozen while we run, and the autograd graph starts at the outputs of the earliest
tracked modules (we make those outputs require grad). The backward therefore computes input gradients only, never
the weight-gradient matmuls of a plain backward, and never reaches the blocks before the first tracked module
(`last_n_blocks`). Parameter `.grad` is never touched.

Positions are `cumsum(attention_mask) - 1`, so left and right padding give the same features.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Iterator

from drift_stream.errors import ConfigError
from drift_stream.grads.coverage import parameter_coverage
from drift_stream.grads.experts import (
    FusedExperts,
    check_trackable,
    describe_fused_experts,
    experts_forward,
    install_forward,
)
from drift_stream.grads.projection import FeatureConfig, GradientProjector
from drift_stream.model.losses import (
    eval_mode,
    example_losses,
    input_device,
    prepare_batch,
    resolve_head,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_LORA_NAME = re.compile(r"^(?P<host>.+)\.(?P<side>lora_A|lora_B)\.[^.]+$")


@dataclass(frozen=True)
class TrackedModule:
    name: str  # full name in model.named_modules()
    host: str  # name matched by patterns: the LoRA-wrapped layer for adapters, else `name`
    kind: str  # "linear" | "conv1d" | "lora_A" | "lora_B" | "expert"
    in_features: int
    out_features: int
    block: int | None  # index in the decoder block list, None outside it
    param: str | None = None  # kind "expert": the fused weight (gate_up_proj, up_proj or down_proj) of module `host`
    expert: int | None = None  # kind "expert": the expert's index in that weight


@dataclass
class FeatureOutput:
    """One featurized batch. Tensors are on the CPU.

    features [B, D] float32 (float64 when the model is float64); rows flagged in `bad` are all zero.
    grad_norm [B] = ||features||; loss [B] mean NLL over masked tokens (same dtype); num_tokens [B] int64;
    bad[i] is None or a reason: "no_loss_tokens", "nonfinite_loss", "nonfinite_features".
    """

    features: torch.Tensor
    grad_norm: torch.Tensor
    loss: torch.Tensor
    num_tokens: torch.Tensor
    bad: list


def _module_kind_and_shape(module) -> tuple[str, int, int] | None:
    """('linear'|'conv1d', in, out) for a Linear or HF Conv1D (whose weight is [in, out]); else None."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear", module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        fan_in, fan_out = module.weight.shape
        return "conv1d", int(fan_in), int(fan_out)
    return None


def _block_list(model, linear_names: list[str]) -> tuple[str, int] | None:
    """(name, length) of the ModuleList holding the most linears: the decoder blocks."""
    import torch

    best = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        prefix = name + "." if name else ""
        count = sum(1 for n in linear_names if n.startswith(prefix))
        if count and (best is None or count > best[2]):
            best = (name, len(module), count)
    return None if best is None else (best[0], best[1])


def find_tracked_modules(model, config: FeatureConfig) -> list[TrackedModule]:
    """The modules whose projected gradients make up the feature, in `named_modules()` order.

    With `config.track_experts`, each fused experts module adds one entry per (weight, expert), named
    `<module>.<weight>.<expert>` (e.g. `model.layers.0.mlp.experts.gate_up_proj.3`), up weight before down weight,
    experts in order; module_patterns match the module, `<module>.<weight>` or the entry name.
    """
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        emb = fn() if callable(fn) else None
        if emb is not None:
            excluded.add(id(emb))
    named = list(model.named_modules())
    lora_mode = any(_LORA_NAME.match(n) for n, _ in named)
    candidates = []  # (TrackedModule without block, names patterns may match)
    fused = []
    for name, module in named:
        experts = None if lora_mode else describe_fused_experts(name, module)
        if experts is not None:
            fused.append(experts)
            if config.track_experts:
                check_trackable(experts)
                for attr, fan_in, fan_out in experts.weights:
                    for e in range(experts.num_experts):
                        entry = f"{name}.{attr}.{e}"
                        candidates.append((TrackedModule(entry, name, "expert", fan_in, fan_out, None, attr, e),
                                           (name, f"{name}.{attr}", entry)))
            continue
        ks = _module_kind_and_shape(module)
        if ks is None or id(module) in excluded:
            continue
        kind, fan_in, fan_out = ks
        host = name
        if lora_mode:
            match = _LORA_NAME.match(name)
            if match is None:
                continue  # frozen base layers of a LoRA model: the adapters are what is trained
            host, kind = match.group("host"), match.group("side")
        candidates.append((TrackedModule(name, host, kind, fan_in, fan_out, None), (host, name)))
    if config.track_experts and not fused:
        logger.warning("track_experts is on but %s has no fused experts: nothing more is tracked", type(model).__name__)
    blocks = _block_list(model, [c.name for c, _ in candidates if c.kind != "expert"])
    tracked = []
    for cand, match_names in candidates:
        block = None
        if blocks is not None:
            pattern = re.escape(blocks[0]) + r"\.(\d+)\." if blocks[0] else r"(\d+)\."
            m = re.match(pattern, cand.name)
            block = int(m.group(1)) if m else None
        if config.module_patterns:
            if not any(fnmatch.fnmatchcase(n, p) for p in config.module_patterns for n in match_names):
                continue
        elif block is None:
            continue
        if config.last_n_blocks is not None:
            if blocks is None:
                raise ConfigError("last_n_blocks needs a model with a list of decoder blocks; none was found")
            if block is None or block < blocks[1] - config.last_n_blocks:
                continue
        tracked.append(replace(cand, block=block))
    if not tracked:
        raise ConfigError(
            f"no module to track in {type(model).__name__} with module_patterns={list(config.module_patterns)} "
            f"and last_n_blocks={config.last_n_blocks}: check the names in model.named_modules()"
        )
    return tracked


_eval_mode = eval_mode  # one definition, in drift_stream.model.losses


class _Capture:
    """Per-batch state shared by the hooks."""

    def __init__(self, valid, compute_dtype, device_type: str, autocast: bool):
        # [B, T, 1] bool: padding positions (attention_mask == 0); None when there is no padding
        self.pad = None if bool(valid.all()) else (~valid).unsqueeze(-1)
        self.batch_size, self.seq_len = valid.shape
        self._pad_on = {} if self.pad is None else {self.pad.device: self.pad}
        self.compute_dtype = compute_dtype
        self.device_type = device_type
        self.autocast = autocast  # entering autocast(enabled=False) costs ~10 us: only when autocast may be on
        self.sums: dict[str, object] = {}  # name -> [B, k_out, k_in]
        self.leaves: list = []  # module outputs we made require grad: where the autograd graph starts

    def pad_on(self, device):
        """The padding mask on `device` (a model split over several devices has tracked modules on each)."""
        if device not in self._pad_on:
            self._pad_on[device] = self.pad.to(device)
        return self._pad_on[device]

    def no_autocast(self):
        import torch

        if self.autocast:
            return torch.autocast(self.device_type, enabled=False)
        return contextlib.nullcontext()


class GradientFeaturizer:
    """Turns a collated batch into projected per-example gradients: `featurize(batch) -> FeatureOutput`."""

    def __init__(self, model, config: FeatureConfig | None = None):
        import torch

        self.model = model
        self.config = config or FeatureConfig()
        self.projector = GradientProjector(self.config)
        self.modules = find_tracked_modules(model, self.config)
        param = next(model.parameters())
        self.device = input_device(model)
        self.compute_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        by_name = dict(model.named_modules())
        self._module_objs = [by_name[t.host if t.kind == "expert" else t.name] for t in self.modules]
        # Transposed, on the model's device, in the accumulation dtype: P_in^T [in, k_in], P_out^T [out, k_out].
        self._proj_t = {}
        for t, module in zip(self.modules, self._module_objs):
            p_in, p_out = self.projector.matrices(t.name, t.in_features, t.out_features)
            # the weight's own device: models may be split over devices
            device = (getattr(module, t.param) if t.kind == "expert" else module.weight).device
            self._proj_t[t.name] = (
                p_in.to(self.compute_dtype).t().contiguous().to(device),
                p_out.to(self.compute_dtype).t().contiguous().to(device),
            )
        # Fused experts modules with a tracked entry: their forward is replaced while tracking (grads/experts.py).
        expert_hosts = list(dict.fromkeys(t.host for t in self.modules if t.kind == "expert"))
        self._experts = [(describe_fused_experts(h, by_name[h]), by_name[h]) for h in expert_hosts]
        covered: dict[int, int] = {}  # id(parameter) -> elements the features see
        for t, module in zip(self.modules, self._module_objs):
            if t.kind == "expert":  # one expert's [out, in] slice of the fused weight
                key = id(getattr(module, t.param))
                covered[key] = covered.get(key, 0) + t.in_features * t.out_features
            else:
                covered[id(module.weight)] = module.weight.numel()
        self._coverage = parameter_coverage(model, covered)  # taken now, while the caller's requires_grad flags hold
        self.block_sizes = [self.config.proj_dim_out * self.config.proj_dim_in] * len(self.modules)
        self.dim = sum(self.block_sizes)
        resolve_head(model)  # probe (and cache) the loss-only head now, before any hook is registered
        logger.debug("tracking %d modules, feature dim %d, %.1f%% of the parameters", len(self.modules), self.dim,
                     100 * self._coverage["share"])

    # ------------------------------------------------------------------ description
    def projection_matrices(self, name: str):
        """(P_in [k_in, in], P_out [k_out, out]) of a tracked module, float32 on the CPU."""
        t = next((t for t in self.modules if t.name == name), None)
        if t is None:
            raise KeyError(f"{name!r} is not a tracked module")
        return self.projector.matrices(t.name, t.in_features, t.out_features)

    def coverage(self) -> dict:
        """The share of the model's parameters whose gradients the features see, and the large ones they skip.

        See drift_stream.grads.coverage.parameter_coverage (and coverage_warning for the one-line warning). Not part
        of spec(): a fingerprint does not change with it, a manifest records it beside the spec.
        """
        import copy

        return copy.deepcopy(self._coverage)

    def spec(self) -> dict:
        """JSON-able fingerprint: projector, tracked modules and shapes, feature layout and dim."""
        shapes = [(t.name, t.in_features, t.out_features) for t in self.modules]
        return {
            "projector": self.projector.spec(),
            "projection_checksum": self.projector.checksum(shapes),
            "config": self.config.to_dict(),
            "modules": [
                {"name": t.name, "kind": t.kind, "in_features": t.in_features, "out_features": t.out_features}
                for t in self.modules
            ],
            "block_sizes": list(self.block_sizes),
            "layout": "modules in order, each k_out x k_in row-major",
            "loss": "mean NLL over loss-masked tokens",
            "positions": "cumsum(attention_mask) - 1",
            "dim": self.dim,
        }

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, state: _Capture, name: str, module, args, output):
        a = args[0].detach()  # [B, T, in]; detached: the projection must not join the autograd graph
        p_in_t, _ = self._proj_t[name]
        with state.no_autocast():
            pa = a.to(state.compute_dtype).matmul(p_in_t)  # [B, T, k_in]
        if state.pad is not None:  # padding contributes nothing, NaN or not
            pa.masked_fill_(state.pad_on(pa.device), 0.0)
        out = output
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
            state.leaves.append(out)
        out.register_hook(partial(self._grad_hook, state, name, pa))
        return out if out is not output else None

    def _grad_hook(self, state: _Capture, name: str, pa, grad):
        _, p_out_t = self._proj_t[name]
        with state.no_autocast():
            pd = grad.detach().to(state.compute_dtype).matmul(p_out_t)  # [B, T, k_out]
            if state.pad is not None:
                pd.masked_fill_(state.pad_on(pd.device), 0.0)
            contrib = pd.transpose(1, 2).bmm(pa)  # [B, k_out, k_in], summed over tokens
        prev = state.sums.get(name)
        state.sums[name] = contrib if prev is None else prev.add_(contrib)  # stays on the module's device

    def _experts_forward(self, state: _Capture, desc: FusedExperts, module, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if hidden_states.shape[0] != state.batch_size * state.seq_len:
            raise RuntimeError(
                f"{desc.name} got {hidden_states.shape[0]} token rows for a [{state.batch_size}, {state.seq_len}] "
                "batch: per-example expert gradients need the [B * T, H] layout of the transformers 5 MoE blocks"
            )
        return experts_forward(module, desc, partial(self._expert_linear_hook, state, desc.name), *args, **kwargs)

    def _expert_linear_hook(self, state: _Capture, host: str, attr: str, expert: int, x, token_index, z):
        """Expert `expert`'s linear `attr` saw x [n, in] for rows token_index [n] of the flat batch: hook its output."""
        name = f"{host}.{attr}.{expert}"
        if name not in self._proj_t:  # an entry left out by module_patterns
            return z
        p_in_t, _ = self._proj_t[name]
        rows = token_index.div(state.seq_len, rounding_mode="floor")  # [n]: the example each token belongs to
        with state.no_autocast():
            pa = x.detach().to(state.compute_dtype).matmul(p_in_t)  # [n, k_in]
        pad = None
        if state.pad is not None:
            pad = state.pad_on(pa.device).reshape(-1, 1)[token_index]  # [n, 1]
            pa.masked_fill_(pad, 0.0)
        if not z.requires_grad:  # nothing upstream is tracked: the autograd graph starts here
            z = z.detach().requires_grad_(True)
            state.leaves.append(z)
        z.register_hook(partial(self._expert_grad_hook, state, name, pa, rows, pad))
        return z

    def _expert_grad_hook(self, state: _Capture, name: str, pa, rows, pad, grad):
        _, p_out_t = self._proj_t[name]
        with state.no_autocast():
            pd = grad.detach().to(state.compute_dtype).matmul(p_out_t)  # [n, k_out]
            if pad is not None:
                pd.masked_fill_(pad, 0.0)
            # sum over each example's tokens routed here (routing weight already in grad): [B, k_out, k_in]
            contrib = pd.new_zeros(state.batch_size, pd.shape[1], pa.shape[1])
            contrib.index_add_(0, rows, pd.unsqueeze(2) * pa.unsqueeze(1))
        prev = state.sums.get(name)
        state.sums[name] = contrib if prev is None else prev.add_(contrib)

    @contextlib.contextmanager
    def tracking(self, valid) -> Iterator[_Capture]:
        """Freeze parameters, switch to eval mode and hook the tracked modules; always undone on exit.

        valid [B, T] bool: positions holding real tokens.
        """
        import torch

        model = self.model
        flags = [(p, p.requires_grad) for p in model.parameters()]
        autocast = self.config.autocast_dtype is not None or torch.is_autocast_enabled(self.device.type)
        state = _Capture(valid, self.compute_dtype, self.device.type, autocast)
        handles, undo = [], []
        stack = contextlib.ExitStack()
        try:
            for p, flag in flags:
                if flag:
                    p.requires_grad_(False)
            stack.enter_context(_eval_mode(model))
            for t, module in zip(self.modules, self._module_objs):
                if t.kind != "expert":
                    handles.append(module.register_forward_hook(partial(self._forward_hook, state, t.name)))
            for desc, module in self._experts:
                undo.append(install_forward(module, partial(self._experts_forward, state, desc, module)))
            yield state
        finally:
            for h in handles:
                h.remove()
            for restore in undo:
                restore()
            for p, flag in flags:
                if flag:
                    p.requires_grad_(True)
            stack.close()

    # ------------------------------------------------------------------ batches
    def _prepare(self, batch: dict):
        return prepare_batch(batch, self.device)

    def _per_example_loss(self, ids, attn, lmask, positions):
        """Forward pass; (loss [B] in the accumulation dtype, NaN where no tokens; num_tokens [B] int64).

        The one per-example loss (drift_stream.model.losses): LM head only at loss positions, in chunks.
        """
        out = example_losses(self.model, None, prepared=(ids, attn, lmask, positions),
                             autocast_dtype=self.config.autocast_dtype)
        return out.loss.to(self.device), out.num_tokens.to(self.device)

    def loss_only(self, batch: dict):
        """Per-example mean NLL without a backward: (loss [B], num_tokens [B] int64), on the CPU.

        loss is float32 (float64 for a float64 model).
        """
        import torch

        ids, attn, lmask, positions = self._prepare(batch)
        with torch.no_grad(), _eval_mode(self.model):
            loss, num_tokens = self._per_example_loss(ids, attn, lmask, positions)
        return loss.cpu(), num_tokens.cpu()

    def featurize(self, batch: dict) -> FeatureOutput:
        """batch: input_ids / attention_mask / loss_mask [B, T] (see formats.collate) -> FeatureOutput."""
        import torch

        ids, attn, lmask, positions = self._prepare(batch)
        batch_size = ids.shape[0]
        with torch.inference_mode(False), torch.enable_grad(), self.tracking(attn.bool()) as state:
            loss, num_tokens = self._per_example_loss(ids, attn, lmask, positions)
            usable = torch.isfinite(loss) & (num_tokens > 0)
            total = torch.where(usable, loss, 0.0).sum()
            if not state.leaves:
                raise RuntimeError("no tracked module ran in the forward pass: is the model called another way?")
            if total.requires_grad:
                torch.autograd.grad(total, state.leaves, allow_unused=True)
            features = self._collect(state, batch_size)
        return self._output(features, loss.detach(), num_tokens)

    def _collect(self, state: _Capture, batch_size: int):
        """The features [B, D] the hooks summed during the last backward (state.sums)."""
        import torch

        parts = []
        for t in self.modules:
            s = state.sums.get(t.name)
            if s is None:  # module not on the loss path: zero gradient
                s = torch.zeros(batch_size, self.config.proj_dim_out, self.config.proj_dim_in,
                                dtype=self.compute_dtype, device=self.device)
            parts.append(s.reshape(batch_size, -1).to(self.device))
        return torch.cat(parts, dim=1)  # [B, D]

    def _output(self, features, loss, num_tokens) -> FeatureOutput:
        """FeatureOutput of features [B, D], loss [B] and num_tokens [B]: unusable rows flagged and zeroed."""
        import torch

        batch_size = features.shape[0]
        bad = [None] * batch_size
        rows_finite = torch.isfinite(features).all(dim=1).cpu().tolist()
        loss_finite = torch.isfinite(loss).cpu().tolist()
        counts = num_tokens.cpu().tolist()
        for i in range(batch_size):
            if counts[i] == 0:
                bad[i] = "no_loss_tokens"
            elif not loss_finite[i]:
                bad[i] = "nonfinite_loss"
            elif not rows_finite[i]:
                bad[i] = "nonfinite_features"
        bad_rows = torch.tensor([b is not None for b in bad], device=features.device)
        features = features.masked_fill(bad_rows.unsqueeze(1), 0.0)
        if bad_rows.any():
            logger.debug("featurize: %d of %d rows flagged: %s", int(bad_rows.sum()), batch_size, bad)
        return FeatureOutput(
            features=features.cpu(),
            grad_norm=torch.linalg.vector_norm(features, dim=1).cpu(),
            loss=loss.cpu(),
            num_tokens=num_tokens.cpu(),
            bad=bad,
        )
