"""The report page of a gathered run (`report.RunSummary`): inline SVG plots, the example rows as readable chat turns,
the CSS; and the number format shared with the terminal summary. One self-contained HTML page, no scripts.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drift_stream.engines.run_summary import RAW
from drift_stream.io.columns import GRAD_NORM as NORM
from drift_stream.io.columns import NUM_TOKENS as TOKENS
from drift_stream.io.columns import SCORE
from drift_stream.version import __version__

MAX_TEXT_CHARS = 1_500


@dataclass
class RunSummary:
    """Everything the report shows, gathered from a run directory (and its bank, when the config names one)."""

    run_dir: str
    manifest: dict | None
    rows_scored: int
    score_stats: dict[str, float]
    hist_counts: np.ndarray  # [bins]
    hist_edges: np.ndarray  # [bins + 1]
    spearman: dict[str, float]
    scatter: dict[str, np.ndarray]  # column -> [points]
    debias: dict | None
    rejects: dict[str, int]
    bank: dict | None
    top: list[dict] = field(default_factory=list)
    bottom: list[dict] = field(default_factory=list)
    completed: Any = None  # the CompletedShards read: complete, fraction_files, describe()
    refine: dict | None = None  # a refine output directory's run_dir, manifest, weight_counts [bins], weight_edges



def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return "n/a" if math.isnan(x) else f"{float(x) + 0.0:.{digits}g}"  # + 0.0: no "-0"
    return str(x)


# ------------------------------------------------------------------------------------------------------------ SVG

W, H, ML, MR, MT, MB = 540, 240, 58, 14, 14, 44


def _ticks(lo: float, hi: float, n: int = 5, log: bool = False) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    if log and hi - lo >= 1.5:  # whole decades
        return [float(e) for e in range(math.ceil(lo), math.floor(hi) + 1)]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _axes(xlo: float, xhi: float, ylo: float, yhi: float, xlabel: str, ylabel: str, log_x: bool = False) -> tuple:
    """(x map, y map, svg of axes, ticks and labels)."""
    def fx(v):
        t = (math.log10(v) - xlo) / (xhi - xlo) if log_x else (v - xlo) / (xhi - xlo) if xhi > xlo else 0.5
        return ML + t * (W - ML - MR)

    def fy(v):
        return H - MB - ((v - ylo) / (yhi - ylo) if yhi > ylo else 0.5) * (H - MT - MB)

    parts = [f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" class="frame"/>']
    for t in _ticks(xlo, xhi, log=log_x):
        x = ML + ((t - xlo) / (xhi - xlo) if xhi > xlo else 0.5) * (W - ML - MR)
        label = f"{10 ** t:.3g}" if log_x else f"{t:.3g}"
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - MB}" y2="{H - MB + 4}" class="tick"/>'
                     f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle">{label}</text>')
    for t in _ticks(ylo, yhi):
        y = fy(t)
        parts.append(f'<line x1="{ML - 4}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{ML - 7}" y="{y + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    parts.append(f'<text x="{(ML + W - MR) / 2}" y="{H - 6}" text-anchor="middle" class="label">'
                 f'{html.escape(xlabel)}{" (log scale)" if log_x else ""}</text>'
                 f'<text transform="translate(14 {(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle" '
                 f'class="label">{html.escape(ylabel)}</text>')
    return fx, fy, "".join(parts)


def _svg(body: str, title: str) -> str:
    return (f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" xmlns="http://www.w3.org/2000/svg">'
            f'<title>{html.escape(title)}</title>{body}</svg>')


def svg_histogram(counts: np.ndarray, edges: np.ndarray, xlabel: str = "drift_score") -> str:
    if counts.size == 0:
        return f"<p>No finite {html.escape(xlabel)} values.</p>"
    fx, fy, axes = _axes(float(edges[0]), float(edges[-1]), 0.0, float(counts.max()) * 1.05, xlabel, "rows")
    bars = [f'<rect x="{fx(a):.1f}" y="{fy(c):.1f}" width="{max(fx(b) - fx(a) - 1, 0.5):.1f}" '
            f'height="{fy(0) - fy(c):.1f}" class="bar"><title>[{a:.4g}, {b:.4g}): {int(c)}</title></rect>'
            for a, b, c in zip(edges[:-1], edges[1:], counts)]
    zero = (f'<line x1="{fx(0):.1f}" x2="{fx(0):.1f}" y1="{MT}" y2="{H - MB}" class="zero"/>'
            if edges[0] < 0 < edges[-1] else "")
    return _svg(axes + "".join(bars) + zero, f"histogram of {xlabel}")


def svg_scatter(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str) -> str:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return "<p>No finite points.</p>"
    log_x = bool(x.min() > 0 and x.max() / x.min() > 30)
    xs = np.log10(x) if log_x else x
    pad_x, pad_y = 0.03 * (xs.max() - xs.min() or 1.0), 0.05 * (y.max() - y.min() or 1.0)
    fx, fy, axes = _axes(float(xs.min() - pad_x), float(xs.max() + pad_x), float(y.min() - pad_y),
                         float(y.max() + pad_y), xlabel, ylabel, log_x)
    dots = "".join(f'<circle cx="{fx(10 ** a if log_x else a):.1f}" cy="{fy(b):.1f}" r="2.2" class="dot"/>'
                   for a, b in zip(xs, y))
    return _svg(axes + dots, f"{ylabel} against {xlabel}")


def svg_pass_rates(rates: dict[str, float]) -> str:
    items = sorted(rates.items(), key=lambda kv: kv[1])
    fx, fy, axes = _axes(0, len(items), 0.0, 1.0, "validation queries (sorted by pass rate)", "pass rate")
    width = (W - ML - MR) / len(items)
    bars = [f'<rect x="{fx(i) + 0.5:.1f}" y="{fy(r):.1f}" width="{max(width - 1, 0.5):.1f}" '
            f'height="{max(fy(0) - fy(r), 0.5):.1f}" class="bar"><title>{html.escape(q)}: {r:.3f}</title></rect>'
            for i, (q, r) in enumerate(items)]
    return _svg(axes + "".join(bars), "per-query pass rates")


# --------------------------------------------------------------------------------------------------- examples


def _text(value: Any) -> str:
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}]
        return "\n".join(_text(v.get("text", v) if isinstance(v, dict) else v) for v in value)
    s = "" if value is None else str(value)
    if len(s) > MAX_TEXT_CHARS:
        s = s[:MAX_TEXT_CHARS] + f"\n… ({len(s) - MAX_TEXT_CHARS:,} more characters)"
    return s


def _turn(role: str, content: Any) -> str:
    return (f'<div class="turn {html.escape(role.lower(), quote=True)}"><span class="role">{html.escape(role)}</span>'
            f'<pre>{html.escape(_text(content))}</pre></div>')


def _turns(messages: Any, role_key: str = "role", content_key: str = "content") -> str:
    if isinstance(messages, str):
        return _turn("text", messages)
    return "".join(_turn(str(m.get(role_key, "?")), m.get(content_key)) for m in messages or []
                   if isinstance(m, dict))


def render_example(row: dict) -> str:
    """The readable text of one row as HTML (every value escaped): chat turns, prompt/completion, alpaca, text."""
    if row.get("messages") is not None:
        return _turns(row["messages"])
    if row.get("conversations") is not None:
        return _turns(row["conversations"], "from", "value")
    if row.get("prompt") is not None and "completion" in row:  # TRL: strings or conversational lists
        return "".join(_turns(row[k]) if isinstance(row[k], list) else _turn(k, row[k])
                       for k in ("prompt", "completion"))
    if row.get("instruction") is not None:
        return "".join(_turn(k, row[k]) for k in ("instruction", "input", "output") if row.get(k))
    if row.get("question") is not None:
        return "".join(_turn(k, row[k]) for k in ("question", "answer") if row.get(k) is not None)
    if row.get("text") is not None:
        return _turn("text", row["text"])
    return "".join(_turn(k, v) for k, v in row.items() if isinstance(v, str) and k != "id"
                   and not k.startswith("drift_"))


def _examples_html(rows: list[dict], label: str) -> str:
    if not rows:
        return "<p>No rows.</p>"
    out = []
    for i, row in enumerate(rows, 1):
        meta = " · ".join(f"{k.removeprefix('drift_')} {_fmt(row.get(k))}" for k in (SCORE, NORM, TOKENS) if k in row)
        out.append(f'<details class="example"{" open" if i <= 3 else ""}><summary><b>{label} {i}</b> · {meta} · '
                   f'id <code>{html.escape(str(row.get("id")))}</code></summary>{render_example(row)}</details>')
    return "".join(out)


# --------------------------------------------------------------------------------------------------------- page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1c2430;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:18px 26px 60px}
h1{font-size:22px;margin:8px 0 2px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d7dbe2;padding-bottom:4px}
.sub{color:#5b6575}.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:19px}.card span{color:#5b6575;font-size:12px}
.plots{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}
.plot{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:6px;width:fit-content;margin:8px 0}
.plot h3{font-size:13px;margin:2px 6px 0;font-weight:600}
svg text{font-size:11px;fill:#3b4452}svg .label{font-size:12px;fill:#1c2430}
.frame{fill:#fff;stroke:#b8bfca}.grid{stroke:#edf0f4}.tick{stroke:#8a93a1}.bar{fill:#4c78a8}.bar:hover{fill:#f58518}
.dot{fill:#4c78a8;fill-opacity:.45}.zero{stroke:#e45756;stroke-dasharray:4 3}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #dde1e7;padding:4px 10px;text-align:left}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.example{background:#fff;border:1px solid #dde1e7;border-radius:8px;margin:8px 0;padding:6px 12px}
.example summary{cursor:pointer}.turn{margin:6px 0;border-left:3px solid #c9ced6;padding-left:8px}
.turn.user,.turn.human,.turn.prompt,.turn.instruction,.turn.question{border-color:#4c78a8}
.turn.assistant,.turn.gpt,.turn.completion,.turn.output,.turn.answer{border-color:#54a24b}
.turn.system{border-color:#b279a2}
.role{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#5b6575}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
.note{color:#5b6575}
"""


