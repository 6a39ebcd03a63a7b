"""What manifests record besides counts: mergeable per-file score summaries (ScoreSummary, merged by
merge_score_summaries), the provenance header of every output manifest (kind, version, git sha, time) and the dotted
diff of two configs (a refused rerun prints it).
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from drift_stream.version import __version__

ORDER_STATS_POINTS = 4096  # per-marker score sketch; exact quantiles while every input file has <= this many rows
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


class ScoreSummary:
    """Mergeable summary of one input file's scores: count, mean, M2, min, max and a sorted order-statistics sketch."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.nonfinite = 0

    def add(self, scores: np.ndarray) -> None:  # scores: [n] float
        scores = np.asarray(scores, dtype=np.float64)
        finite = np.isfinite(scores)
        self.nonfinite += int((~finite).sum())
        if finite.any():
            self._parts.append(scores[finite].astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        values = np.sort(np.concatenate(self._parts).astype(np.float64)) if self._parts else np.zeros(0)
        n = int(values.size)
        if n == 0:
            return {"count": 0, "mean": None, "m2": None, "min": None, "max": None, "nonfinite": self.nonfinite, "order_stats": []}
        mean = float(values.mean())
        if n <= ORDER_STATS_POINTS:
            sketch = values
        else:
            ranks = np.round(np.linspace(0, n - 1, ORDER_STATS_POINTS)).astype(np.int64)
            sketch = values[ranks]
        return {
            "count": n,
            "mean": mean,
            "m2": float(((values - mean) ** 2).sum()),
            "min": float(values[0]),
            "max": float(values[-1]),
            "nonfinite": self.nonfinite,
            "order_stats": [float(v) for v in sketch],
        }


def merge_score_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Score statistics of the whole run from per-file summaries (Chan et al. merge of mean / M2)."""
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi, nonfinite, exact = math.inf, -math.inf, 0, True
    points, weights = [], []
    for part in parts:
        nonfinite += part.get("nonfinite", 0)
        n = part["count"]
        if n == 0:
            continue
        delta = part["mean"] - mean
        total = count + n
        mean += delta * n / total
        m2 += part["m2"] + delta * delta * count * n / total
        count = total
        lo, hi = min(lo, part["min"]), max(hi, part["max"])
        sketch = np.asarray(part["order_stats"], dtype=np.float64)
        exact = exact and sketch.size == n
        points.append(sketch)
        weights.append(np.full(sketch.size, n / sketch.size))
    if count == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "nonfinite": nonfinite,
                "quantiles": {}, "quantiles_exact": True}
    values = np.concatenate(points)
    if exact:
        quantiles = np.quantile(values, QUANTILES)
    else:
        order = np.argsort(values, kind="stable")
        values, cum = values[order], np.cumsum(np.concatenate(weights)[order])
        quantiles = [values[min(np.searchsorted(cum, q * cum[-1]), values.size - 1)] for q in QUANTILES]
    return {
        "count": count,
        "mean": mean,
        "std": math.sqrt(m2 / count),
        "min": lo,
        "max": hi,
        "nonfinite": nonfinite,
        "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, quantiles)},
        "quantiles_exact": bool(exact),
    }


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The git commit of the drift_stream source tree, or None when it is not a git checkout (one `git` call per
    process)."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def provenance(kind: str) -> dict[str, Any]:
    """The header every output manifest starts with: what kind of output, which package version and commit, when."""
    return {"kind": kind, "version": __version__, "git_sha": git_sha(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Lines `key: old -> new` for every dotted key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = lambda v: "<absent>" if v is missing else json.dumps(v, sort_keys=True)  # noqa: E731
            lines.append(f"  {key}: {show(x)} -> {show(y)}")
    return lines
