"""Fixed random projections for gradient features, identical on every process and device.

Each tracked module m (weight out x in) gets P_in [k_in, in] and P_out [k_out, out]. They are drawn on the CPU by a
`torch.Generator` seeded from a SHA-256 of (seed, module name, side) -- never Python's salted `hash()` -- and only
then moved to the model's device, so CPU and CUDA runs build the same matrices bit for bit.

Scaling: entries have variance 1/k, so E[P^T P] = I and <P x, P y> = <x, y> in expectation. For the Kronecker
feature P_out G P_in^T with independent P_in and P_out, E<P_out G P_in^T, P_out H P_in^T>_F = <G, H>_F.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from drift_stream.errors import ConfigError

PROJECTIONS = ("rademacher", "gaussian")
# Bumped whenever the way matrices are drawn changes: it goes into the projector spec (bank fingerprints).
PROJECTION_ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class FeatureConfig:
    """What to track and how to project it.

    module_patterns: `fnmatch` globs matched against full module names (for a PEFT LoRA model, against the name of
      the wrapped layer, e.g. `...self_attn.q_proj`). Empty (default): every `nn.Linear` / HF `Conv1D` inside the
      model's stack of decoder blocks (attention and MLP projections), never `lm_head` or embeddings.
    last_n_blocks: keep only modules in the last N decoder blocks; the backward then stops at the first tracked
      module, skipping the earlier blocks entirely.
    autocast_dtype: None (run in the model's dtype), "bfloat16" or "float16": forward under autocast; projections
      and sums over tokens are always accumulated in float32 (float64 for a float64 model).
    track_experts: also track the fused 3-D expert weights of transformers 5 MoE layers (Qwen3-MoE, Mixtral,
      GPT-OSS): each expert's up and down weight is one more k_out x k_in block (drift_stream.grads.experts). Off,
      those weights are skipped (most of an MoE model's parameters: see GradientFeaturizer.coverage()).
    """

    proj_dim_in: int = 16
    proj_dim_out: int = 16
    projection: str = "rademacher"
    seed: int = 0
    module_patterns: tuple[str, ...] = field(default_factory=tuple)
    last_n_blocks: int | None = None
    autocast_dtype: str | None = None
    track_experts: bool = False

    def __post_init__(self):
        for name in ("proj_dim_in", "proj_dim_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"FeatureConfig.{name} must be a positive int, got {value!r}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"FeatureConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"FeatureConfig.seed must be an int, got {self.seed!r}")
        if isinstance(self.module_patterns, str):
            raise ConfigError(
                f"FeatureConfig.module_patterns must be a sequence of glob patterns, got the string "
                f"{self.module_patterns!r}: wrap it in a list"
            )
        patterns = tuple(self.module_patterns)
        if not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"FeatureConfig.module_patterns must be non-empty strings, got {patterns!r}")
        object.__setattr__(self, "module_patterns", patterns)
        if self.last_n_blocks is not None and (
            not isinstance(self.last_n_blocks, int) or isinstance(self.last_n_blocks, bool) or self.last_n_blocks < 1
        ):
            raise ConfigError(f"FeatureConfig.last_n_blocks must be None or a positive int, got {self.last_n_blocks!r}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(
                f"FeatureConfig.autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}"
            )
        if not isinstance(self.track_experts, bool):
            raise ConfigError(f"FeatureConfig.track_experts must be a bool, got {self.track_experts!r}")

    def to_dict(self) -> dict:
        out = {
            "proj_dim_in": self.proj_dim_in,
            "proj_dim_out": self.proj_dim_out,
            "projection": self.projection,
            "seed": self.seed,
            "module_patterns": list(self.module_patterns),
            "last_n_blocks": self.last_n_blocks,
            "autocast_dtype": self.autocast_dtype,
        }
        if self.track_experts:  # only when on: the spec (and so every bank's projector fingerprint) stays as it was
            out["track_experts"] = True
        return out


def stable_seed(seed: int, name: str, side: str) -> int:
    """A 63-bit generator seed from (seed, module name, side); the same in every process and Python version."""
    digest = hashlib.sha256(f"drift-stream/v{PROJECTION_ALGORITHM_VERSION}\0{seed}\0{name}\0{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_projection(rows: int, cols: int, kind: str, seed: int):
    """A [rows, cols] float32 CPU matrix with i.i.d. entries of variance 1/rows (so E[P^T P] = I)."""
    import torch

    if kind not in PROJECTIONS:
        raise ConfigError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    scale = 1.0 / math.sqrt(rows)
    if kind == "rademacher":
        # Rademacher: +-1/sqrt(k); same JL guarantee as Gaussian, and exact in every float dtype when k is 4^n.
        signs = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int64, device="cpu")
        return (signs.to(torch.float32) * 2.0 - 1.0) * scale
    return torch.randn((rows, cols), generator=gen, dtype=torch.float32, device="cpu") * scale


class GradientProjector:
    """Builds (and caches) P_in [k_in, in] and P_out [k_out, out] for named modules, on the CPU in float32."""

    def __init__(self, config: FeatureConfig | None = None):
        self.config = config or FeatureConfig()
        self._cache: dict[tuple[str, int, int], tuple] = {}

    def matrices(self, name: str, in_features: int, out_features: int):
        """(P_in [k_in, in_features], P_out [k_out, out_features]), float32 on the CPU."""
        key = (name, int(in_features), int(out_features))
        if key not in self._cache:
            cfg = self.config
            p_in = random_projection(cfg.proj_dim_in, in_features, cfg.projection, stable_seed(cfg.seed, name, "in"))
            p_out = random_projection(
                cfg.proj_dim_out, out_features, cfg.projection, stable_seed(cfg.seed, name, "out")
            )
            self._cache[key] = (p_in, p_out)
        return self._cache[key]

    def spec(self) -> dict:
        """JSON-able description; two projectors with equal specs build identical matrices."""
        cfg = self.config
        return {
            "algorithm_version": PROJECTION_ALGORITHM_VERSION,
            "projection": cfg.projection,
            "seed": cfg.seed,
            "proj_dim_in": cfg.proj_dim_in,
            "proj_dim_out": cfg.proj_dim_out,
            "seed_hash": "sha256",
        }

    def checksum(self, shapes: list[tuple[str, int, int]]) -> str:
        """SHA-256 over the bytes of every matrix for these (name, in, out) modules: pins the actual numbers."""
        h = hashlib.sha256()
        for name, fan_in, fan_out in shapes:
            p_in, p_out = self.matrices(name, fan_in, fan_out)
            h.update(name.encode())
            h.update(p_in.contiguous().numpy().tobytes())
            h.update(p_out.contiguous().numpy().tobytes())
        return h.hexdigest()
