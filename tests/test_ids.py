"""One id contract: every output row has a string `id` (the input's own id as text, else a hash of the adapter's own
fields), the same in every run; refine, stratify and --prefilter work on integer ids, on a pool where one file has no
`id` column (shared/cases/C15: a polars and a pyarrow writer) and on repeated ids. Real parquet / JSONL, the tiny
model, the real CLI."""

from __future__ import annotations

import json
import logging

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.cli.main import main
from drift_stream.data.formats import load_adapter
from drift_stream.io.columns import ID, REJECT_REASON, SOURCE_ID
from drift_stream.scoring.build import build_scorer


def chat(i: int, op: str = "+") -> list[dict]:
    return [{"role": "user", "content": f"Calculate {i} {op} 2."}, {"role": "assistant", "content": f"{i} {op} 2 = ?"}]


def score(data: list, out, model: str, scorer: str = "random", *extra: str) -> dict:
    assert main(["score", "--data", *map(str, data), "--model", model, "--out", str(out), "--scorer", scorer,
                 "--quiet", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def refine(run, out, *extra: str) -> pa.Table:
    assert main(["refine", str(run), "--out", str(out), "--quiet", *extra]) == 0
    return pq.read_table(out / "data")


def c15_pair(root):
    """shared/cases/C15 shaped: a.parquet by polars (large types, extra `source`, no `id`), b.parquet by pyarrow
    (`id` column, a per-turn `name` field)."""
    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"messages": [chat(i) for i in range(20)], "source": ["forum"] * 20,
                  "task": ["add"] * 20}).write_parquet(root / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": f"b{i}", "task": "mul", "messages": [
        {**chat(i, "*")[0], "name": "anon"}, {**chat(i, "*")[1], "name": None}]} for i in range(20)]),
        root / "b.parquet")
    return root / "a.parquet", root / "b.parquet"


def test_integer_ids_become_strings_and_every_refine_policy_works(tmp_path, tiny_model_dir):
    pool = tmp_path / "pool.jsonl"
    lines = [json.dumps({"id": i, "task": f"t{i % 2}", "messages": chat(i)}) for i in range(12)]
    lines.insert(5, '{"id": 99, "messages": [')  # an undecodable line
    lines.append(json.dumps({"id": 12, "task": "t0", "messages": chat(12)[:1]}))  # no assistant turn: rejected
    pool.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    manifest = score([pool], run, tiny_model_dir)
    assert (manifest["rows_scored"], manifest["rows_rejected"]) == (12, 2)
    data = pq.read_table(run / "data")
    assert data.schema.field(ID).type == pa.string()
    assert data.column(ID).to_pylist() == [str(i) for i in range(12)]
    assert data.schema.field(SOURCE_ID).type == pa.int64()  # the input's own values, their type kept
    assert data.column(SOURCE_ID).to_pylist() == list(range(12))
    rejects = pq.read_table(run / "rejects")
    assert rejects.schema.field(ID).type == pa.string() and None not in rejects.column(ID).to_pylist()
    assert rejects.column(ID).to_pylist()[1] == "12" and rejects.column(SOURCE_ID).to_pylist()[1] == 12
    plan = json.loads((run / "schema.json").read_text())
    assert plan["source_id_column"] == {"name": SOURCE_ID, "type": "int64"}

    kept = refine(run, tmp_path / "top", "--policy", "top:0.5")
    assert kept.num_rows == 6 and kept.schema.field(ID).type == pa.string()
    assert refine(run, tmp_path / "strat", "--policy", "top:0.5", "--stratify-by", "task").num_rows == 6
    score([pool], tmp_path / "loss", tiny_model_dir, "loss")
    chained = refine(run, tmp_path / "chain", "--policy", "top:0.5", "--prefilter", str(tmp_path / "loss"), "0.5")
    assert chained.num_rows == 3


def test_two_writers_one_without_ids_refine_with_and_without_strata(tmp_path, tiny_model_dir):
    a, b = c15_pair(tmp_path / "pool")
    run = tmp_path / "run"
    score([a, b], run, tiny_model_dir)
    ids = pq.read_table(run / "data").column(ID).to_pylist()
    assert len(ids) == 40 and len(set(ids)) == 40 and all(isinstance(i, str) and i for i in ids)
    assert ids[20:] == [f"b{i}" for i in range(20)]
    assert refine(run, tmp_path / "top", "--policy", "top:0.5").num_rows == 20
    strat = refine(run, tmp_path / "strat", "--policy", "top:0.5", "--stratify-by", "task")
    assert strat.column("task").to_pylist().count("add") == 10 and strat.num_rows == 20


