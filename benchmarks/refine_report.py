"""Outputs of the refinement benchmark: the markdown tables, the plot, package versions."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import numpy as np
import refine_lib as rl

logger = logging.getLogger("refine_eval")

def variants_markdown(rows: list[dict]) -> str:
    cols = ["auc", "auc_target_rows", "corrupted@0.1", "corrupted@0.25", "target_share@0.25", "mean_tokens@0.25",
            "spearman_grad_norm", "spearman_length"]
    lines = ["# DRIFT variants: what makes the signal useful (diagnostics on the benchmark pool, no SFT)", "",
             "One change at a time from the main setting. auc: clean rows score above corrupted ones; corrupted@P: "
             "share of corrupted rows in top:P (pool: 30%); target_share / mean_tokens: composition of top:P.", "",
             "| variant | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(
            f"{r[c]:.3f}" if isinstance(r.get(c), float) else "" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out_dir / "results.md").write_text(markdown(result))
    try:
        plot(result, out_dir / "results.png")
    except ImportError:  # matplotlib is optional
        logger.warning("matplotlib not installed: no plot")


def summary(result: dict) -> list[dict]:
    rows = []
    for name, info in result["methods"].items():
        # the main seeds only: rows of the extra seeds (statistics of the chosen setting) are in "statistics"
        runs = [r for r in result["rows"] if r["method"] == name and not r.get("extra_seed")]
        t_m, t_s = rl.mean_std([r["target_acc"] for r in runs])
        n_m, n_s = rl.mean_std([r["nontarget_acc"] for r in runs])
        dev = [rl.mean_std([r[k] for r in runs if k in r]) for k in ("dev_target_acc", "dev_nontarget_acc")]
        rows.append({"method": name, "group": info["group"], "selection": info["selection"], "seeds": len(runs),
                     "target": (t_m, t_s), "nontarget": (n_m, n_s), "dev_target": dev[0], "dev_nontarget": dev[1], "kept": runs[0]["rows_kept"] if runs else 0,
                     "corrupted": runs[0]["corrupted_share"] if runs else float("nan")})
    return rows


def verdict(result: dict) -> list[str]:
    """The issue's target, checked on test for the setting chosen on dev: the lines of the markdown section."""
    chosen = (result.get("choice") or {}).get("chosen")
    by = {r["method"]: r for r in summary(result)}
    if not chosen or chosen not in by or "full" not in by:
        return []
    seeds = sorted({r["seed"] for r in result["rows"] if not r.get("extra_seed")})
    acc = {(r["method"], r["seed"]): r for r in result["rows"]}
    baselines = [m for m, r in by.items() if r["group"] == "baseline"]
    best = max(baselines, key=lambda m: by[m]["target"][0])
    paired = [acc[chosen, s]["target_acc"] - acc[best, s]["target_acc"] for s in seeds if (best, s) in acc]
    p_m, p_s = rl.mean_std(paired)
    margin = by[chosen]["target"][0] - by[best]["target"][0]
    drop = by["full"]["nontarget"][0] - by[chosen]["nontarget"][0]
    ablations = {m: r["target"][0] for m, r in by.items() if r["group"] == "ablation"}
    ok = lambda c: "met" if c else "NOT met"  # noqa: E731
    lines = ["", f"## Against the issue's target (DRIFT setting chosen on dev: `{chosen}`)", "",
             f"- Target accuracy: {by[chosen]['target'][0]:.3f} against the best baseline `{best}` "
             f"{by[best]['target'][0]:.3f}: margin {100 * margin:+.1f} points (needed +2.0): {ok(margin >= 0.02)}. "
             f"Per seed, {', '.join(f'{100 * d:+.1f}' for d in paired)} (mean {100 * p_m:+.1f} ± {100 * p_s:.1f}; "
             f"standard error {100 * p_s / max(np.sqrt(len(paired)), 1):.1f}).",
             f"- Non-target accuracy: {by[chosen]['nontarget'][0]:.3f} against the full pool's "
             f"{by['full']['nontarget'][0]:.3f}: drop {100 * drop:+.1f} points (limit 2.0): {ok(drop <= 0.02)}."]
    if ablations:
        below = {m: v < by[chosen]["target"][0] for m, v in ablations.items()}
        lines.append("- Ablations below the chosen setting on target accuracy: " + ", ".join(
            f"{m} {v:.3f} ({'below' if below[m] else 'NOT below'})" for m, v in ablations.items())
            + f": {ok(all(below.values()))}.")
    styles = [m for m in by if m.split()[0] in ("less", "if") and by[m]["group"] == "baseline"]
    if styles:  # per reference style of the off-policy baselines
        lines.append("- Margin over each off-policy baseline (reference style in the name): " + "; ".join(
            f"{m} {by[m]['target'][0]:.3f} ({100 * (by[chosen]['target'][0] - by[m]['target'][0]):+.1f})"
            for m in styles) + ".")
    return lines


