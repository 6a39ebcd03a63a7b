"""Preconditioners H for query vectors: b = H^-1 g (DESIGN.md section 2).

Fitted in one streaming pass over training features (`update` per batch, then `finalize`), applied to a set of
query vectors in one call, saved as plain tensors (safetensors; no pickle).

* identity: b = g.
* diagonal: H = diag(E[u_i^2]) + lambda, lambda = damping * mean_i E[u_i^2] (relative mode).
* block: H = blockdiag_m(F_m + lambda_m I) with F_m = E[u_m u_m^T] the empirical Fisher of module m's feature
  block and lambda_m = damping * mean eigenvalue of F_m = damping * trace(F_m) / D_m (relative mode).

Block size: a module's feature is the k_out x k_in matrix P_out G P_in^T flattened, so its block is the FULL
D_m x D_m Fisher with D_m = k_out * k_in (256 x 256 at 16 x 16), not a k x k Kronecker factor. It captures every
correlation inside the module; memory is n_modules * D_m^2 float64 (0.5 MB per module at 16 x 16, 128 MB per module
at 64 x 64: keep k small or use `diagonal`). Inverses are computed in float64 by eigendecomposition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from drift_stream.errors import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("identity", "diagonal", "block")
_PREFIX = "preconditioner."


@dataclass(frozen=True)
class PreconditionerConfig:
    """kind: identity | diagonal | block. damping: a factor of the mean eigenvalue ("relative", default 0.1) or
    the value of lambda itself ("absolute")."""

    kind: str = "block"
    damping: float = 0.1
    damping_mode: str = "relative"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"preconditioner kind must be one of {KINDS}, got {self.kind!r}")
        if self.damping_mode not in ("relative", "absolute"):
            raise ConfigError(f"damping_mode must be 'relative' or 'absolute', got {self.damping_mode!r}")
        if not isinstance(self.damping, (int, float)) or isinstance(self.damping, bool) or not self.damping >= 0:
            raise ConfigError(f"damping must be a number >= 0, got {self.damping!r}")
        object.__setattr__(self, "damping", float(self.damping))


def _encode(text: str):
    import torch

    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def _decode(tensor) -> str:
    return bytes(tensor.tolist()).decode("ascii")


class Preconditioner:
    """Streaming fit (`update`, `finalize`), `apply`, and `state_dict` / `from_state_dict` round trip."""

    def __init__(self, config: PreconditionerConfig, block_sizes: Sequence[int]):
        import torch

        sizes = [int(s) for s in block_sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ConfigError(f"block_sizes must be positive ints (one per tracked module), got {list(block_sizes)!r}")
        self.config = config
        self.block_sizes = sizes
        self.dim = sum(sizes)
        self.count = 0
        self.skipped = 0
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._sq_sum = torch.zeros(self.dim, dtype=torch.float64) if config.kind == "diagonal" else None
        self._fisher_sum = (
            [torch.zeros(s, s, dtype=torch.float64) for s in sizes] if config.kind == "block" else None
        )
        self._inverse = None  # diagonal: [D] of 1 / (s + lambda); block: list of [D_m, D_m]
        self.lambdas = None  # [n_blocks] (block) or [1] (diagonal), float64, set by finalize

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def finalized(self) -> bool:
        return self.kind == "identity" or self._inverse is not None

    # ------------------------------------------------------------------ fitting
    def update(self, features, bad: Sequence[str | None] | None = None) -> None:
        """Accumulate training features [B, D]; rows with `bad[i]` set are skipped (and counted in `skipped`)."""
        import torch

        feats = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {tuple(feats.shape)}")
        if self._inverse is not None:
            raise RuntimeError("preconditioner is already finalized; build a new one to refit")
        if bad is not None:
            if len(bad) != feats.shape[0]:
                raise ValueError(f"bad has {len(bad)} entries for {feats.shape[0]} rows")
            keep = torch.tensor([b is None for b in bad], dtype=torch.bool)
            self.skipped += int((~keep).sum())
            feats = feats[keep]
        if not bool(torch.isfinite(feats).all()):
            raise ValueError("features contain NaN/inf in rows not flagged as bad: pass FeatureOutput.bad to skip them")
        self.count += feats.shape[0]
        if self.kind == "diagonal":
            self._sq_sum += (feats * feats).sum(dim=0)
        elif self.kind == "block":
            for i, (start, size) in enumerate(zip(self._starts, self.block_sizes)):
                part = feats[:, start : start + size]  # [B, D_m]
                self._fisher_sum[i] += part.T @ part

    def _damping(self, mean_eig: float) -> float:
        return self.config.damping * mean_eig if self.config.damping_mode == "relative" else self.config.damping

    def finalize(self) -> "Preconditioner":
        """Turn the accumulated second moments into the damped inverse. Returns self."""
        import torch

        if self.kind == "identity" or self._inverse is not None:
            return self
        if self.count == 0:
            raise ValueError("preconditioner saw no training rows: call update() with features before finalize()")
        if self.kind == "diagonal":
            second = self._sq_sum / self.count  # [D]
            lam = self._damping(float(second.mean()))
            if lam <= 0 and bool((second <= 0).any()):
                raise ValueError("diagonal preconditioner is singular: some coordinates are always 0 and damping is 0")
            self.lambdas = torch.tensor([lam], dtype=torch.float64)
            self._inverse = 1.0 / (second + lam)
            return self
        fishers = [f / self.count for f in self._fisher_sum]
        mean_eigs = [float(torch.trace(f)) / f.shape[0] for f in fishers]
        positive = [m for m in mean_eigs if m > 0]
        fallback = sum(positive) / len(positive) if positive else 0.0
        lambdas, inverses = [], []
        for i, (fisher, mean_eig) in enumerate(zip(fishers, mean_eigs)):
            if mean_eig <= 0 and self.config.damping_mode == "relative":
                logger.warning("block %d has an all-zero Fisher; damping it with the mean over blocks", i)
                mean_eig = fallback
            lam = self._damping(mean_eig)
            evals, evecs = torch.linalg.eigh(fisher)
            evals = evals.clamp(min=0.0) + lam
            if bool((evals <= 0).any()):
                raise ValueError(f"block {i} of the preconditioner is singular: all features are 0 and damping is 0")
            lambdas.append(lam)
            inverses.append((evecs / evals) @ evecs.T)
        self.lambdas = torch.tensor(lambdas, dtype=torch.float64)
        self._inverse = inverses
        return self

    # ------------------------------------------------------------------ use
    def apply(self, vectors):
        """H^-1 applied to each row of vectors [m, D] -> [m, D], in the input's dtype and device."""
        import torch

        vecs = torch.as_tensor(vectors)
        if vecs.dim() != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"vectors must be [m, {self.dim}], got {tuple(vecs.shape)}")
        if self.kind == "identity":
            return vecs.clone()
        if self._inverse is None:
            raise RuntimeError("call finalize() before apply()")
        work = vecs.detach().to("cpu", torch.float64)
        if self.kind == "diagonal":
            out = work * self._inverse
        else:
            out = torch.empty_like(work)
            for start, size, inv in zip(self._starts, self.block_sizes, self._inverse):
                out[:, start : start + size] = work[:, start : start + size] @ inv
        return out.to(vecs.device, vecs.dtype if vecs.is_floating_point() else torch.float32)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain tensors, keys prefixed `preconditioner.`; merge them into any safetensors file."""
        import torch

        state = {
            _PREFIX + "kind": _encode(self.kind),
            _PREFIX + "damping_mode": _encode(self.config.damping_mode),
            _PREFIX + "damping": torch.tensor([self.config.damping], dtype=torch.float64),
            _PREFIX + "block_sizes": torch.tensor(self.block_sizes, dtype=torch.int64),
            _PREFIX + "count": torch.tensor([self.count, self.skipped], dtype=torch.int64),
            _PREFIX + "finalized": torch.tensor([int(self.finalized)], dtype=torch.int64),
        }
        if self.kind == "diagonal":
            state[_PREFIX + "sq_sum"] = self._sq_sum.clone()
        elif self.kind == "block":
            for i, f in enumerate(self._fisher_sum):
                state[f"{_PREFIX}fisher_sum.{i:05d}"] = f.clone()
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "Preconditioner":
        """Inverse of `state_dict` (extra keys are ignored); refinalizes if the saved one was finalized."""
        try:
            config = PreconditionerConfig(
                kind=_decode(state[_PREFIX + "kind"]),
                damping=float(state[_PREFIX + "damping"][0]),
                damping_mode=_decode(state[_PREFIX + "damping_mode"]),
            )
            pre = cls(config, state[_PREFIX + "block_sizes"].tolist())
            pre.count, pre.skipped = (int(x) for x in state[_PREFIX + "count"].tolist())
            if pre.kind == "diagonal":
                pre._sq_sum = state[_PREFIX + "sq_sum"].to("cpu").double().clone()
            elif pre.kind == "block":
                pre._fisher_sum = [
                    state[f"{_PREFIX}fisher_sum.{i:05d}"].to("cpu").double().clone()
                    for i in range(len(pre.block_sizes))
                ]
            finalized = bool(state[_PREFIX + "finalized"][0])
        except KeyError as exc:
            raise ValueError(f"not a preconditioner state dict: missing key {exc}") from None
        return pre.finalize() if finalized else pre

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path) -> "Preconditioner":
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path)))