def _table(rows: list[tuple], head: tuple) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_fmt(c)}</td>' if c is None or isinstance(c, (int, float, np.number))
        and not isinstance(c, bool)
        else f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _plot(title: str, svg: str) -> str:
    return f'<div class="plot"><h3>{html.escape(title)}</h3>{svg}</div>'


def _refine_html(refine: dict | None) -> str:
    """The refinement section of a refine output directory's page: what the policy kept, and how spread the weights
    are (the manifest's weight_summary; the histogram of the weight column when there is one)."""
    if not refine:
        return ""
    m = refine["manifest"]
    policy = (m.get("policy") or {}).get("spec")
    rows = [("refine output", refine["run_dir"]), ("policy", policy), ("rows in", m.get("rows_in")),
            ("rows kept", m.get("rows_kept")), ("rows written", m.get("rows_written"))]
    w = m.get("weight_summary")
    plot = ""
    if w:
        rows += [("weight map", w["map"]), ("temperature", w["temperature"])]
        rows += [("clip_z", w["clip_z"])] if w.get("clip_z") is not None else []
        rows += [("max weight (mean 1)", w["max_weight"]),
                 ("effective sample size (sum w)^2 / sum w^2", w["effective_sample_size"]),
                 ("effective sample size / rows", f"{100 * w['effective_sample_share']:.1f}%"),
                 (f"weight share of the top 1% of rows ({w['top_1pct_rows']:,})",
                  f"{100 * w['top_1pct_weight_share']:.1f}%")]
    counts = refine.get("weight_counts")
    if counts is not None and counts.size:
        plot = _plot(f"weight over {int(counts.sum()):,} rows written (mean 1)",
                     svg_histogram(counts, refine["weight_edges"], "weight"))
    elif w:
        plot = ('<p class="note">No weight column (repeat writes integer copies): the numbers are those of the '
                "expected copies.</p>")
    return (f'<h2 id="refine">Refinement ({html.escape(str(policy))})</h2><div class="plots">{plot}'
            f'{_table(rows, ("quantity", "value"))}</div>')


