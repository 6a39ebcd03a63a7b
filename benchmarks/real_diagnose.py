"""Issue 25, item 3: which DRIFT options carry signal on the warmed SmolLM2-135M-Instruct, read from benchmark v4's
cached features (no training, minutes on a CPU).

    python benchmarks/real_diagnose.py --workdir /tmp/refine_real_cache    # after refine_real.py built its cache

For every combination of rollout temperature (1.0 / 0.7), signing (sign / advantage / positive), preconditioner
(identity / diagonal / block Fisher), query weighting (uniform / learnability p(1-p)), rollouts per query (K = 2 / 4:
the first K of each query's cached rollouts) and queries with no contrast (keep / drop), it prints the ROC-AUC of
the score, clean vs corrupted pool rows (all rows and target-task rows), and its Spearman correlation with the row's
gradient norm (a score that only tracks the norm ranks long or badly fitted rows first). A diagnostic over labelled
corruption, not the benchmark: the dev split's accuracy after continued SFT chooses DRIFT's setting
(benchmarks/refine_real.py). Layers and projection size need new features and are not varied here (the cache holds
the last 4 of 30 blocks at 16 x 16 per module); the Q4-dequantized weights cannot be compared with full-precision
ones without a hub. Writes diagnostics.{json,md} into --out (default benchmarks/results/real/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import refine_lib as rl
import refine_real as rr

GRID = {
    "temperature": (1.0, 0.7),
    "signing": ("sign", "advantage", "positive"),
    "preconditioner": ("identity", "diagonal", "block"),
    "query_weighting": ("uniform", "learnability"),
    "num_rollouts": (2, 4),
    "no_contrast": ("keep", "drop"),
}
DEFAULT = {"temperature": 1.0, "signing": "sign", "preconditioner": "block", "query_weighting": "uniform",
           "num_rollouts": 4, "no_contrast": "keep"}  # benchmark v4's `drift` (the library's defaults, block Fisher)


def score(ctx, setting: dict) -> np.ndarray | None:
    """S [n] of one setting from the cached features; None when no query keeps a signal."""
    from drift_stream.bank.contrast import query_weights

    f, rows = ctx["feats"], ctx["rollouts"][setting["temperature"]]
    variant = replace(rl.DriftVariant(), **{k: v for k, v in setting.items() if k != "temperature"})
    g, _, pass_rate = rl.query_targets(
        variant, f[f"roll_T{setting['temperature']}"], np.array([r["query"] for r in rows]),
        np.array([r["index"] for r in rows]), np.array([r["reward"] for r in rows], dtype=np.float64),
        f["ref_prose"])
    if len(g) == 0:
        return None
    weights = None if variant.query_weighting == "uniform" else query_weights(pass_rate, variant.query_weighting)
    if weights is not None and not weights.sum() > 0:
        return None
    pre = rl.fit_preconditioner(variant.preconditioner, f["pool"][: ctx["cfg"].fisher_rows],
                                [int(b) for b in f["block_sizes"]], variant.damping)
    return rl.drift_scores(variant, f["pool"], f["pool_norm"], g, pre, weights=weights)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/refine_real_cache"))
    parser.add_argument("--out", type=Path, default=rr.REPO / "benchmarks" / "results" / "real")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ctx = rr.build_cache(rr.CPU, args.workdir, rr.Timer())
    pool = ctx["splits"].pool
    clean = np.array([r["kind"] == "clean" for r in pool])
    target = np.array([r["task"] == "arith1" for r in pool])
    loss_auc = rl.roc_auc(-ctx["feats"]["pool_loss"].astype(np.float64), clean)
    rows = []
    for values in itertools.product(*GRID.values()):
        setting = dict(zip(GRID, values))
        s = score(ctx, setting)
        if s is None:
            continue
        rows.append({**setting, "auc": rl.roc_auc(s, clean), "auc_target_rows": rl.roc_auc(s[target], clean[target]),
                     "spearman_grad_norm": rl.spearman(s, ctx["feats"]["pool_norm"])})
    result = {"grid": {k: list(v) for k, v in GRID.items()}, "default": DEFAULT, "rows": rows,
              "loss_auc": loss_auc, "wall_s": time.perf_counter() - t0, "cache": str(ctx["cache"])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnostics.json").write_text(json.dumps(result, indent=1))
    (args.out / "diagnostics.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _find(rows, setting):
    return next((r for r in rows if all(r[k] == v for k, v in setting.items())), None)


def markdown(result: dict) -> str:
    rows, default = result["rows"], result["default"]
    base = _find(rows, default)
    lines = ["# DRIFT options on the warmed SmolLM2-135M-Instruct (benchmark v4's cache)", "",
             ("Command: `python benchmarks/real_diagnose.py --workdir /tmp/refine_real_cache` (the module docstring "
             f"says what it varies). {len(rows)} settings, {result['wall_s']:.0f} s. ROC-AUC clean vs corrupted pool "
             f"rows (600 rows, 40% corrupted); a plain per-example `loss` gives {result['loss_auc']:.3f}."), "",
             "## One option at a time, from benchmark v4's `drift` (T 1.0, sign, block Fisher, uniform, K 4, keep)",
             "", "| option | value | AUC | AUC target rows | Spearman(score, grad norm) |", "|---|---|---:|---:|---:|"]
    for key, values in result["grid"].items():
        for v in values:
            r = _find(rows, {**default, key: v})
            if r is None:
                lines.append(f"| {key} | {v} | - | - | - |")
                continue
            mark = " (default)" if v == default[key] else ""
            lines.append(f"| {key} | {v}{mark} | {r['auc']:.3f} | {r['auc_target_rows']:.3f} | "
                         f"{r['spearman_grad_norm']:+.3f} |")
    lines += ["", "## The ten best and the five worst settings by AUC", "",
              "| T | signing | preconditioner | weighting | K | no contrast | AUC | AUC target rows | Spearman norm |",
              "|---:|---|---|---|---:|---|---:|---:|---:|"]
    ranked = sorted(rows, key=lambda r: -r["auc"])
    for r in ranked[:10] + ranked[-5:]:
        lines.append(f"| {r['temperature']} | {r['signing']} | {r['preconditioner']} | {r['query_weighting']} | "
                     f"{r['num_rollouts']} | {r['no_contrast']} | {r['auc']:.3f} | {r['auc_target_rows']:.3f} | "
                     f"{r['spearman_grad_norm']:+.3f} |")
    if base is not None:
        better = [r for r in rows if r["auc"] > base["auc"] + 0.02]
        lines += ["", f"{len(better)} of {len(rows)} settings beat the default's AUC ({base['auc']:.3f}) by more "
                      f"than 0.02; the best reaches {ranked[0]['auc']:.3f}; none reaches `loss` "
                      f"({result['loss_auc']:.3f})." if ranked[0]["auc"] < result["loss_auc"] else
                  f"The best setting reaches {ranked[0]['auc']:.3f}, `loss` {result['loss_auc']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
