"""The HTML report and terminal summary on synthetic run directories; Spearman against scipy."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_refine import MESSAGES, mark_complete, write_run

from drift_stream.errors import InputError
from drift_stream.refine.policies import refine_run
from drift_stream.refine.report import (
    _extreme_rows,
    gather,
    summarize_run,
    write_report,
)
from drift_stream.refine.report_html import render_example
from drift_stream.scoring.stats import rankdata, spearman


def write_bank(path, rates: dict[str, tuple[int, int]], gap: float = 0.8) -> None:
    """The fields of schemas/bank_manifest.schema.json the report reads; (0, 0) is a query with no verified rollout."""
    path.mkdir(parents=True)
    queries = [{"id": q, "correct": c, "incorrect": w, "failed": 8 - c - w,
                "pass_rate": c / (c + w) if c + w else None} for q, (c, w) in rates.items()]
    total = sum(c + w for c, w in rates.values())
    (path / "manifest.json").write_text(json.dumps({
        "queries": queries, "pass_rate": sum(c for c, _ in rates.values()) / total,
        "proximity_gap": {"gap": gap, "num_queries": len(rates), "rollout_loss": 0.4, "reference_loss": 0.4 + gap}}))


def test_rankdata_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=500), 1)  # many ties
    y = 0.5 * x + rng.normal(size=500)
    np.testing.assert_array_equal(rankdata(x), stats.rankdata(x, method="average"))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    z = rng.lognormal(size=500)
    assert spearman(z, -np.log(z)) == pytest.approx(-1.0, abs=1e-12)
    with_nan = x.copy()
    with_nan[:5] = np.nan
    assert spearman(with_nan, y) == pytest.approx(stats.spearmanr(x[5:], y[5:]).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(10), y[:10])) and np.isnan(spearman([1.0], [2.0]))


@pytest.mark.parametrize("n,k", [(50, 5), (7, 5), (5, 5), (1, 3), (0, 3), (40, 0)])
def test_extreme_rows_match_an_explicit_sort(n, k):
    score = np.round(np.random.default_rng(n).normal(size=n), 0).astype(np.float32)  # heavy ties
    top, bottom = _extreme_rows(score, k)
    by_desc = sorted(range(n), key=lambda i: (-score[i], i))
    assert top == by_desc[:min(k, n)]
    rest = sorted(set(range(n)) - set(top), key=lambda i: (score[i], i))
    assert bottom == rest[:min(k, n - len(top))] and not set(top) & set(bottom)


def test_report_has_every_section_and_right_numbers(tmp_path):
    bank = tmp_path / "bank"
    write_bank(bank, {"q0": (8, 0), "q1": (3, 5), "q2": (0, 8), "q3": (2, 5), "q4": (0, 0)}, gap=0.8)
    full = write_run(str(tmp_path / "run"), raw=True, bank=str(bank))
    out = write_report(str(tmp_path / "run"), top_k=5)
    assert out == f"{tmp_path / 'run'}/report.html"
    page = (tmp_path / "run" / "report.html").read_text()
    for section in ('id="scores"', 'id="correlations"', 'id="bank"', 'id="top"', 'id="bottom"', 'id="rejects"'):
        assert section in page
    assert page.count("<svg") == 1 + 4 + 1  # histogram, 2 x (score, raw) scatters, pass rates
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    score = full["drift_score"].to_numpy().astype(np.float64)
    norm = full["drift_grad_norm"].to_numpy().astype(np.float64)
    raw = full["drift_raw_score"].to_numpy().astype(np.float64)
    rho = spearman(score, norm)
    assert f"{rho:.3g}" in page and f"{spearman(raw, norm):.3g}" in page
    assert "spearman_score_vs_norm_after" in page and "calibration_rows" in page  # scorer_info.debias
    # pass rates 1, 3/8, 0, 2/7 (q4 has none): one all-wrong, one all-right query; pooled 13/31
    assert re.search(r"verified rollouts</td><td class=\"num\">4</td>", page)
    assert re.search(rf"per-query pass rate</td><td class=\"num\">{(1 + 3 / 8 + 2 / 7) / 4:.4g}</td>", page)
    assert re.search(r"all wrong.*?<td class=\"num\">1</td>", page)
    assert re.search(rf"over all rollouts</td><td class=\"num\">{13 / 31:.4g}</td>", page)
    assert re.search(r"<td>reference_loss</td><td class=\"num\">1.2</td>", page)
    # rejects by reason kind: too_long 2, empty_response 1
    assert re.search(r"<td>too_long</td><td class=\"num\">2</td>", page)
    assert re.search(r"<td>empty_response</td><td class=\"num\">1</td>", page)
    # top example first: the highest score, with its chat text escaped
    best = int(np.argmax(score))
    row_no = full["row_no"][best].as_py()
    top_block = page[page.index('id="top"'):page.index('id="bottom"')]
    assert f"What is {row_no} + 1? &lt;b&gt;&amp;&lt;/b&gt;" in top_block
    assert "<b>&</b>" not in page
    assert top_block.count('class="example"') == 5


def test_report_escapes_hostile_text_and_handles_no_bank(tmp_path):
    root = tmp_path / "run"
    (root / "data").mkdir(parents=True)
    evil = '<script>alert("x")</script>'
    pq.write_table(pa.table({
        "id": [evil, "b", "c"], "text": [evil, "plain & simple", "x" * 5000],
        "drift_score": pa.array([3.0, 1.0, -2.0], pa.float32()),
        "drift_grad_norm": pa.array([1.0, 2.0, 3.0], pa.float32()),
        "drift_num_tokens": pa.array([5, 6, 7], pa.int32())}), root / "data" / "train-00000-of-00001.parquet")
    mark_complete(str(root), [3])
    write_report(str(root), str(tmp_path / "r.html"), top_k=2)
    page = (tmp_path / "r.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "names no bank" in page and "No rejected rows." in page
    assert "3,500 more characters" in page  # long text truncated
    bottom = page[page.index('id="bottom"'):page.index('id="rejects"')]
    assert bottom.count('class="example"') == 1 and "xxxx" in bottom  # 3 rows, top 2: bottom gets the rest


def test_render_example_formats():
    chat = render_example({"messages": [{"role": "user", "content": "hi <you>"},
                                        {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]})
    assert 'class="turn user"' in chat and "hi &lt;you&gt;" in chat and "<pre>yo</pre>" in chat
    sharegpt = render_example({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert 'class="turn human"' in sharegpt and 'class="turn gpt"' in sharegpt
    pc = render_example({"prompt": "2+2=", "completion": "4"})
    assert 'class="turn prompt"' in pc and "<pre>4</pre>" in pc
    conv_pc = render_example({"prompt": [{"role": "user", "content": "2+2"}],
                              "completion": [{"role": "assistant", "content": "4"}]})
    assert 'class="turn user"' in conv_pc and 'class="turn assistant"' in conv_pc
    alpaca = render_example({"instruction": "add", "input": "2 2", "output": "4"})
    assert [m for m in re.findall(r'class="turn (\w+)"', alpaca)] == ["instruction", "input", "output"]
    other = render_example({"id": "x", "body": "free", "drift_score": 1.0})
    assert "free" in other and "drift_score" not in other


def test_summarize_run_is_short_and_true(tmp_path):
    bank = tmp_path / "bank"
    write_bank(bank, {"q0": (8, 0), "q1": (4, 4)}, gap=0.5)
    full = write_run(str(tmp_path / "run"), bank=str(bank))
    text = summarize_run(str(tmp_path / "run"))
    lines = text.splitlines()
    assert 4 <= len(lines) <= 8
    n = full.num_rows
    assert f"rows in {n + 3:,} = scored {n:,} + rejected 3 (too_long: 2, empty_response: 1)" in text
    score = full["drift_score"].to_numpy().astype(np.float64)
    assert f"mean {score.mean():.4g}" in text and f"positive {100 * (score > 0).mean():.3g}%" in text
    assert f"drift_score vs drift_grad_norm {spearman(score, full['drift_grad_norm'].to_numpy()):.3g}" in text
    assert "bank: 2 queries, mean pass rate 0.75" in text and "proximity gap 0.5 over 2 queries" in text
    assert "debias: beta 1 (fixed)" in text


@pytest.mark.parametrize("max_rows", [1_000_000, 30])  # 30: correlations on every 4th of 100 rows
def test_the_summary_of_a_settled_run_reads_its_manifest_and_prints_what_the_data_gives(tmp_path, monkeypatch,
                                                                                        max_rows):
    """Issue 23: the process that settles a run records the summary's numbers from its one scan of the data
    (engines/run_summary.py); summarize_run then reads no data shard and prints exactly what `gather` computes
    from the data (score stats, Spearman of the score and of the raw score, rejects, debias, bank)."""
    import drift_stream.engines.run_summary as run_summary
    import drift_stream.refine.report as report
    from drift_stream.io.run_dir import RunDirectory
    from drift_stream.io.run_reader import CompletedShards, read_completed_shards

    bank = tmp_path / "bank"
    write_bank(bank, {"q0": (8, 0), "q1": (4, 4)})
    run = tmp_path / "run"
    full = write_run(str(run), raw=True, bank=str(bank))  # beta 0.93: the raw score's correlations too
    for module in (report, run_summary):
        monkeypatch.setattr(module, "MAX_SPEARMAN_ROWS", max_rows)
    from_data = summarize_run(str(run))  # the manifest has no summary: gather reads the data
    manifest = json.loads((run / "manifest.json").read_text())
    found, manifest["summary"] = run_summary.scan_complete_run(read_completed_shards(RunDirectory(str(run))),
                                                               manifest)
    repeats = {i: n for i, n in Counter(full["id"].to_pylist()).items() if n > 1}
    assert (found["ids"], found["rows"]) == (len(repeats), sum(repeats.values()))
    s = gather(str(run), top_k=0)
    stats, rho = run_summary.summary_numbers(json.loads(json.dumps(manifest["summary"])))
    assert stats == s.score_stats and rho == s.spearman and "raw score~drift_grad_norm" in rho  # bit for bit
    (run / "manifest.json").write_text(json.dumps(manifest))

    def no_data(*args, **kwargs):
        raise AssertionError("the summary of a settled run read a data or rejects shard")

    monkeypatch.setattr(CompletedShards, "scan", no_data)
    monkeypatch.setattr(CompletedShards, "open_data", no_data)
    assert summarize_run(str(run)) == from_data
    assert summarize_run(str(run), allow_incomplete=True) == from_data
    (run / "completions" / "00003.json").unlink()  # a marker removed since the run settled: read the data again
    with pytest.raises(AssertionError, match="read a data"):
        summarize_run(str(run), allow_incomplete=True)


def test_bank_pass_rates_from_rollouts_parquet(tmp_path):
    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "manifest.json").write_text(json.dumps({"version": "0.1.0", "queries": []}))
    pq.write_table(pa.table({"query_id": ["a", "a", "b", "b", "b", "b"], "reward": [1.0, 0.0, 1.0, 1.0, 1.0, 0.0],
                             "messages": pa.array([[]] * 6, MESSAGES)}), bank / "rollouts.parquet")
    write_run(str(tmp_path / "run"), bank=str(bank))
    assert "bank: 2 queries, mean pass rate 0.625" in summarize_run(str(tmp_path / "run"))


def test_report_to_memory_url(tmp_path):
    import fsspec

    write_run(str(tmp_path / "run"))
    fs = fsspec.filesystem("memory")
    try:
        out = write_report(str(tmp_path / "run"), "memory://reports/r.html")
        assert out == "memory://reports/r.html" and b'id="top"' in fs.cat("/reports/r.html")
    finally:
        fs.rm("/reports", recursive=True)


def test_large_runs_correlate_on_a_systematic_sample(tmp_path, monkeypatch):
    import drift_stream.refine.report as report

    full = write_run(str(tmp_path / "run"))  # 100 rows
    monkeypatch.setattr(report, "MAX_SPEARMAN_ROWS", 30)  # -> every 4th row
    s = report.gather(str(tmp_path / "run"), top_k=3)
    score, norm = full["drift_score"].to_numpy(), full["drift_grad_norm"].to_numpy()
    assert s.spearman["drift_score~drift_grad_norm"] == pytest.approx(spearman(score[::4], norm[::4]), abs=1e-12)
    assert s.rows_scored == 100 and int(s.hist_counts.sum()) == 100  # the histogram still sees every row
    assert [r["row_no"] for r in s.top] == sorted(range(100), key=lambda i: (-score[i], i))[:3]


def test_report_of_a_refined_run_shows_its_weights(tmp_path):
    full = write_run(str(tmp_path / "run"))
    m = refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "w"), weight_map="exp_z", temperature=0.5,
                   progress=False)
    out = write_report(str(tmp_path / "w"), top_k=3)
    assert out == f"{tmp_path / 'w'}/report.html"
    page = (tmp_path / "w" / "report.html").read_text()
    section = page[page.index('id="refine"'):page.index('id="correlations"')]
    assert "Refinement (weights)" in section and "<svg" in section and "histogram of weight" in section
    w = pq.read_table(tmp_path / "w" / "data").column("weight").to_numpy().astype(np.float64)
    ws = m["weight_summary"]
    assert f'max weight (mean 1)</td><td class="num">{w.max():.4g}</td>' in section
    assert f'{w.sum() ** 2 / np.square(w).sum():.4g}</td>' in section
    assert f"{100 * ws['effective_sample_share']:.1f}%" in section and "<td>exp_z</td>" in section
    # the histogram: 40 bars over [0, max weight] holding every row written
    s = gather(str(tmp_path / "w"), top_k=0)
    counts, edges = np.histogram(w, bins=40, range=(0.0, w.max()))
    assert s.refine["weight_counts"].tolist() == counts.tolist() and int(counts.sum()) == full.num_rows
    np.testing.assert_array_equal(s.refine["weight_edges"], edges)
    assert s.rows_scored == full.num_rows and s.run_dir == str(tmp_path / "run")  # the score sections: source run
    assert 'id="top"' in page and page.count("<svg") == 1 + 4 + 1  # scores, 2 x (score, raw) scatters, weights

    text = summarize_run(str(tmp_path / "w"))
    assert f"refine {tmp_path / 'w'}: policy weights, {full.num_rows} rows written" in text
    assert f"weights (exp_z map, T 0.5): max {w.max():.3g} (mean 1)" in text
    assert f"top 1% of rows carry {100 * ws['top_1pct_weight_share']:.3g}% of the weight" in text


def test_report_of_repeat_and_filter_refines(tmp_path):
    write_run(str(tmp_path / "run"))
    refine_run(str(tmp_path / "run"), "repeat", str(tmp_path / "r"), progress=False)
    refine_run(str(tmp_path / "run"), "top:0.3", str(tmp_path / "t"), progress=False)
    write_report(str(tmp_path / "r"))
    page = (tmp_path / "r" / "report.html").read_text()
    section = page[page.index('id="refine"'):page.index('id="correlations"')]
    assert "expected copies" in section and "<svg" not in section and "<td>rank</td>" in section
    write_report(str(tmp_path / "t"))
    page = (tmp_path / "t" / "report.html").read_text()
    section = page[page.index('id="refine"'):page.index('id="correlations"')]
    assert "Refinement (top:0.3)" in section and "<svg" not in section and "weight map" not in section
    assert 'rows kept</td><td class="num">30</td>' in section
    assert "weights (" not in summarize_run(str(tmp_path / "t"))


def test_report_of_a_refine_whose_source_run_is_gone(tmp_path):
    import shutil

    write_run(str(tmp_path / "run"))
    refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "w"), progress=False)
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(InputError, match=f"{tmp_path / 'w'} is a refine of {tmp_path / 'run'}, which cannot be read"):
        write_report(str(tmp_path / "w"))
