"""The refinement benchmark's --quick mode end to end (about 3.5 minutes on 2 idle cores), and its helpers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine_eval")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "refine_eval.py"), "--quick", "--workdir", str(root / "work"),
         "--out", str(root / "out")],
        capture_output=True, text=True, timeout=1500,  # ~3.5 min alone; much longer on a shared machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "out" / "results.json").read_text()), root / "out"


def test_quick_run_writes_every_method_with_valid_numbers(quick):
    import refine_eval

    result, out = quick
    assert (out / "results.md").read_text().startswith("# Refinement benchmark (quick)")
    assert (out / "results.png").stat().st_size > 1000
    methods = set(refine_eval.resolve_methods(refine_eval.QUICK)) | set(refine_eval.ABLATIONS)
    main_rows = [r for r in result["rows"] if not r.get("extra_seed")]
    assert {r["method"] for r in main_rows} == methods
    assert len(main_rows) == len(methods) * len(refine_eval.QUICK.seeds)
    for row in result["rows"]:
        assert {"method", "seed", "target_acc", "nontarget_acc", "rows_kept", "kept_shares"} <= set(row)
        for key in ("target_acc", "nontarget_acc", "dev_target_acc", "dev_nontarget_acc"):
            assert 0.0 <= row[key] <= 1.0
        assert math.isclose(sum(row["kept_shares"].values()), 1.0, rel_tol=1e-9)
    assert result["machine"] and result["versions"]["torch"]


def test_quick_run_selections_match_their_definition(quick):
    result, _ = quick
    n = result["config"]["pool_size"]
    frac = result["config"]["fraction"]
    rows = {r["method"]: r for r in result["rows"] if r["seed"] == 0}
    assert rows["full"]["rows_kept"] == n
    assert rows["full"]["kept_shares"] == pytest.approx(result["pool_shares"], abs=1e-12)
    assert rows["oracle clean"]["corrupted_share"] == 0.0
    assert rows["oracle clean target-tasks"]["corrupted_share"] == 0.0
    assert rows["random"]["rows_kept"] == math.floor(frac * n + 0.5)
    assert rows["drift top:0.25"]["rows_kept"] == math.floor(0.25 * n + 0.5)
    assert rows["drift weights"]["rows_kept"] == n
    survivors = n - math.floor(0.2 * n + 0.5)  # loss prefilter 0.2, then the DRIFT selection over the rest
    assert rows["drift after loss-prefilter 0.2, top:0.25"]["rows_kept"] == math.floor(0.25 * survivors + 0.5)
    assert rows["drift after loss-prefilter 0.2, weights"]["rows_kept"] == survivors


def test_quick_run_library_path_selects_the_cache_rows(quick):
    result, _ = quick
    check = result["library_check"]
    assert check["rows_scored"] == result["config"]["pool_size"]
    assert check["same_rows_kept"], check
    assert check["max_abs_score_diff"] <= 1e-4 * max(check["score_scale"], 1e-12), check
    v3 = check["v3"]  # the library's contrast options give the scores of the benchmark's own implementation
    assert v3["same_rows_kept"], v3
    assert v3["max_abs_score_diff"] <= 1e-4 * max(v3["score_scale"], 1e-12), v3
    assert v3["bank_contrast"]["adaptive"] == v3["cache_adaptive"]


def test_stratified_top_keeps_each_stratum_fraction():
    import refine_lib as rl

    rng = np.random.default_rng(0)
    scores = rng.normal(size=40)
    strata = ["a"] * 30 + ["b"] * 10
    scores[30:] += 10.0  # plain top:0.25 would keep only stratum b
    ids = [f"r{i:02d}" for i in range(40)]
    plain = rl.top_mask(scores, 0.25, ids)
    assert plain[30:].sum() == 10 and plain[:30].sum() == 0
    strat = rl.stratified_top_mask(scores, 0.25, ids, strata)
    assert strat.sum() == 10  # floor(0.25 * 40 + 0.5), shared 7.5 : 2.5 by largest remainders (tie: name order)
    assert strat[:30].sum() == 8 and strat[30:].sum() == 2
    assert set(np.flatnonzero(strat[:30])) == set(np.argsort(-scores[:30])[:8])


def test_roc_auc_matches_pairwise_count():
    import refine_lib as rl

    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=30), 1)  # ties on purpose
    pos = rng.random(30) < 0.4
    pairs = [(a, b) for a in s[pos] for b in s[~pos]]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert rl.roc_auc(s, pos) == pytest.approx(expected, abs=1e-12)


def test_softmax_weights_mean_one_and_monotone():
    import refine_lib as rl

    s = np.array([0.3, -1.0, 2.0, 0.3, 5.0])
    w = rl.softmax_weights(s)
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    z = (s - s.mean()) / s.std()
    np.testing.assert_allclose(w, np.exp(z) / np.exp(z).mean(), rtol=1e-12)


def test_quick_run_chooses_on_dev_and_ablates_the_choice(quick):
    import refine_eval

    result, out = quick
    choice = result["choice"]
    methods = {k: (v["scorer"], v["selection"], v["group"]) for k, v in result["methods"].items()}
    assert choice["chosen"] == refine_eval.choose_best(result["rows"], methods)["chosen"]
    assert result["methods"][choice["chosen"]]["group"] == "drift"
    chosen = result["methods"][choice["chosen"]]
    for name, change in refine_eval.ABLATIONS.items():
        info = result["methods"][name]
        assert info["selection"] == chosen["selection"] and info["scorer"] == f"{chosen['scorer']}|{name}"
        variant = result["drift_variants"][info["scorer"]]
        assert variant == {**result["drift_variants"][chosen["scorer"]], **change}
    assert "Against the issue's target" in (out / "results.md").read_text()


def test_choose_best_uses_dev_only_and_respects_the_nontarget_slack():
    import refine_eval

    methods = {"full": ("none", "all", "baseline"), "a": ("drift", "top:0.25", "drift"),
               "b": ("drift", "weights", "drift"), "c": ("drift", "top:0.1", "drift")}
    rows = []
    for seed in (0, 1):
        rows.append({"method": "full", "seed": seed, "dev_target_acc": 0.5, "dev_nontarget_acc": 0.50,
                     "target_acc": 0.0, "nontarget_acc": 0.0})
        # a: best dev target but drops dev non-target by 5 points; b: next best, within the slack; c: worse
        rows.append({"method": "a", "seed": seed, "dev_target_acc": 0.70, "dev_nontarget_acc": 0.45,
                     "target_acc": 0.0, "nontarget_acc": 0.0})
        rows.append({"method": "b", "seed": seed, "dev_target_acc": 0.60 + 0.02 * seed, "dev_nontarget_acc": 0.49,
                     "target_acc": 0.0, "nontarget_acc": 0.0})
        rows.append({"method": "c", "seed": seed, "dev_target_acc": 0.55, "dev_nontarget_acc": 0.52,
                     "target_acc": 1.0, "nontarget_acc": 1.0})  # test numbers must not matter
    choice = refine_eval.choose_best(rows, methods)
    assert choice["chosen"] == "b" and choice["eligible"] == ["b", "c"]
    assert choice["candidates"]["b"]["dev_target"] == pytest.approx(0.61)
    for r in rows:  # nobody within the slack: the best dev target wins
        if r["method"] in ("b", "c"):
            r["dev_nontarget_acc"] = 0.40
    assert refine_eval.choose_best(rows, methods)["chosen"] == "a"


def test_query_subset_balances_tasks_and_task_conditional_mean():
    import refine_lib as rl

    tasks = ["a"] * 5 + ["b"] * 3
    assert rl.query_subset(None, 8, tasks).all()
    assert rl.query_subset(3, 8, None).tolist() == [True] * 3 + [False] * 5
    assert np.flatnonzero(rl.query_subset(4, 8, tasks)).tolist() == [0, 1, 5, 6]
    assert np.flatnonzero(rl.query_subset(5, 8, tasks)).tolist() == [0, 1, 2, 5, 6]
    per_query = np.arange(12, dtype=float).reshape(3, 4)  # rows x queries
    out = rl.task_conditional_mean(per_query, ["a", "a", "b", "b"], ["a", "b", "other"])
    np.testing.assert_allclose(out, [np.mean([0, 1]), np.mean([6, 7]), np.mean([8, 9, 10, 11])])


def test_target_only_stratified_selection_keeps_target_rows_by_length_quartile():
    from types import SimpleNamespace

    import refine_eval

    rng = np.random.default_rng(2)
    tasks = ["basic_arithmetic"] * 40 + ["chain_sum"] * 40 + ["gcd"] * 20
    pool = [{"id": f"r{i:03d}", "task": t} for i, t in enumerate(tasks)]
    lengths = rng.integers(5, 60, size=len(pool))
    ctx = {"splits": SimpleNamespace(pool=pool), "pool_ex": [SimpleNamespace(loss_mask=[1] * int(n)) for n in lengths]}
    scores = rng.normal(size=len(pool))
    scores[80:] += 100.0  # the non-target rows score highest, and are still never kept
    keep = refine_eval.select(ctx, scores, "strat_len_target:0.25") > 0
    assert keep.sum() == 25 and not keep[80:].any()
    buckets = refine_eval.rl.length_buckets(lengths)
    for task in ("basic_arithmetic", "chain_sum"):
        for b in np.unique(buckets):
            members = np.flatnonzero((np.array(tasks) == task) & (buckets == b))
            kept = members[keep[members]]
            if len(kept):  # the kept rows of a stratum are its best-scored ones
                assert scores[kept].min() >= scores[np.setdiff1d(members, kept)].max(initial=-np.inf)


def test_quick_run_statistics_gaps_and_contribution_aucs(quick):
    import refine_eval

    result, out = quick
    st = result["statistics"]
    chosen = result["choice"]["chosen"]
    extra = [r for r in result["rows"] if r.get("extra_seed")]
    expected = {chosen} | {m for m in refine_eval.STAT_COMPARATORS} | set(refine_eval.ABLATIONS)
    assert {r["method"] for r in extra} == expected
    assert {r["seed"] for r in extra} == set(refine_eval.QUICK.stat_seeds)
    acc = {(r["method"], r["seed"]): r["target_acc"] for r in result["rows"]}
    for entry in st["target"]:  # paired differences recomputed from the rows
        d = [acc[chosen, s] - acc[entry["comparator"], s] for s in entry["seeds"]]
        assert entry["seeds"] == sorted(set(refine_eval.QUICK.seeds) | set(refine_eval.QUICK.stat_seeds))
        assert entry["diff"] == pytest.approx(np.mean(d), abs=1e-12)
        assert entry["diff_se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(len(d)), abs=1e-12)
    assert set(result["proximity_gaps"]) == {"worked", "prose", "answer"}
    for g in result["proximity_gaps"].values():
        assert g["gap"] == pytest.approx(g["reference_loss"] - g["rollout_loss"], abs=1e-9)
    n_queries = 2 * refine_eval.QUICK.queries_per_task
    assert sum(result["query_outcomes"].values()) == n_queries
    drift = result["diagnostics"]["drift"]
    assert sum(drift[f"queries_{k}"] for k in ("all_wrong", "all_right", "mixed")) <= n_queries
    text = (out / "results.md").read_text()
    assert "Statistics over seeds" in text and "Proximity gap per reference style" in text


def test_query_targets_follow_the_library_contrast_rules():
    import refine_lib as rl

    from drift_stream.bank.contrast import contrast_plan
    from drift_stream.bank.targets import signed_weights

    rng = np.random.default_rng(4)
    m, k, d = 5, 3, 6
    q = np.repeat(np.arange(m), k)
    idx = np.tile(np.arange(k), m)
    rewards = np.array([1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0], dtype=float)  # q1, q4 all wrong; q2 all right
    feats, refs, hyb = rng.normal(size=(m * k, d)), rng.normal(size=(m, d)), rng.normal(size=(m, d))
    for mode in ("keep", "drop", "reference"):
        variant = rl.DriftVariant(no_contrast=mode, query_weighting="learnability")
        g, kept, pass_rate = rl.query_targets(variant, feats, q, idx, rewards, refs, hybrid_feats=hyb)
        exp_g, exp_kept, exp_p = [], [], []
        for j in range(m):
            r = rewards[q == j].tolist()
            targets, why, use_ref = contrast_plan(r, 1.0, mode, True)
            if why:
                continue
            signs, _ = signed_weights(targets, "sign")
            stack = np.concatenate([feats[q == j]] + ([hyb[j:j + 1]] if use_ref else []))
            exp_g.append(np.asarray(signs) @ stack / len(signs))
            exp_kept.append(j)
            exp_p.append(np.mean([t >= 1.0 for t in targets]))
        assert kept.tolist() == exp_kept, mode
        np.testing.assert_allclose(g, np.array(exp_g), rtol=1e-12)
        np.testing.assert_allclose(pass_rate, exp_p, rtol=1e-12)


def test_chained_selection_drops_the_worst_then_selects_among_the_rest():
    from types import SimpleNamespace

    import refine_eval

    rng = np.random.default_rng(5)
    n = 40
    pool = [{"id": f"r{i:02d}", "task": "chain_sum"} for i in range(n)]
    ctx = {"splits": SimpleNamespace(pool=pool), "pool_ex": [SimpleNamespace(loss_mask=[1] * 5)] * n}
    drift, loss = rng.normal(size=n), rng.normal(size=n)
    cached = {("loss", None): loss}
    w = refine_eval.select(ctx, drift, "pre:loss:0.25|top:0.5", 0, cached)
    alive = np.argsort(-loss, kind="stable")[:30]  # drop the worst 10 by loss (no ties)
    expected = alive[np.argsort(-drift[alive], kind="stable")[:15]]
    assert set(np.flatnonzero(w)) == set(expected.tolist())
    w = refine_eval.select(ctx, drift, "pre:loss:0.25|weights", 0, cached)
    assert (w[np.setdiff1d(np.arange(n), alive)] == 0).all()
    z = (drift[alive] - drift[alive].mean()) / drift[alive].std()
    np.testing.assert_allclose(w[alive], np.exp(z) / np.exp(z).mean(), rtol=1e-12)


@pytest.mark.slow
def test_quick_second_round_runs_two_rounds_for_the_choice_and_the_best_baseline(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "refine_eval.py"), "--quick", "--workdir", str(tmp_path / "work"),
         "--out", str(tmp_path / "out"), "--methods", "full", "drift weights", "loss", "ablations", "--second-round",
         "--no-library-check", "--stat-seeds"],
        capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    two = {r["method"]: r for r in result["rows"] if r["method"].endswith(", 2 rounds")}
    assert set(two) == {"drift weights, 2 rounds", "loss, 2 rounds"}  # the choice, and the only non-full baseline
    for name, row in two.items():
        assert result["methods"][name]["group"] == "round2"
        assert 0.0 <= row["target_acc"] <= 1.0 and 0.0 <= row["round1"]["target_acc"] <= 1.0
        assert 0.0 <= row["overlap_rounds"] <= 1.0
    assert two["loss, 2 rounds"]["rows_kept"] == math.floor(0.25 * result["config"]["pool_size"] + 0.5)
    assert not any(r.get("extra_seed") for r in result["rows"])  # --stat-seeds with no value: none
