"""One self-contained HTML page about a scored run (inline SVG, no scripts), and its short terminal form.

This file gathers a run directory into a RunSummary (`gather`) and writes both forms; the page's HTML, plots and CSS
are report_html.py. Given a refine output directory (its manifest.json has kind "refine"), the page is about the
scored run it names (`source_run`) plus the refinement: the weight histogram (weight column) and the spread of the
weights the refine manifest records (`weight_summary`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from drift_stream.engines.run_summary import (
    MAX_SPEARMAN_ROWS,
    SUMMARY_COLUMNS,
    correlations,
    find_debias,
    sample_step,
    score_stats,
    summary_numbers,
)
from drift_stream.errors import InputError
from drift_stream.io.atomic import write_bytes_atomic
from drift_stream.io.columns import REJECT_REASON, SCORE, WEIGHT
from drift_stream.io.run_dir import RunDirectory, open_path
from drift_stream.io.run_reader import CompletedShards, read_completed_shards
from drift_stream.io.streams import redact_url
from drift_stream.refine.policies import read_json
from drift_stream.refine.report_html import RunSummary, _fmt, render_html

logger = logging.getLogger(__name__)

MAX_SCATTER_POINTS = 1_500


# ------------------------------------------------------------------------------------------------------- numerics


# ---------------------------------------------------------------------------------------------------- gathering


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
            reasons = pq.read_table(f, columns=[REJECT_REASON]).column(0).to_pylist()
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


def _refined(run_dir: str, storage_options: dict | None, bins: int) -> dict | None:
    """A refine output directory's manifest and the histogram of its weight column (None: not a refine output).

    Reads the one weight column of the shards the manifest lists; repeat and the filters write none."""
    fs, root = open_path(run_dir, storage_options)
    manifest = read_json(fs, f"{root}/manifest.json")
    if not isinstance(manifest, dict) or manifest.get("kind") != "refine":
        return None
    parts = []
    for shard in manifest.get("shards") or []:
        with fs.open(f"{root}/{shard['path']}", "rb") as f:
            pf = pq.ParquetFile(f)
            if WEIGHT not in pf.schema_arrow.names:
                break
            parts.append(pf.read(columns=[WEIGHT]).column(0).to_numpy().astype(np.float64))
    weight = np.concatenate(parts) if parts else np.zeros(0)  # [rows written]
    counts, edges = (np.histogram(weight, bins=bins, range=(0.0, float(weight.max()) or 1.0)) if weight.size
                     else (np.zeros(0), np.zeros(1)))
    return {"run_dir": str(run_dir), "manifest": manifest, "weight_counts": counts, "weight_edges": edges}


def gather(run_dir: str, *, top_k: int = 10, bins: int = 40, storage_options: dict | None = None,
           seed: int = 0, allow_incomplete: bool = False, command: str = "report") -> RunSummary:
    """Read a run directory's scores, manifest, rejects and bank into a RunSummary (numeric columns only, plus
    the 2 * top_k example rows). Only finished input files are read; an incomplete run raises IncompleteRunError
    unless `allow_incomplete` (then `RunSummary.completed` says what fraction was seen).

    A refine output directory gathers the scored run it names (a refine of part of a run allows that part) and
    its weights (`RunSummary.refine`)."""
    refine = _refined(run_dir, storage_options, bins)
    if refine is not None:
        source = refine["manifest"].get("source_run")
        try:
            summary = gather(source, top_k=top_k, bins=bins, storage_options=storage_options, seed=seed,
                             allow_incomplete=allow_incomplete
                             or refine["manifest"].get("source_fraction_files", 1.0) < 1.0, command=command)
        except InputError as e:
            raise InputError(f"{run_dir} is a refine of {source}, which cannot be read: {e}") from e
        summary.refine = refine
        return summary
    run = RunDirectory.open(run_dir, storage_options)
    fs, root = run.fs, run.root
    completed = read_completed_shards(run, allow_incomplete=allow_incomplete, command=command)
    manifest = completed.manifest
    if manifest is None or not completed.complete:  # counts of what is read: recomputed from its markers
        manifest = run.build_manifest(completed.config, list(completed.input_files), completed.markers)
    shards = completed.data_files
    lf = completed.scan()
    names = lf.collect_schema().names()
    cols = [c for c in SUMMARY_COLUMNS if c in names]
    if SCORE not in cols:
        raise InputError(f"shards under {root}/data have no {SCORE} column: is this a scored run directory?")
    score = lf.select(SCORE).collect()[SCORE].to_numpy()  # [N], the one column read in full
    n = int(score.size)
    stats, finite = score_stats(score)
    counts, edges = np.histogram(finite, bins=bins) if finite.size else (np.zeros(0), np.zeros(1))

    step = sample_step(n, MAX_SPEARMAN_ROWS)
    sample = lf.select(cols).gather_every(step).collect() if step > 1 else lf.select(cols).collect()
    data, rho = correlations({c: sample[c].cast(pl.Float64).to_numpy() for c in cols},
                             (find_debias(manifest) or {}).get("beta"))
    m = len(data[SCORE])
    pts = np.sort(np.random.default_rng(seed).choice(m, min(m, MAX_SCATTER_POINTS), replace=False))
    scatter = {c: v[pts] for c, v in data.items()}
    top_rows, bottom_rows = _extreme_rows(score, top_k)
    fetched = _fetch_rows(fs, shards, top_rows + bottom_rows)
    return RunSummary(
        run_dir=str(run_dir), manifest=manifest, rows_scored=n, score_stats=stats, hist_counts=counts,
        hist_edges=edges, spearman=rho, scatter=scatter, debias=find_debias(manifest),
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


def weight_summary_line(manifest: dict) -> str | None:
    """The spread of a refine's weights in one terminal line (policies weights and repeat; None for the others)."""
    w = manifest.get("weight_summary")
    if not w:
        return None
    label = "expected copies" if (manifest.get("policy") or {}).get("kind") == "repeat" else "weights"
    clip = f", c {_fmt(w['clip_z'], 3)}" if w.get("clip_z") is not None else ""
    return (f"{label} ({w['map']} map, T {_fmt(w['temperature'], 3)}{clip}): max {_fmt(w['max_weight'], 3)} "
            f"(mean 1)  effective sample size {w['effective_sample_size']:,.0f} "
            f"({_fmt(100 * w['effective_sample_share'], 3)}% of {_fmt(w['rows'])} rows)  "
            f"top 1% of rows carry {_fmt(100 * w['top_1pct_weight_share'], 3)}% of the weight")


