"""One self-contained HTML page about a scored run (inline SVG, no scripts), and its short terminal form."""

from __future__ import annotations

import html
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from drift_stream import __version__
from drift_stream.io.run_dir import RunDirectory, open_path, write_bytes_atomic
from drift_stream.io.run_reader import CompletedShards
from drift_stream.refine.policies import read_json

from drift_stream.stats import rankdata, spearman  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

SCORE, NORM, TOKENS, RAW = "drift_score", "drift_grad_norm", "drift_num_tokens", "drift_raw_score"
MAX_SPEARMAN_ROWS = 1_000_000  # ranks of 1M rows take ~0.3 s; larger runs use a seeded sample
MAX_SCATTER_POINTS = 1_500
MAX_TEXT_CHARS = 1_500


# ------------------------------------------------------------------------------------------------------- numerics


# ---------------------------------------------------------------------------------------------------- gathering


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


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return "n/a" if math.isnan(x) else f"{float(x) + 0.0:.{digits}g}"  # + 0.0: no "-0"
    return str(x)


def _find_debias(manifest: dict | None) -> dict | None:
    """Debiasing facts of a run manifest: `scorer_info` (beta, beta_mode, its `debias` block) or a top-level
    `debias` block."""
    if not manifest:
        return None
    for holder in (manifest, manifest.get("scorer_info")):
        if not isinstance(holder, dict):
            continue
        facts = {k: holder[k] for k in ("beta", "beta_mode") if isinstance(holder.get(k), (int, float, str))}
        if isinstance(holder.get("debias"), dict):
            facts.update(holder["debias"])
        if facts:
            return facts
    return None


def _find_bank(config: Any) -> str | None:
    """The bank path in a run config: `config.bank` or one level down (`config.scorer.bank`)."""
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("bank"), str):
        return config["bank"]
    for value in config.values():
        if isinstance(value, dict) and isinstance(value.get("bank"), str):
            return value["bank"]
    return None


def _reject_counts(shards: CompletedShards) -> dict[str, int]:
    """Rejected rows of the finished input files by reason kind (`too_long:300>256` counts as `too_long`)."""
    counts: dict[str, int] = {}
    for path in shards.rejects_files:
        with shards.open_data(path) as f:
            reasons = pq.read_table(f, columns=["drift_reject_reason"]).column(0).to_pylist()
        for r in reasons:
            key = str(r).split(":", 1)[0] if r else "unknown"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _bank_info(manifest: dict | None, run_fs, run_root: str, storage_options: dict | None) -> dict | None:
    """Per-query pass rates and the proximity gap of the bank named in the run config, when it can be read."""
    bank = _find_bank((manifest or {}).get("config"))
    if not bank:
        return None
    fs, root = open_path(bank, storage_options)
    if not fs.exists(f"{root}/manifest.json") and "://" not in str(bank):
        fs, root = run_fs, f"{run_root}/{bank}"  # a path relative to the run directory
    bm = read_json(fs, f"{root}/manifest.json")
    if bm is None:
        logger.warning("bank %s named in the run config has no manifest.json: report shows no bank section", bank)
        return {"path": str(bank), "pass_rates": {}, "pass_rate": None, "proximity_gap": None, "missing": True}
    rates: dict[str, float] = {}
    for i, q in enumerate(bm.get("queries") or []):  # schemas/bank_manifest.schema.json
        if isinstance(q, dict) and q.get("pass_rate") is not None:  # null: no verifiable rollout
            rates[str(q.get("id", i))] = float(q["pass_rate"])
    if not rates and fs.exists(f"{root}/rollouts.parquet"):
        with fs.open(f"{root}/rollouts.parquet", "rb") as f:
            roll = pl.from_arrow(pq.read_table(f, columns=["query_id", "reward"]))
        agg = roll.group_by("query_id").agg(pl.col("reward").cast(pl.Float64).mean()).sort("query_id")
        rates = {str(q): float(r) for q, r in agg.iter_rows()}
    return {"path": str(bank), "pass_rates": rates, "pass_rate": bm.get("pass_rate"),
            "proximity_gap": bm.get("proximity_gap"), "missing": False}


