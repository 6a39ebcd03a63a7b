"""The weights policy's maps (rank, clipped_z, exp_z) against explicit computations (scipy), and the spread of the
weights the refine manifest records. Real run directories of parquet shards (test_refine.write_run)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm, rankdata
from test_refine import explicit_weights, mark_complete, read_out, write_run

from drift_stream.errors import RunDirMismatchError
from drift_stream.refine.chain import Prefilter
from drift_stream.refine.policies import refine_run
from drift_stream.refine.report import weight_summary_line

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "refine_manifest.schema.json"
# The weight column is float32: rounding to nearest moves a weight by at most 2^-24 of itself (5.96e-8); the float64
# maps agree with the explicit ones to ~1e-15. So written vs explicit: rtol 6e-8.
F32 = 6e-8


def explicit_rank(score: np.ndarray, temperature: float) -> np.ndarray:
    """q = Phi^-1((rank - 0.5) / N), ties at their average rank; exp(q / T) / mean."""
    q = norm.ppf((rankdata(score.astype(np.float64), method="average") - 0.5) / score.size)
    w = np.exp(q / temperature)
    return w / w.mean()


def explicit_clipped(score: np.ndarray, temperature: float, c: float) -> np.ndarray:
    s = score.astype(np.float64)
    w = np.exp(np.clip((s - s.mean()) / s.std(), -c, c) / temperature)
    return w / w.mean()


def scored_run(root: Path, score: np.ndarray, *, shards: int = 3, ids: list[str] | None = None) -> str:
    """A complete run directory with unique ids `r00000`.. (or `ids`) and these scores, split over `shards`."""
    ids = ids or [f"r{i:05d}" for i in range(score.size)]
    (root / "data").mkdir(parents=True)
    bounds = np.linspace(0, score.size, shards + 1).astype(int)
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(pa.table({"id": ids[a:b], "text": [f"row {j}" for j in range(a, b)],
                                 "drift_score": pa.array(score[a:b], pa.float32())}),
                       root / "data" / f"train-{i:05d}-of-{shards:05d}.parquet")
    mark_complete(str(root), [int(x) for x in np.diff(bounds)])
    return str(root)


def weights_by_id(out: str) -> dict[str, float]:
    t = pa.concat_tables(read_out(out))
    return dict(zip(t["id"].to_pylist(), t["weight"].to_numpy().astype(np.float64)))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_rank_map_exact_on_a_table_with_ties(tmp_path, temperature):
    full = write_run(str(tmp_path / "run"), sizes=(40, 0, 25, 35))  # scores rounded to 0.1; empty shard
    score = full["drift_score"].to_numpy()
    assert len(np.unique(score)) < score.size / 2  # many ties
    manifest = refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "w"), temperature=temperature,
                          progress=False)
    assert manifest["config"]["weight_map"] == "rank"  # the default
    t = pa.concat_tables(read_out(str(tmp_path / "w")))
    w = t["weight"].to_numpy().astype(np.float64)
    assert t["row_no"].to_pylist() == full["row_no"].to_pylist()
    np.testing.assert_allclose(w, explicit_rank(score, temperature), rtol=F32)
    for value in np.unique(score):  # tied scores, one weight
        assert len(set(w[score == value].tolist())) == 1


def test_rank_map_is_bounded_by_the_top_rank(tmp_path):
    """Distinct, heavy-tailed scores: the max weight is exp(Phi^-1(1 - 0.5 / N)) / mean, whatever the top score."""
    n = 500
    score = np.random.default_rng(0).standard_cauchy(n) ** 3  # tails far beyond any z-score's reach
    assert len(np.unique(score.astype(np.float32))) == n
    m = refine_run(scored_run(tmp_path / "run", score), "weights", str(tmp_path / "w"), progress=False)
    mean = np.exp(norm.ppf((np.arange(1, n + 1) - 0.5) / n)).mean()
    bound = np.exp(norm.ppf(1 - 0.5 / n)) / mean
    assert m["weight_summary"]["max_weight"] == pytest.approx(bound, rel=F32)
    assert max(weights_by_id(str(tmp_path / "w")).values()) == pytest.approx(bound, rel=F32)
    old = refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "z"), weight_map="exp_z", progress=False)
    assert bound < 14 and old["weight_summary"]["max_weight"] > 5 * bound  # 13.4; exp_z gives this run 98.5


def test_an_outlier_moves_other_weights_only_by_its_rank_shift(tmp_path):
    n = 400
    base = np.random.default_rng(1).normal(0.0, 1.0, n).astype(np.float32)
    runs = {}
    for name, extra in (("base", None), ("outlier", 1e4), ("just_above", float(base.max()) + 0.5)):
        score = base if extra is None else np.append(base, np.float32(extra))
        root = scored_run(tmp_path / name, score)
        for weight_map in ("rank", "exp_z"):
            refine_run(root, "weights", str(tmp_path / f"{name}_{weight_map}"), weight_map=weight_map,
                       progress=False)
            runs[name, weight_map] = weights_by_id(str(tmp_path / f"{name}_{weight_map}"))
    top = f"r{n:05d}"
    # rank: every other row keeps its rank r; only N grows to N + 1, so its weight is the explicit map on N + 1 rows
    out = runs["outlier", "rank"]
    rank = rankdata(base)
    mean = np.exp(norm.ppf((np.arange(1, n + 2) - 0.5) / (n + 1))).mean()
    expected = np.exp(norm.ppf((rank - 0.5) / (n + 1))) / mean
    np.testing.assert_allclose([out[f"r{i:05d}"] for i in range(n)], expected, rtol=F32)
    assert out[top] == pytest.approx(np.exp(norm.ppf(1 - 0.5 / (n + 1))) / mean, rel=F32)
    # how far the outlier lies above the rest does not matter at all
    assert out == runs["just_above", "rank"]
    # exp_z: the outlier (z ~ sqrt(N) = 20) takes nearly all the weight and every other row drops to ~0
    old = runs["outlier", "exp_z"]
    assert old[top] / (n + 1) > 0.99 and max(v for k, v in old.items() if k != top) < 1e-6


@pytest.mark.parametrize("clip_z,temperature", [(3.0, 1.0), (1.0, 0.5), (1.5, 2.0)])
def test_clipped_z_exact(tmp_path, clip_z, temperature):
    score = np.random.default_rng(2).standard_t(2, 300).astype(np.float32)  # heavy tails: the clip acts
    z = (score - score.astype(np.float64).mean()) / score.astype(np.float64).std()
    assert (np.abs(z) > clip_z).sum() > 5
    root = scored_run(tmp_path / "run", score)
    m = refine_run(root, "weights", str(tmp_path / "w"), weight_map="clipped_z", clip_z=clip_z,
                   temperature=temperature, progress=False)
    w = np.array([weights_by_id(str(tmp_path / "w"))[f"r{i:05d}"] for i in range(score.size)])
    np.testing.assert_allclose(w, explicit_clipped(score, temperature, clip_z), rtol=F32)
    assert w.max() / w.min() <= np.exp(2 * clip_z / temperature) * (1 + 2 * F32)
    assert m["config"]["clip_z"] == clip_z and m["weight_summary"]["clip_z"] == clip_z


@pytest.mark.parametrize("weight_map", ["rank", "clipped_z", "exp_z"])
def test_manifest_records_the_spread_of_the_weights(tmp_path, weight_map):
    full = write_run(str(tmp_path / "run"), sizes=(150, 0, 130, 120))
    score = full["drift_score"].to_numpy()
    explicit = {"rank": explicit_rank(score, 0.7), "clipped_z": explicit_clipped(score, 0.7, 3.0),
                "exp_z": explicit_weights(score, 0.7)}[weight_map]
    m = refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "w"), weight_map=weight_map, temperature=0.7,
                   progress=False)
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    s = m["weight_summary"]
    written = pa.concat_tables(read_out(str(tmp_path / "w")))["weight"].to_numpy().astype(np.float64)
    n, k = score.size, math.ceil(score.size / 100)
    assert (s["map"], s["temperature"], s["rows"], s["top_1pct_rows"]) == (weight_map, 0.7, n, k) and k == 4
    for w, rtol in ((written, 1e-12), (explicit, 4 * F32)):  # sums of float64: 1e-12; a ratio of sums: ~4 ulp32
        ess = w.sum() ** 2 / np.square(w).sum()
        assert s["max_weight"] == pytest.approx(w.max(), rel=rtol)
        assert s["effective_sample_size"] == pytest.approx(ess, rel=rtol)
        assert s["effective_sample_share"] == pytest.approx(ess / n, rel=rtol)
        assert s["top_1pct_weight_share"] == pytest.approx(np.sort(w)[-k:].sum() / w.sum(), rel=rtol)
    line = weight_summary_line(m)
    assert f"weights ({weight_map} map, T 0.7" in line and f"{s['effective_sample_size']:,.0f}" in line


def test_repeat_summarises_its_expected_copies_and_filters_record_none(tmp_path):
    full = write_run(str(tmp_path / "run"))
    m = refine_run(str(tmp_path / "run"), "repeat", str(tmp_path / "r"), seed=1, progress=False)
    w = explicit_rank(full["drift_score"].to_numpy(), 1.0)
    assert m["weight_summary"]["effective_sample_size"] == pytest.approx(w.sum() ** 2 / np.square(w).sum(),
                                                                         rel=4 * F32)
    assert weight_summary_line(m).startswith("expected copies (rank map, T 1)")
    copies = np.bincount(np.concatenate([t["row_no"].to_numpy() for t in read_out(str(tmp_path / "r"))]),
                         minlength=full.num_rows)
    assert np.all((copies == np.floor(w)) | (copies == np.floor(w) + 1))
    top = refine_run(str(tmp_path / "run"), "top:0.2", str(tmp_path / "t"), progress=False)
    assert top["weight_summary"] is None and weight_summary_line(top) is None


def test_rank_over_the_prefilter_survivors(tmp_path):
    """After --prefilter the rank map ranks the surviving rows among themselves (N = survivors)."""
    rng = np.random.default_rng(3)
    n = 200
    score = np.round(rng.normal(0, 1, n), 1).astype(np.float32)  # with ties
    main = scored_run(tmp_path / "main", score)
    other = rng.normal(0, 1, n).astype(np.float32)
    assert len(np.unique(other)) == n
    pre = scored_run(tmp_path / "pre", other, shards=2)
    m = refine_run(main, "weights", str(tmp_path / "w"), prefilters=[Prefilter(pre, 0.25)], temperature=0.8,
                   progress=False)
    alive = np.argsort(-other.astype(np.float64), kind="stable")[: n - 50]  # distinct scores: no id tie-break
    alive.sort()
    got = weights_by_id(str(tmp_path / "w"))
    assert sorted(got) == [f"r{i:05d}" for i in alive] and m["weight_summary"]["rows"] == 150
    np.testing.assert_allclose([got[f"r{i:05d}"] for i in alive], explicit_rank(score[alive], 0.8), rtol=F32)


def test_another_map_into_the_same_output_is_refused(tmp_path):
    write_run(str(tmp_path / "run"))
    refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "w"), progress=False)
    with pytest.raises(RunDirMismatchError, match="clipped_z"):
        refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "w"), weight_map="clipped_z", progress=False)


def test_equal_scores_weigh_one_under_every_map(tmp_path):
    root = scored_run(tmp_path / "run", np.full(30, 0.25, dtype=np.float32))
    for weight_map in ("rank", "clipped_z", "exp_z"):
        m = refine_run(root, "weights", str(tmp_path / weight_map), weight_map=weight_map, progress=False)
        assert set(weights_by_id(str(tmp_path / weight_map)).values()) == {1.0}
        assert m["weight_summary"]["effective_sample_share"] == 1.0 and m["weight_summary"]["max_weight"] == 1.0