def summarize_run(run_dir: str, *, storage_options: dict | None = None, allow_incomplete: bool = False,
                  result: dict | None = None) -> str:
    """A few lines for the terminal: rows, score distribution, correlations, bank, and for a refine output
    directory its weights (IncompleteRunError: `gather`).

    A complete score run reads its manifest, not its data: the process that settled the run recorded the summary's
    numbers there from the one scan it makes of the data (engines/run_summary.py); a run settled by an earlier
    version, or one a marker has been removed from since, is read by `gather`. With `allow_incomplete`, a score run
    whose manifest.json is not yet complete (a shard of an array that finished before the others; the manifest is
    written once, by the process that settles the run) gets one line from a listing of its markers, reading no data:
    the full summary is printed by the process that completes the run, so an N-task array reads its data once (to
    settle it), not N times. `result`: what `run_score` returned for this run in this process; when it is a shard's
    counts (the run not settled), that line is written from them, and when it is the manifest this process settled,
    the summary is, reading nothing of the run directory."""
    s = None
    if result is not None and result.get("kind") == "score":
        if allow_incomplete and not result.get("complete"):
            return _incomplete_line(redact_url(str(run_dir)), result["num_completed_files"], result["num_input_files"])
        if result.get("complete") and "summary" in result:
            s = _recorded_summary(str(run_dir), result, *open_path(str(run_dir), storage_options), storage_options)
    if s is None:
        run, manifest = _score_run(run_dir, storage_options)
        if allow_incomplete and run is not None:
            partial = _incomplete_score_run(run, manifest)
            if partial is not None:
                return partial
        s = _settled_summary(run_dir, run, manifest, storage_options) if run is not None else None
    if s is None:
        s = gather(run_dir, top_k=0, storage_options=storage_options, allow_incomplete=allow_incomplete,
                   command="the run summary")
    st = s.score_stats
    lines = [f"run {s.run_dir}" + ("" if s.completed is None or s.completed.complete else
                                 f"  (INCOMPLETE: {s.completed.describe()})"), _rows_line(s),
             (f"drift_score: mean {_fmt(st['mean'])}  std {_fmt(st['std'])}  min {_fmt(st['min'])}  "
              f"p10 {_fmt(st['p10'])}  median {_fmt(st['median'])}  p90 {_fmt(st['p90'])}  max {_fmt(st['max'])}  "
              f"positive {_fmt(100 * st['positive_fraction'], 3)}%")]
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
    if s.refine:
        m = s.refine["manifest"]
        lines.append(f"refine {s.refine['run_dir']}: policy {(m.get('policy') or {}).get('spec')}, "
                     f"{_fmt(m.get('rows_written'))} rows written of {_fmt(m.get('rows_in'))}")
        line = weight_summary_line(m)
        if line:
            lines.append(line)
    return "\n".join(lines)