def _fetch_rows(fs, shards: list[str], rows: list[int]) -> dict[int, dict]:
    """Full rows at global positions `rows`, reading only the row groups that hold them."""
    out: dict[int, dict] = {}
    start = 0
    wanted = sorted(set(rows))
    if not wanted:
        return out
    for path in shards:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            rg_start = start
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                here = [r for r in wanted if rg_start <= r < rg_start + n]
                if here:
                    table = pf.read_row_group(g)
                    for r in here:
                        out[r] = table.slice(r - rg_start, 1).to_pylist()[0]
                rg_start += n
            start = rg_start
    return out


def _first_k(key: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest keys, in (key desc, position asc) order.  key: [n] -> [min(k, n)]"""
    n = key.size
    if k >= n:
        idx = np.arange(n)
    elif k <= 0:
        idx = np.arange(0)
    else:
        v = np.partition(key, n - k)[n - k]  # the k-th largest key
        above = np.flatnonzero(key > v)
        idx = np.concatenate([above, np.flatnonzero(key == v)[:k - above.size]])
    return idx[np.lexsort((idx, -key[idx]))]


def _extreme_rows(score: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Positions of the k highest scores (descending) and of the k lowest (ascending), never the same rows."""
    key = np.where(np.isfinite(score), score, -np.inf).astype(np.float64)
    top = _first_k(key, k)
    rest = np.ones(key.size, dtype=bool)
    rest[top] = False
    rest = np.flatnonzero(rest)  # ascending positions, so ties stay in position order
    bottom = rest[_first_k(-key[rest], min(k, rest.size))]
    return [int(i) for i in top], [int(i) for i in bottom]


def gather(run_dir: str, *, top_k: int = 10, bins: int = 40, storage_options: dict | None = None,
           seed: int = 0, allow_incomplete: bool = False, command: str = "report") -> RunSummary:
    """Read a run directory's scores, manifest, rejects and bank into a RunSummary (numeric columns only, plus
    the 2 * top_k example rows). Only finished input files are read; an incomplete run raises IncompleteRunError
    unless `allow_incomplete` (then `RunSummary.completed` says what fraction was seen)."""
    run = RunDirectory.open(run_dir, storage_options)
    fs, root = run.fs, run.root
    completed = run.read_completed_shards(allow_incomplete=allow_incomplete, command=command)
    manifest = completed.manifest
    if manifest is None or not completed.complete:  # counts of what is read: recomputed from its markers
        manifest = run.build_manifest(completed.config, list(completed.input_files), completed.markers)
    shards = completed.data_files
    lf = completed.scan()
    names = lf.collect_schema().names()
    cols = [c for c in (SCORE, NORM, TOKENS, RAW) if c in names]
    if SCORE not in cols:
        from drift_stream.errors import InputError

        raise InputError(f"shards under {root}/data have no {SCORE} column: is this a scored run directory?")
    score = lf.select(SCORE).collect()[SCORE].to_numpy()  # [N], the one column read in full
    n = int(score.size)
    finite = score[np.isfinite(score)].astype(np.float64)
    q = np.quantile(finite, [0.1, 0.5, 0.9]) if finite.size else [math.nan] * 3
    stats = {"mean": float(finite.mean()) if finite.size else math.nan,
             "std": float(finite.std()) if finite.size else math.nan,
             "min": float(finite.min()) if finite.size else math.nan, "p10": float(q[0]), "median": float(q[1]),
             "p90": float(q[2]), "max": float(finite.max()) if finite.size else math.nan,
             "positive_fraction": float((finite > 0).mean()) if finite.size else math.nan}
    counts, edges = np.histogram(finite, bins=bins) if finite.size else (np.zeros(0), np.zeros(1))

    # Correlations on every row up to MAX_SPEARMAN_ROWS, else on every step-th row (a systematic sample).
    step = max(1, math.ceil(n / MAX_SPEARMAN_ROWS))
    sample = lf.select(cols).gather_every(step).collect() if step > 1 else lf.select(cols).collect()
    data = {c: sample[c].cast(pl.Float64).to_numpy() for c in cols}
    data = {c: v for c, v in data.items() if c == SCORE or np.isfinite(v).any()}  # e.g. no grad norm for `loss`
    rho: dict[str, float] = {}
    for other in (NORM, TOKENS):
        if other in data:
            rho[f"{SCORE}~{other}"] = spearman(data[SCORE], data[other])
            if RAW in data:
                rho[f"{RAW}~{other}"] = spearman(data[RAW], data[other])
    m = len(data[SCORE])
    pts = np.sort(np.random.default_rng(seed).choice(m, min(m, MAX_SCATTER_POINTS), replace=False))
    scatter = {c: v[pts] for c, v in data.items()}
    top_rows, bottom_rows = _extreme_rows(score, top_k)
    fetched = _fetch_rows(fs, shards, top_rows + bottom_rows)
    return RunSummary(
        run_dir=str(run_dir), manifest=manifest, rows_scored=n, score_stats=stats, hist_counts=counts,
        hist_edges=edges, spearman=rho, scatter=scatter, debias=_find_debias(manifest),
        rejects=_reject_counts(completed), bank=_bank_info(manifest, fs, root, storage_options),
        top=[fetched[i] for i in top_rows], bottom=[fetched[i] for i in bottom_rows], completed=completed)


# ------------------------------------------------------------------------------------------------------ terminal


def _rows_line(s: RunSummary) -> str:
    rejected = sum(s.rejects.values())
    rows_in = (s.manifest or {}).get("rows_in", s.rows_scored + rejected)
    line = f"rows in {_fmt(rows_in)} = scored {_fmt(s.rows_scored)} + rejected {_fmt(rejected)}"
    if s.rejects:
        line += " (" + ", ".join(f"{k}: {v}" for k, v in s.rejects.items()) + ")"
    return line


def summarize_run(run_dir: str, *, storage_options: dict | None = None, allow_incomplete: bool = False) -> str:
    """A few lines for the terminal: rows, score distribution, correlations, bank (IncompleteRunError: `gather`)."""
    s = gather(run_dir, top_k=0, storage_options=storage_options, allow_incomplete=allow_incomplete,
               command="the run summary")
    st = s.score_stats
    lines = [f"run {run_dir}" + ("" if s.completed is None or s.completed.complete else
                                 f"  (INCOMPLETE: {s.completed.describe()})"), _rows_line(s),
             f"drift_score: mean {_fmt(st['mean'])}  std {_fmt(st['std'])}  min {_fmt(st['min'])}  "
             f"p10 {_fmt(st['p10'])}  median {_fmt(st['median'])}  p90 {_fmt(st['p90'])}  max {_fmt(st['max'])}  "
             f"positive {_fmt(100 * st['positive_fraction'], 3)}%"]
    if s.spearman:
        lines.append("spearman: " + "  ".join(f"{k.replace('~', ' vs ')} {_fmt(v, 3)}" for k, v in s.spearman.items()))
    if s.debias:
        facts = dict(s.debias)
        beta, mode = facts.pop("beta", None), facts.pop("beta_mode", None)
        lines.append(f"debias: beta {_fmt(beta, 3)}" + (f" ({mode})" if mode else "") + "".join(
            f"  {k} {_fmt(v, 3)}" for k, v in facts.items() if isinstance(v, (int, float))))
    if s.bank and s.bank["pass_rates"]:
        r = np.array(list(s.bank["pass_rates"].values()))
        lines.append(f"bank: {r.size} queries, mean pass rate {_fmt(float(r.mean()), 3)}, "
                     f"all-wrong {int((r == 0).sum())}, all-right {int((r == 1).sum())}, "
                     f"proximity gap {_gap_text(s.bank['proximity_gap'])}")
    return "\n".join(lines)


def _gap_text(gap: Any) -> str:
    if isinstance(gap, dict) and "gap" in gap:
        return f"{_fmt(gap['gap'], 3)} over {_fmt(gap.get('num_queries'))} queries"
    if isinstance(gap, dict):
        return ", ".join(f"{k} {_fmt(v, 3)}" for k, v in gap.items())
    return _fmt(gap, 3)


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
        return "<p>No finite scores.</p>"
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
                                        svg_scatter(sc[other], sc[RAW], name, "drift_raw_score")))
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


def write_report(run_dir: str, out_html: str | None = None, *, top_k: int = 10,
                 storage_options: dict | None = None, allow_incomplete: bool = False) -> str:
    """Write the report of `run_dir` to `out_html` (default RUN_DIR/report.html); returns where it was written.

    An incomplete run raises IncompleteRunError unless `allow_incomplete` (the page then says what it covers)."""
    summary = gather(run_dir, top_k=top_k, storage_options=storage_options, allow_incomplete=allow_incomplete)
    page = render_html(summary)
    out_html = out_html or f"{str(run_dir).rstrip('/')}/report.html"
    fs, path = open_path(out_html, storage_options)
    write_bytes_atomic(fs, path, page.encode("utf-8"))
    logger.info("report of %s written to %s", run_dir, out_html)
    return out_html
