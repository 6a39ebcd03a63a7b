"""Outputs of benchmark v4 (benchmarks/refine_real.py): results.json / results.md / results.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import refine_lib as rl
from refine_report import versions  # noqa: F401  (re-used by refine_real.py)

logger = logging.getLogger("refine_real")
COLORS = {"baseline": "tab:gray", "drift": "tab:blue", "ablation": "tab:orange", "reference": "tab:green"}


def write_outputs(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(out_dir / "results.json")
    (out_dir / "results.md").write_text(markdown(result))
    try:
        plot(result, out_dir / "results.png")
    except ImportError:
        logger.warning("matplotlib not installed: no plot")


def summary(result: dict) -> list[dict]:
    out = []
    for name, info in result["methods"].items():
        runs = [r for r in result["rows"] if r["method"] == name]
        if not runs:
            continue
        stat = {k: rl.mean_std([r[k] for r in runs if k in r]) for k in (
            "target_acc", "nontarget_acc", "dev_target_acc", "dev_nontarget_acc", "target_strict")}
        out.append({"method": name, "group": info["group"], "seeds": len(runs), **stat,
                    "corrupted": runs[0]["corrupted_share"], "target_rows": runs[0].get("target_rows_share"),
                    "wall": float(np.mean([r["wall_s"] for r in runs]))})
    return out


def _pm(ms) -> str:
    m, s = ms
    return "" if not np.isfinite(m) else f"{m:.3f} ± {s:.3f}"


def _stage_line(result: dict) -> str:
    """Each stage's time where it was computed (stage_times.json of the cache) and the continued-SFT runs' own."""
    parts = [f"{k} {v:.0f} s" for k, v in (result.get("stage_times") or {}).items()]
    trained = {(r["seed"], r["wall_s"]) for r in result["rows"] if r["wall_s"] > 0}  # a reused run repeats its wall
    sft = sum(w for _, w in trained)
    parts.append(f"continued SFT + evaluation {len(trained)} runs trained, {sft / len(trained) if trained else 0:.0f} s "
                 f"each on average, {sft / 60:.0f} min of run time in all")
    return "; ".join(parts) + "."


def markdown(result: dict) -> str:
    cfg = result["config"]
    wall = result["wall_s"]
    lines = [f"# Benchmark v4: continued SFT of SmolLM2-135M-Instruct on refined data ({result['mode']})", "",
             "Command: `python benchmarks/refine_real.py" + (" --quick" if cfg.get("quick") else "")
             + (" --device cuda" if cfg.get("device") == "cuda" else "") + "` (docs: the module docstring). "
             f"Pass-rate sweep that chose the tasks: `{result['sweep']}`.", "",
             f"Wall time: {wall.get('total', float('nan')) / 60:.1f} min in this process "
             f"({', '.join(f'{k} {v:.0f}s' for k, v in wall.items() if k != 'total')}); {result['machine']}. "
             "Stages cached by an earlier process are loaded, not re-timed: " + _stage_line(result), "",
             f"Pool {cfg['pool_size']} rows, {100 * (1 - result['pool_shares']['clean']):.0f}% corrupted; "
             f"{cfg['queries']} validation queries x K = {cfg['num_rollouts']}; test {cfg['test_target']} target + "
             f"2 x {cfg['test_nontarget']} non-target items, dev {cfg['dev_target']} + 2 x {cfg['dev_nontarget']}; "
             f"warm-up {cfg['warmup_steps']} steps, continued SFT {cfg['sft_steps']} steps x {cfg['batch_size']} rows, "
             f"lr {cfg.get('sft_lr', cfg['lr'])} (warm-up {cfg['lr']}), AdamW, full fine-tuning; every selection keeps top {cfg['fraction']:.0%}; seeds "
             f"{cfg['seeds']}. Accuracy: greedy, the `numeric` verifier (marked `Answer: x`, else the last number); "
             "`strict`: the marked answer only.", ""]
    base = result["base"]
    lines += [f"Zero-shot SmolLM2: target {base['zero_shot']['target_acc']:.3f} (strict "
              f"{base['zero_shot']['target_strict']:.3f}), non-target {base['zero_shot']['nontarget_acc']:.3f}; "
              f"warmed base: target {base['warmed']['target_acc']:.3f} (strict {base['warmed']['target_strict']:.3f}), "
              f"non-target {base['warmed']['nontarget_acc']:.3f}.", ""]
    for T, info in result["rollouts"].items():
        lines.append(f"Rollouts at T = {T}: pass rate {info['pass_rate']:.3f}, queries {info['query_outcomes']}, "
                     f"cut at max_new_tokens {info['truncated']:.1%}.")
    lines += ["", "## Test accuracy (mean ± std over seeds)", "",
              "| method | group | corrupted kept | target-task rows | target | target strict | non-target | dev target "
              "| dev non-target |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    chosen = (result.get("choice") or {}).get("chosen")
    for r in summary(result):
        name = f"**{r['method']}** (chosen on dev)" if r["method"] == chosen else r["method"]
        tr = "" if r["target_rows"] is None else f"{r['target_rows']:.0%}"
        lines.append(f"| {name} | {r['group']} | {r['corrupted']:.1%} | {tr} | {_pm(r['target_acc'])} | "
                     f"{_pm(r['target_strict'])} | {_pm(r['nontarget_acc'])} | {_pm(r['dev_target_acc'])} | "
                     f"{_pm(r['dev_nontarget_acc'])} |")
    choice = result.get("choice") or {}
    if choice:
        lines += ["", f"## Dev choice: `{choice['chosen']}`", "", f"Rule: {choice['rule']} "
                  f"(full pool dev non-target {choice['full_dev_nontarget']:.3f}).", "",
                  "| candidate | dev target | dev non-target | eligible |", "|---|---:|---:|---|"]
        for n, c in sorted(choice["candidates"].items(), key=lambda kv: -kv[1]["dev_target"]):
            lines.append(f"| {n} | {c['dev_target']:.3f} | {c['dev_nontarget']:.3f} | "
                         f"{'yes' if n in choice['eligible'] else 'no'} |")
    stats = result.get("statistics") or {}
    if stats:
        lines += ["", f"## Paired differences: {stats['chosen']} - comparator (points, ± standard error over seeds "
                  f"{stats['seeds']})", "", "| comparator | target | non-target |", "|---|---:|---:|"]
        non = {s["comparator"]: s for s in stats["nontarget"]}
        for s in stats["target"]:
            n = non.get(s["comparator"])
            fmt = (lambda x: f"{100 * x['diff']:+.1f} ± {100 * x['diff_se']:.1f}")
            lines.append(f"| {s['comparator']} | {fmt(s)} | {fmt(n) if n else ''} |")
        beat = [s for s in stats["target"] if result["methods"][s["comparator"]]["group"] in ("baseline", "reference")]
        ok = [s for s in beat if s["diff"] >= 0.02]
        lines += ["", f"Target of issue 25 (>= +2 points over every baseline): "
                  f"{'met' if beat and len(ok) == len(beat) else 'NOT met'} ({len(ok)} of {len(beat)} baselines)."]
    lines += ["", "## Score diagnostics (pool, no SFT)", "",
              "ROC-AUC clean vs corrupted of each score; per kind (clean vs that kind); `target rows`: among target-task "
              "rows only; all-wrong / all-right / mixed: the AUC of the score made of that group of validation queries "
              "only (grouped by their K rollouts; number of queries in brackets).", ""]
    diag = result["diagnostics"]
    kinds = [k for k in result["corruption_kinds"] if k != "clean"]
    lines += ["| scorer | AUC | target rows | " + " | ".join(kinds) + " | all-wrong | all-right | mixed | "
              "Spearman(score, grad norm) |", "|---|" + "---:|" * (len(kinds) + 6)]
    for name, d in diag.items():
        grp = [f"{d[f'auc_{g}']:.3f} ({d[f'queries_{g}']})" if f"auc_{g}" in d and np.isfinite(d[f"auc_{g}"])
               else (f"- ({d[f'queries_{g}']})" if f"queries_{g}" in d else "") for g in ("all_wrong", "all_right",
                                                                                        "mixed")]
        lines.append(f"| {name} | {d['auc_clean_vs_corrupted']:.3f} | {d['auc_target_rows']:.3f} | "
                     + " | ".join(f"{d.get('auc_' + k, float('nan')):.3f}" for k in kinds) + " | "
                     + " | ".join(grp) + f" | {d['spearman_grad_norm']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(result)
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    chosen = (result.get("choice") or {}).get("chosen")
    for ax, key, title in ((axes[0], "target_acc", "target task (basic_arithmetic)"),
                           (axes[1], "nontarget_acc", "non-target tasks (chain_sum, gcd)")):
        means = [r[key][0] for r in rows]
        ax.barh(y, means, xerr=[r[key][1] for r in rows], color=[COLORS.get(r["group"], "k") for r in rows])
        full = next((r[key][0] for r in rows if r["method"] == "full"), None)
        if full is not None:
            ax.axvline(full, color="k", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("greedy accuracy (test)")
    fig.suptitle(f"SmolLM2-135M-Instruct, continued SFT per method ({result['mode']}): mean ± std over seeds; "
                 "dashed: full pool; * chosen on dev", fontsize=10)
    axes[0].set_yticks(y, [r["method"] + (" *" if r["method"] == chosen else "") for r in rows])
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