def _score_run(run_dir: str, storage_options: dict | None) -> tuple[RunDirectory | None, dict | None]:
    """(the run directory, its manifest or None) of a score run directory; (None, None) for anything else."""
    try:
        run = RunDirectory.open(run_dir, storage_options)
    except InputError:
        return None, None
    manifest = run.read_manifest()
    if manifest is not None and manifest.get("kind") != "score":
        return None, None
    return run, manifest


def _incomplete_score_run(run: RunDirectory, manifest: dict | None) -> str | None:
    """One line for a score run directory whose input files are not all marked done yet, else None."""
    if manifest is not None and manifest.get("complete"):
        return None
    inputs = ((run.read_config() or {}).get("config") or {}).get("input_files")
    if not inputs:
        return None
    # no complete manifest yet: the process settling the run (it writes the manifest, then prints the summary) may
    # be at work right now, even when every marker is there already
    return _incomplete_line(run.url, len(run.completed_indexes()), len(inputs))


def _incomplete_line(url: str, done: int, inputs: int) -> str:
    return (f"run {url}  (INCOMPLETE: not settled yet, {done} of {inputs} input files scored; the "
            f"process that completes the run prints its summary, or run `drift-stream report {url}`)")


def _settled_summary(run_dir: str, run: RunDirectory, manifest: dict | None,
                     storage_options: dict | None) -> RunSummary | None:
    """The summary of a complete score run from its manifest's `summary` block (no data read), or None when the
    manifest has none or a marker has gone since it was written (one listing of the markers)."""
    if not manifest or not manifest.get("complete") or "summary" not in manifest:
        return None
    if len(run.completed_indexes()) != len(manifest.get("input_files") or ()):
        return None
    return _recorded_summary(str(run_dir), manifest, run.fs, run.root, storage_options)


def _recorded_summary(run_dir: str, manifest: dict, run_fs, run_root: str, storage_options: dict | None
                      ) -> RunSummary:
    """The summary a complete score run's manifest records (its `summary` block and counts)."""
    stats, rho = summary_numbers(manifest["summary"])
    by_reason = manifest.get("rejected_by_reason") or {}
    rejects = dict(sorted(by_reason.items(), key=lambda kv: -kv[1]))  # as gather: most first (ties by name)
    return RunSummary(run_dir=str(run_dir), manifest=manifest, rows_scored=int(manifest["rows_scored"]),
                      score_stats=stats, hist_counts=np.zeros(0), hist_edges=np.zeros(1), spearman=rho, scatter={},
                      debias=find_debias(manifest), rejects=rejects,
                      bank=_bank_info(manifest, run_fs, run_root, storage_options))


def _gap_text(gap: Any) -> str:
    if isinstance(gap, dict) and "gap" in gap:
        return f"{_fmt(gap['gap'], 3)} over {_fmt(gap.get('num_queries'))} queries"
    if isinstance(gap, dict):
        return ", ".join(f"{k} {_fmt(v, 3)}" for k, v in gap.items())
    return _fmt(gap, 3)


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
