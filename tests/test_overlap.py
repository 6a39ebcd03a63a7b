"""Issue 23: tokenization of chunk i+1 on the prefetch thread while the model runs chunk i, and only the adapter's
columns turned into Python objects. Scores are bit-identical with and without the overlap."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.scoring.base import adapter_rows


@pytest.fixture(scope="module")
def loss_scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return lambda: build_scorer("loss", model=tiny_model_dir, adapter="messages", batch_size=3, max_tokens=96)


def pool(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": "q" * (1 + i % 7)},
                                         {"role": "assistant", "content": f"answer {i} " * (1 + i % 5)}],
             "meta": {"blob": "x" * 50, "n": i}} for i in range(40)]
    rows[5]["messages"] = rows[5]["messages"][:1]  # no assistant turn: rejected by the tokenizer
    pq.write_table(pa.Table.from_pylist(rows[:25]), root / "a.parquet", row_group_size=7)
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[25:]))
    return [str(root / "a.parquet"), str(root / "b.jsonl")]


def test_scores_are_bit_identical_with_and_without_the_overlap(tmp_path, loss_scorer):
    paths = pool(tmp_path / "pool")
    runs = {}
    for name, ahead in (("inline", 0), ("overlap", 3)):
        out = tmp_path / name
        runs[name] = run_score(RunConfig(data=tuple(paths), out=str(out), batch_rows=6, prefetch_batches=ahead),
                               loss_scorer(), progress=False)
    assert runs["inline"] == runs["overlap"]
    for sub in ("data", "rejects"):
        for path in sorted((tmp_path / "inline" / sub).glob("*.parquet")):
            a, b = pq.read_table(path), pq.read_table(tmp_path / "overlap" / sub / path.name)
            assert a.equals(b), (sub, path.name)  # bit for bit: Table.equals compares float32 values exactly
    assert runs["overlap"]["rows_scored"] == 39 and runs["overlap"]["rejected_by_reason"] == {"no_assistant_turn": 1}


def test_prepared_on_another_thread_scores_the_same(loss_scorer):
    scorer = loss_scorer()
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i + 1)}]}
            for i in range(9)]
    table = pa.Table.from_pylist(rows)
    direct = scorer.score_table(table)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("p", scorer.prepare_chunk(table)))
    worker.start()
    worker.join()
    assert box["p"].tokenization == {"reasoning_dropped": 0}
    assert scorer.score_table(table, box["p"]).equals(direct)


def test_only_the_adapters_columns_become_python_objects(loss_scorer):
    adapter = loss_scorer().adapter
    table = pa.table({"meta": [{"blob": "x"}] * 2, "messages": [[{"role": "user", "content": "q"}]] * 2,
                      "id": ["a", "b"]})
    rows = adapter_rows(table, adapter)
    assert [set(r) for r in rows] == [set(adapter.columns) & set(table.column_names)] * 2
    assert "meta" not in rows[0] and rows[1]["id"] == "b"
    assert adapter_rows(table.select(["meta"]), adapter) == [{}, {}]  # no column it reads: rows stay rows