def render_html(s: RunSummary) -> str:
    """The report page for a gathered run."""
    st, m = s.score_stats, s.manifest or {}
    rejected = sum(s.rejects.values())
    cards = [("rows in", m.get("rows_in", s.rows_scored + rejected)), ("scored", s.rows_scored),
             ("rejected", rejected), ("mean score", st["mean"]), ("median score", st["median"]),
             ("positive", f"{100 * st['positive_fraction']:.1f}%")]
    sc = s.scatter
    rho = s.spearman
    corr_plots = []
    for other, name in ((NORM, "gradient norm ||u||"), (TOKENS, "length (tokens)")):
        if other in sc:
            corr_plots.append(_plot(f"score vs {name}: Spearman {_fmt(rho.get(f'{SCORE}~{other}'), 3)}",
                                    svg_scatter(sc[other], sc[SCORE], name, "drift_score")))
            if RAW in sc:
                corr_plots.append(_plot(f"before debiasing: raw score vs {name}: Spearman "
                                        f"{_fmt(rho.get(f'{RAW}~{other}'), 3)}",
                                        svg_scatter(sc[other], sc[RAW], name, "raw score (S x ||u||^beta)")))
    corr_rows = [(k.replace("~", " vs "), v) for k, v in rho.items()]
    debias = ""
    if s.debias:
        debias = "<h3>Debiasing (scorer facts from the run manifest)</h3>" + _table(
            [(k, v) for k, v in s.debias.items() if isinstance(v, (int, float, str))], ("quantity", "value"))
    bank = '<p class="note">The run config names no bank (a baseline scorer): no pass rates.</p>'
    if s.bank:
        rates = s.bank["pass_rates"]
        gap = s.bank["proximity_gap"]
        bank = f"<p>bank <code>{html.escape(s.bank['path'])}</code></p>"
        if s.bank["missing"]:
            bank += '<p class="note">Its manifest could not be read.</p>'
        elif rates:
            r = np.array(list(rates.values()))
            bank += _table([("queries with verified rollouts", r.size), ("mean per-query pass rate", float(r.mean())),
                            ("pass rate over all rollouts", s.bank["pass_rate"]),
                            ("queries all wrong (pass rate 0)", int((r == 0).sum())),
                            ("queries all right (pass rate 1)", int((r == 1).sum()))], ("quantity", "value"))
            bank += _plot("per-query pass rates (hover a bar for the query)", svg_pass_rates(rates))
        else:
            bank += '<p class="note">The bank manifest has no per-query counts.</p>'
        if isinstance(gap, dict):
            bank += ("<h3>Proximity gap</h3><p class=\"note\">Mean token loss of the reference answers minus that of "
                     "the model's own rollouts: how far off-policy targets are from on-policy ones.</p>"
                     + _table([(k, v) for k, v in gap.items()], ("quantity", "value")))
        elif gap is not None:
            bank += f"<p>Proximity gap (loss of off-policy references minus on-policy rollouts): {_fmt(gap)}</p>"
    rejects = (_table([(k, v) for k, v in s.rejects.items()] + [("total", rejected)], ("reason", "rows"))
               if s.rejects else "<p>No rejected rows.</p>")
    config = html.escape(json.dumps(m.get("config", {}), indent=2, sort_keys=True, default=str))
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    incomplete = ("" if s.completed is None or s.completed.complete else
                  f'<p class="note"><b>Incomplete run</b> (--allow-incomplete): this page shows '
                  f"{html.escape(s.completed.describe())}.</p>")
    card_html = "".join(f'<div class="card"><b>{html.escape(_fmt(v))}</b><span>{k}</span></div>' for k, v in cards)
    hist = _plot(f"drift_score over {s.rows_scored:,} rows (dashed: 0)", svg_histogram(s.hist_counts, s.hist_edges))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>drift-stream report: {html.escape(s.run_dir)}</title>