def statistics_markdown(result: dict) -> list[str]:
    """Paired per-seed differences of the chosen setting against its closest comparators, over all seeds."""
    st = result.get("statistics") or {}
    if not st.get("target"):
        return []
    lines = ["", f"Statistics over seeds {st['seeds']} (the chosen setting `{st['chosen']}` against its closest "
             "comparators; difference = chosen - comparator, paired by seed; SE = std(diff) / sqrt(seeds)):", "",
             "| comparator | metric | seeds | chosen mean ± std | comparator mean ± std | paired diff ± SE |",
             "|---|---|---:|---:|---:|---:|"]
    for key in ("target", "nontarget"):
        for r in st[key]:
            lines.append(f"| {r['comparator']} | {key} | {len(r['seeds'])} | {r['chosen_mean']:.3f} ± "
                         f"{r['chosen_std']:.3f} | {r['mean']:.3f} ± {r['std']:.3f} | {100 * r['diff']:+.1f} ± "
                         f"{100 * r['diff_se']:.1f} pts |")
    return lines


def v3_markdown(result: dict) -> list[str]:
    """Proximity gap per reference style, query outcomes, adaptive K, contribution AUCs per scorer."""
    lines = []
    gaps = result.get("proximity_gaps") or {}
    if gaps:
        lines += ["", "Proximity gap per reference style (reference loss - rollout loss under the base, mean over "
                  "the validation queries; > 0: the references are farther from the model than its rollouts):", "",
                  "| references | gap | reference loss | rollout loss |", "|---|---:|---:|---:|"]
        for style, g in gaps.items():
            lines.append(f"| {style} ({g['name']}) | {g['gap']:+.3f} | {g['reference_loss']:.3f} | "
                         f"{g['rollout_loss']:.3f} |")
    if result.get("query_outcomes"):
        lines += ["", f"Validation queries by the outcome of their first K rollouts: {result['query_outcomes']}; "
                  f"adaptive K: {result.get('adaptive_k')}."]
    diag = result["diagnostics"]
    cols = ["auc_clean_vs_corrupted", "auc_all_wrong", "auc_all_right", "auc_mixed"]
    rows = [(k, d) for k, d in diag.items() if "auc_mixed" in d]
    if rows:
        lines += ["", "ROC-AUC clean vs corrupted of each DRIFT-family score, and of the score made of one group of "
                  "queries only (all rollouts wrong / all right / mixed; query counts in brackets):", "",
                  "| scorer | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for k, d in rows:
            lines.append(f"| {k} | {d['auc_clean_vs_corrupted']:.3f} | " + " | ".join(
                f"{d[c]:.3f} ({d[c.replace('auc_', 'queries_')]})" for c in cols[1:]) + " |")
    return lines


def markdown(result: dict) -> str:
    base = result["base"]
    lines = [f"# Refinement benchmark ({result['mode']})", "",
             f"Base (before continued SFT): target {base['target_acc']:.3f}, non-target {base['nontarget_acc']:.3f}. "
             f"Pool {result['config']['pool_size']} rows, {result['pool_corrupted_share']:.1%} corrupted; "
             f"{result['config']['sft_steps']} continued-SFT steps of batch {result['config']['batch_size']} per run.",
             "Mean ± std over seeds; test decides the result, dev only chose DRIFT's setting (marked *).",
             "", "| method | selection | rows (weight>0) | corrupted share | target acc | non-target acc | "
             "dev target | dev non-target |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    chosen = (result.get("choice") or {}).get("chosen")
    for r in summary(result):
        dev = " | ".join(f"{m:.3f}" if np.isfinite(m) else "" for m in (r["dev_target"][0], r["dev_nontarget"][0]))
        lines.append(f"| {r['method']}{' *' if r['method'] == chosen else ''} | {r['selection']} | {r['kept']} | "
                     f"{r['corrupted']:.1%} | {r['target'][0]:.3f} ± {r['target'][1]:.3f} | "
                     f"{r['nontarget'][0]:.3f} ± {r['nontarget'][1]:.3f} | {dev} |")
    lines += verdict(result)
    lines += statistics_markdown(result)
    lines += v3_markdown(result)
    tasks = list(base.get("per_task", {}))
    if tasks:
        lines += ["", "Test accuracy per task (mean over seeds):", "",
                  "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks),
                  "| base | " + " | ".join(f"{base['per_task'][t]:.3f}" for t in tasks) + " |"]
        for name in result["methods"]:
            runs = [r for r in result["rows"] if r["method"] == name and "per_task" in r]
            if runs:
                lines.append(f"| {name} | " + " | ".join(
                    f"{np.mean([r['per_task'][t] for r in runs]):.3f}" for t in tasks) + " |")
    kinds = result["corruption_kinds"]
    lines += ["", "Share of each corruption kind among kept rows (by weight; seed 0):", "",
              "| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    lines.append("| pool | " + " | ".join(f"{result['pool_shares'][k]:.1%}" for k in kinds) + " |")
    for name in result["methods"]:
        run = next((r for r in result["rows"] if r["method"] == name), None)
        if run:
            lines.append(f"| {name} | " + " | ".join(f"{run['kept_shares'][k]:.1%}" for k in kinds) + " |")
    diag = result["diagnostics"]
    cols = ["auc_clean_vs_corrupted", "spearman_grad_norm", "spearman_length"] + [f"auc_{k}" for k in kinds if k != "clean"]
    lines += ["", "Score diagnostics over the pool (ROC-AUC: clean rows above corrupted; per kind: clean vs that kind):",
              "", "| scorer | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for scorer, d in diag.items():
        lines.append(f"| {scorer} | " + " | ".join(f"{d.get(c, float('nan')):.3f}" for c in cols) + " |")
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["wall_s"].items()),
              "(cache build: " + ", ".join(f"{k} {v:.0f}" for k, v in result["cache_build_wall_s"].items() if v) + ")", "",
              f"Machine: {result['machine']}  ", f"Versions: {result['versions']}", ""]
    if result.get("library_check"):
        lines.append(f"Library path check: {json.dumps(result['library_check'])}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(result)
    colors = {"baseline": "tab:gray", "drift": "tab:blue", "ablation": "tab:orange", "reference": "tab:green", "composition": "tab:purple",
              "round2": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    for ax, key, title in ((axes[0], "target", "target tasks"), (axes[1], "nontarget", "non-target tasks")):
        means = [r[key][0] for r in rows]
        ax.barh(y, means, xerr=[r[key][1] for r in rows], color=[colors[r["group"]] for r in rows])
        full = next((r[key][0] for r in rows if r["method"] == "full"), None)
        if full is not None:
            ax.axvline(full, color="k", lw=0.8, ls="--")
        ax.axvline(result["base"][f"{key}_acc"], color="r", lw=0.8, ls=":")
        finite = [m for m in means if np.isfinite(m)] + [result["base"][f"{key}_acc"]]
        ax.set_xlim(max(0.0, min(finite) - 0.1), min(1.0, max(finite) + 0.05))
        ax.set_title(title)
        ax.set_xlabel("greedy accuracy")
    chosen = (result.get("choice") or {}).get("chosen")
    fig.suptitle(f"Continued SFT from the base ({result['mode']}): mean ± std over seeds 0-2; dashed: full pool, "
                 "dotted: base; * chosen on dev", fontsize=10)
    axes[0].set_yticks(y, [r["method"] + (" *" if r["method"] == chosen else "") for r in rows])
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "reasoning-gym", "numpy", "drift-stream"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
