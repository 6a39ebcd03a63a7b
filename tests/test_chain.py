"""Filters in sequence (refine --prefilter): two real scored runs of one pool, the refine against an explicit
computation joined on id."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import ConfigError
from drift_stream.refine.chain import Prefilter
from drift_stream.refine.policies import refine_run
from drift_stream.scoring.build import build_scorer

N = 60


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    model = save_tiny_model(root / "model", arch="llama", seed=1)
    rows = [{"id": f"r{i:03d}", "messages": [{"role": "user", "content": f"What is {i} + {i % 7}?"},
                                             {"role": "assistant", "content": f"{i} + {i % 7} = {i + i % 7}" + "!" * (i % 5)}]}
            for i in range(N)]
    pool = root / "pool"
    pool.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:35]), pool / "a.parquet")  # two input files: two shards per run
    pq.write_table(pa.Table.from_pylist(rows[35:]), pool / "b.parquet")
    out = {}
    for name in ("loss", "random"):
        scorer = build_scorer(name, model=str(model), batch_size=16, seed=3)
        run_score(RunConfig(data=(str(pool / "a.parquet"), str(pool / "b.parquet")), out=str(root / name)), scorer,
                  progress=False)
        table = pq.read_table(str(root / name / "data"))
        out[name] = dict(zip(table.column("id").to_pylist(), table.column("drift_score").to_pylist()))
        assert len(out[name]) == N
    return root, out


def survivors(scores: dict, drop_worst: float) -> set:
    """Rows kept after dropping the worst round(X * N) by (score desc, id asc) order: the top N - k."""
    order = sorted(scores, key=lambda i: (-scores[i], i))
    k = int(np.floor(drop_worst * len(order) + 0.5))
    return set(order[: len(order) - k])


def test_drop_worst_by_loss_then_top_by_another_score(runs, tmp_path):
    root, scores = runs
    manifest = refine_run(str(root / "random"), "top:0.5", str(tmp_path / "out"), progress=False,
                          prefilters=[Prefilter(str(root / "loss"), 0.2)])
    alive = survivors(scores["loss"], 0.2)
    assert len(alive) == 48
    ranked = sorted(alive, key=lambda i: (-scores["random"][i], i))
    expected = set(ranked[:24])  # top:0.5 of the 48 survivors
    kept = pq.read_table(str(tmp_path / "out" / "data")).column("id").to_pylist()
    assert set(kept) == expected and len(kept) == 24
    assert manifest["rows_in"] == N and manifest["rows_after_prefilters"] == 48 and manifest["rows_kept"] == 24
    info = manifest["prefilters"][0]
    assert info["rows_dropped"] == 12 and info["rows_missing"] == 0 and info["rows_kept_of_refined_run"] == 48
    assert manifest["config"]["prefilters"] == [{"run": str(root / "loss"), "drop_worst": 0.2}]
    # the plain top:0.5 keeps other rows: the prefilter changed the selection
    plain = set(sorted(scores["random"], key=lambda i: (-scores["random"][i], i))[:30])
    assert plain != set(kept)


def test_weights_have_mean_one_over_the_survivors_and_dropped_rows_are_not_written(runs, tmp_path):
    root, scores = runs
    refine_run(str(root / "loss"), "weights", str(tmp_path / "w"), progress=False, temperature=0.7, weight_map="exp_z",
               prefilters=[(str(root / "random"), 0.25), (str(root / "loss"), 0.1)])
    alive = survivors(scores["random"], 0.25) & survivors(scores["loss"], 0.1)
    table = pq.read_table(str(tmp_path / "w" / "data")).to_pydict()
    assert set(table["id"]) == alive and len(table["id"]) == len(alive)
    s = np.array([scores["loss"][i] for i in table["id"]], dtype=np.float64)
    z = (s - s.mean()) / s.std()
    expected = np.exp(z / 0.7) / np.exp(z / 0.7).mean()
    np.testing.assert_allclose(table["weight"], expected, rtol=1e-5)


def test_keep_all_marks_prefiltered_rows_and_repeat_gives_them_no_copy(runs, tmp_path):
    root, scores = runs
    pre = [(str(root / "loss"), 0.3)]
    alive = survivors(scores["loss"], 0.3)
    refine_run(str(root / "random"), "threshold:0.5", str(tmp_path / "t"), keep_all=True, progress=False,
               prefilters=pre)
    table = pq.read_table(str(tmp_path / "t" / "data")).to_pydict()
    assert len(table["id"]) == N
    for i, keep in zip(table["id"], table["keep"]):
        assert keep == (i in alive and scores["random"][i] > 0.5)
    refine_run(str(root / "random"), "repeat", str(tmp_path / "r"), progress=False, prefilters=pre)
    copies = pq.read_table(str(tmp_path / "r" / "data")).column("id").to_pylist()
    assert set(copies) <= alive and len(set(copies)) > 0


def test_prefilter_config_errors_and_cli(runs, tmp_path):
    root, _ = runs
    with pytest.raises(ConfigError, match="fraction in"):
        Prefilter("x", 1.0)
    with pytest.raises(ConfigError, match="must be a number"):
        Prefilter.coerce(("x", "a fifth"))
    with pytest.raises(ConfigError, match="does not combine"):
        refine_run(str(root / "random"), "top:0.5", str(tmp_path / "s"), stratify_by=("id",), progress=False,
                   prefilters=[(str(root / "loss"), 0.2)])
    from drift_stream.cli.main import main

    assert main(["refine", str(root / "random"), "--policy", "top:0.5", "--out", str(tmp_path / "cli"),
                 "--prefilter", str(root / "loss"), "0.2", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["rows_after_prefilters"] == 48 and manifest["rows_kept"] == 24
    library = refine_run(str(root / "random"), "top:0.5", str(tmp_path / "lib"), progress=False,
                         prefilters=[Prefilter(str(root / "loss"), 0.2)])
    assert pq.read_table(str(tmp_path / "cli" / "data")).column("id").to_pylist() == \
        pq.read_table(str(tmp_path / "lib" / "data")).column("id").to_pylist()
    assert library["prefilters"] == manifest["prefilters"]