<style>{CSS}</style></head><body><main>
<h1>drift-stream report</h1>
<div class="sub">run <code>{html.escape(s.run_dir)}</code> · generated {generated}
 · drift-stream {html.escape(__version__)}</div>
{incomplete}<div class="cards">{card_html}</div>
<h2 id="scores">Score distribution</h2>
<div class="plots">{hist}
{_table([(k, v) for k, v in st.items()], ("statistic", "value"))}</div>
{_refine_html(s.refine)}
<h2 id="correlations">Score against gradient norm and length</h2>
<p class="note">A debiased score should not track the gradient norm (|Spearman| near 0); a large value means
examples with huge gradients dominate the ranking.</p>
<div class="plots">{"".join(corr_plots)}</div>
{_table(corr_rows, ("Spearman", "rho")) if corr_rows else ""}{debias}
<h2 id="bank">Validation bank</h2>{bank}
<h2 id="top">Top {len(s.top)} examples (highest score)</h2>{_examples_html(s.top, "top")}
<h2 id="bottom">Bottom {len(s.bottom)} examples (lowest score)</h2>{_examples_html(s.bottom, "bottom")}
<h2 id="rejects">Rejected rows</h2>{rejects}
<h2 id="config">Run config</h2>
<details><summary>resolved config from manifest.json</summary><pre>{config}</pre></details>
</main></body></html>
"""
