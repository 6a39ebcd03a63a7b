"""drift-stream: refine SFT data by on-policy data attribution (DRIFT)."""

from __future__ import annotations

from drift_stream.version import __version__

__all__ = ["__version__", "DriftScorer", "ValidationBank"]


def __getattr__(name: str):
    # Lazy so that `import drift_stream` (and the CLI's --help) does not import torch.
    if name == "DriftScorer":
        from drift_stream.scoring.drift import DriftScorer

        return DriftScorer
    if name == "ValidationBank":
        from drift_stream.bank.store import ValidationBank

        return ValidationBank
    raise AttributeError(f"module 'drift_stream' has no attribute {name!r}")