def test_a_row_has_the_same_id_in_runs_of_other_file_sets_and_prefilter_joins(tmp_path, tiny_model_dir):
    a, b = c15_pair(tmp_path / "pool")
    score([a], tmp_path / "alone", tiny_model_dir, "loss")
    score([a, b], tmp_path / "both", tiny_model_dir)
    alone = pq.read_table(tmp_path / "alone" / "data").column(ID).to_pylist()
    both = pq.read_table(tmp_path / "both" / "data").column(ID).to_pylist()
    assert alone == both[:20]
    refine(tmp_path / "both", tmp_path / "chain", "--policy", "top:1", "--prefilter", str(tmp_path / "alone"), "0.5")
    manifest = json.loads((tmp_path / "chain" / "manifest.json").read_text())
    assert manifest["prefilters"][0]["rows_missing"] == 20  # b's rows: not in the run of a alone
    assert manifest["rows_kept"] == 10  # a's rows that the prefilter keeps


def test_content_id_reads_only_the_adapters_fields_and_drops_nulls():
    messages = load_adapter("messages")
    row = {"messages": chat(1), "system": None}
    same = [
        {"messages": [{**t, "name": None} for t in chat(1)]},  # null struct fields of another file's turns
        {"messages": chat(1), "source": "forum", "id": None},  # another column, a null id
        {"messages": chat(1), "id": "", "drift_score": 0.5},
    ]
    assert all(messages.row_id(r) == messages.row_id(row) for r in same)
    assert messages.row_id({"messages": chat(2)}) != messages.row_id(row)
    assert messages.row_id({"messages": chat(1), "system": "Be brief."}) == messages.row_id(row)  # not its field
    assert messages.row_id({"id": 7, "messages": chat(1)}) == "7"
    assert messages.row_id({"id": 7.0, "messages": chat(1)}) == "7"  # pandas turns an int column with nulls to float
    alpaca = load_adapter("alpaca")
    base = {"instruction": "Add.", "output": "3"}
    assert alpaca.row_id({**base, "input": None, "category": "x"}) == alpaca.row_id(base)
    assert alpaca.row_id({**base, "input": "1 2"}) != alpaca.row_id(base)
    assert alpaca.row_id({**base, "system": "Be brief."}) != alpaca.row_id(base)  # alpaca reads `system`
    text = load_adapter("text")
    assert text.row_id({"text": "hello", "url": "u"}) == text.row_id({"text": "hello"})


def test_datasets_map_output_has_string_ids(tiny_model_dir):
    scorer = build_scorer("random", model=tiny_model_dir)
    table = pa.table({"id": pa.array([3, None, 5], pa.int64()),
                      "messages": [chat(3), chat(4), chat(5)[:1]]})
    out = scorer(table)
    assert out.schema.field(ID).type == pa.string()
    assert out.column(ID).to_pylist()[0::2] == ["3", "5"] and len(out.column(ID)[1].as_py()) == 40
    assert out.column(SOURCE_ID).to_pylist() == [3, None, 5]
    assert out.column(REJECT_REASON).to_pylist()[2] == "no_assistant_turn"
    assert out.column_names.index(ID) == 0  # the id column keeps its place
    empty = scorer(pa.schema([("messages", table.schema.field("messages").type)]).empty_table())
    assert SOURCE_ID not in empty.column_names and empty.schema.field(ID).type == pa.string()


def test_repeated_ids_are_reported_and_prefilter_joins_them_one_to_one(tmp_path, tiny_model_dir, caplog):
    rows = [{"id": "x", "messages": chat(0)}, {"id": "x", "messages": chat(1)}]
    rows += [{"messages": chat(i)} for i in range(2, 8)] + [{"messages": chat(2)}]  # an identical row: same hash
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pool)
    with caplog.at_level(logging.WARNING):
        score([pool], tmp_path / "random", tiny_model_dir)
    warned = [r.getMessage() for r in caplog.records if "repeated" in r.getMessage()]
    assert warned and "2 ids" in warned[0] and "'x'" in warned[0]
    score([pool], tmp_path / "loss", tiny_model_dir, "loss")
    kept = refine(tmp_path / "random", tmp_path / "chain", "--policy", "top:1", "--prefilter", str(tmp_path / "loss"),
                  "0.25")
    manifest = json.loads((tmp_path / "chain" / "manifest.json").read_text())
    assert manifest["prefilters"][0]["rows_missing"] == 0 and manifest["prefilters"][0]["repeated_ids"] == 2
    assert kept.num_rows == 7  # 9 rows, the worst 2 by loss dropped: each copy joined to its own copy


def test_an_id_column_of_json_scalars_mixed_with_text(tmp_path, tiny_model_dir):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps({"id": v, "messages": chat(i)}) for i, v in enumerate([1, "b", 2.5, None]))
                    + "\n")
    score([pool], tmp_path / "run", tiny_model_dir)
    ids = pq.read_table(tmp_path / "run" / "data").column(ID).to_pylist()
    assert ids[:3] == ["1", "b", "2.5"] and len(ids[3]) == 40
