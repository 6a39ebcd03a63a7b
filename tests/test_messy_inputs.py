"""Pools as real tools write them (issue 13): every row accounted, one schema out, paths with glob characters.

Each test builds its own input in the shape a tool of the field writes (pandas / polars / datasets / editors /
Windows tools), runs it through the readers or a whole `run_score`, and checks the rows and the output schema.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import AllRejectedError, InputError
from drift_stream.io.streams import expand_inputs, iter_chunks, plan_inputs


@pytest.fixture(scope="module")
def make_scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return lambda adapter="messages", seed=0: build_scorer("random", model=tiny_model_dir, adapter=adapter, seed=seed)


def chat(i: int, **extra) -> dict:
    return {"id": f"r{i}", "messages": [{"role": "user", "content": f"Calculate {i} + 1."},
                                        {"role": "assistant", "content": f"{i}+1={i + 1} #### {i + 1}"}], **extra}


def alpaca(i: int) -> dict:
    return {"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}"}


def read_records(path: str, batch_rows: int = 4):
    """(records, [(row_index, reason)]) of one file through the run's reader."""
    files = expand_inputs([path])
    plan = plan_inputs(files)
    chunks = list(iter_chunks(files[0], plan, batch_rows))
    table = pa.concat_tables([c.table for c in chunks]) if chunks else plan.schema.empty_table()
    assert all(c.table.num_rows + len(c.bad_rows) <= batch_rows for c in chunks)
    return table.to_pylist(), [(b.row_index, b.reason) for c in chunks for b in c.bad_rows]


def load_as_one_table(paths: list[str]):
    """The shards as ONE `datasets` table and one polars frame (both fail on differing schemas)."""
    import datasets
    import polars as pl

    ds = datasets.load_dataset("parquet", data_files=sorted(paths), split="train")
    frame = pl.read_parquet(sorted(paths))
    assert frame.shape[0] == ds.num_rows
    return ds


def score(tmp_path, data, scorer, name="run", **kw) -> dict:
    return run_score(RunConfig(data=data, out=str(tmp_path / name), batch_rows=kw.pop("batch_rows", 8), **kw),
                     scorer, progress=False)


# --------------------------------------------------------------------------------------- 1. JSON text as written


@pytest.mark.parametrize("name,indent", [("a.json", 4), ("a_pretty.jsonl", 2), ("a_oneline.jsonl", None),
                                         ("a.json", None)])
def test_json_array_is_read_as_its_objects(tmp_path, name, indent):
    records = [alpaca(i) for i in range(11)]
    (tmp_path / name).write_text(json.dumps(records, indent=indent))
    got, bad = read_records(str(tmp_path / name))
    assert got == records and bad == []


def test_json_array_element_that_is_not_an_object_costs_that_element(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([alpaca(0), [1, 2], alpaca(1), "x", alpaca(2)], indent=1))
    got, bad = read_records(str(tmp_path / "a.json"))
    assert got == [alpaca(0), alpaca(1), alpaca(2)]
    assert bad == [(1, "not_a_json_object"), (3, "not_a_json_object")]


def test_json_array_syntax_error_names_file_and_offset(tmp_path):
    text = json.dumps([alpaca(i) for i in range(3)], indent=2)
    (tmp_path / "cut.json").write_text(text[:-20])
    with pytest.raises(InputError, match=r"cut\.json.*at character \d+"):
        read_records(str(tmp_path / "cut.json"))


@pytest.mark.parametrize("indent", [2, None])
@pytest.mark.parametrize("broken,expect_raw", [
    ('{"instruction": "Add 3 and 1." "input": "", "output": "4"}', '"Add 3 and 1." "input"'),  # missing comma
    ('{"instruction": "Add 3 and 1.", "input": "", "output": "4",}', '"output": "4",}'),  # trailing comma
    ("{'instruction': 'Add 3 and 1.', 'input': '', 'output': '4'}", "'output': '4'"),  # single quotes
    ('{"instruction": "Add 3 and 1.", "input": [1, 2}, "output": "4"}', '[1, 2}'),  # mismatched brackets
    ("tru", "tru"),  # a bare word
])
def test_json_array_syntax_error_in_one_element_costs_only_that_element(tmp_path, indent, broken, expect_raw):
    records = [alpaca(i) for i in range(6)]
    texts = [json.dumps(r, indent=indent) for r in records]
    texts[3] = broken
    sep = ",\n" if indent else ", "
    (tmp_path / "a.json").write_text("[" + sep.join(texts) + "]")
    got, bad = read_records(str(tmp_path / "a.json"))
    assert got == records[:3] + records[4:]
    assert bad == [(3, "invalid_json")]
    files = expand_inputs([str(tmp_path / "a.json")])
    raw = [b.raw for c in iter_chunks(files[0], plan_inputs(files), 4) for b in c.bad_rows]
    assert expect_raw in raw[0] and "Add 2 and 1." not in raw[0] and "Add 4 and 1." not in raw[0]


@pytest.mark.parametrize("read_chars", [7, 64, 1000])
def test_broken_elements_across_read_boundaries(tmp_path, monkeypatch, read_chars):
    """Small reads: broken elements, strings and numbers straddle the buffer's end (fill / doubling paths)."""
    from drift_stream.io import jsontext

    monkeypatch.setattr(jsontext, "_READ_CHARS", read_chars)
    records = [dict(alpaca(i), n=i * 1000003) for i in range(30)]
    texts = [json.dumps(r, indent=1 if i % 2 else None) for i, r in enumerate(records)]
    broken = {4: texts[4][:-1] + ",}", 11: texts[11].replace(",", "", 1), 23: "{'single': 'quotes'}"}
    texts = [broken.get(i, t) for i, t in enumerate(texts)]
    (tmp_path / "a.json").write_text("[\n" + ",\n".join(texts) + "\n]\n")
    got, bad = read_records(str(tmp_path / "a.json"))
    assert got == [r for i, r in enumerate(records) if i not in broken]
    assert bad == [(i, "invalid_json") for i in sorted(broken)]


def test_a_string_broken_by_a_line_end_costs_only_its_element(tmp_path):
    text = json.dumps([alpaca(i) for i in range(4)], indent=2)
    broken = text.replace('"output": "3"', '"output": "3\n  and more', 1)  # a raw line end inside a string
    assert broken != text
    (tmp_path / "a.json").write_text(broken)
    got, bad = read_records(str(tmp_path / "a.json"))
    assert got == [alpaca(0), alpaca(1), alpaca(3)] and bad == [(2, "invalid_json")]


def test_a_broken_object_among_concatenated_objects_costs_only_itself(tmp_path):
    texts = [json.dumps(alpaca(i), indent=2) for i in range(4)]
    texts[1] = texts[1].replace('",', '"', 1)  # a missing comma
    (tmp_path / "objs.json").write_text("\n".join(texts))
    got, bad = read_records(str(tmp_path / "objs.json"))
    assert got == [alpaca(0), alpaca(2), alpaca(3)] and bad == [(1, "invalid_json")]


def test_concatenated_pretty_objects_and_dot_json_lines(tmp_path):
    records = [alpaca(i) for i in range(5)]
    (tmp_path / "objs.json").write_text("\n".join(json.dumps(r, indent=2) for r in records))
    assert read_records(str(tmp_path / "objs.json")) == (records, [])
    # datasets.Dataset.to_json writes JSON Lines into a .json file
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_records(str(tmp_path / "lines.json")) == (records, [])


@pytest.mark.parametrize("what,expect", [
    (b"id,instruction,output\n1,a,b\n", "CSV"),
    (b"PAR1\x00\x00garbage", "parquet"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
    (b"\x1f\x8b\x08\x00binary", "gzip"),
])
def test_a_file_that_is_no_json_text_is_refused_naming_it(tmp_path, what, expect):
    (tmp_path / "pool.jsonl").write_bytes(what)
    with pytest.raises(InputError, match=rf"pool\.jsonl is neither JSON Lines nor a JSON array: .*{expect}"):
        read_records(str(tmp_path / "pool.jsonl"))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_encodings_and_byte_order_marks(tmp_path, encoding):
    records = [chat(i, note="café ü 日本") for i in range(6)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records)
    (tmp_path / "x.jsonl").write_bytes(text.encode(encoding))
    assert read_records(str(tmp_path / "x.jsonl")) == (records, [])


def test_line_ends_blank_lines_and_bad_lines_cost_only_their_line(tmp_path):
    good = [chat(i) for i in range(5)]
    lines = [json.dumps(good[0]), "", json.dumps(good[1]), "{oops", "   ", json.dumps(good[2]), "[1]",
             json.dumps(good[3]), json.dumps(good[4])]
    ends = ["\r\n", "\n", "\r", "\r\n", "\n", "\r", "\n", "\r\n", ""]  # CRLF, LF and old-Mac CR mixed
    (tmp_path / "x.jsonl").write_bytes("".join(l + e for l, e in zip(lines, ends)).encode())
    got, bad = read_records(str(tmp_path / "x.jsonl"))
    assert got == good and bad == [(3, "invalid_json"), (6, "not_a_json_object")]


def test_a_damaged_first_line_does_not_make_the_file_unreadable(tmp_path):
    good = [chat(i) for i in range(4)]
    (tmp_path / "x.jsonl").write_text("garbage here\n" + "".join(json.dumps(r) + "\n" for r in good))
    assert read_records(str(tmp_path / "x.jsonl")) == (good, [(0, "invalid_json")])


def test_latin1_lines_are_read_and_undecodable_ones_rejected(tmp_path, caplog):
    good = [chat(i, note="naïve café") for i in range(3)]
    data = json.dumps(good[0], ensure_ascii=False).encode("utf-8") + b"\n"
    data += json.dumps(good[1], ensure_ascii=False).encode("cp1252") + b"\n"  # a legacy Windows line
    data += b"\xff\xfe\x00binary\n"
    data += json.dumps(good[2], ensure_ascii=False).encode("utf-8") + b"\n"
    (tmp_path / "x.jsonl").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        got, bad = read_records(str(tmp_path / "x.jsonl"))
    assert got == good and bad == [(2, "invalid_utf8")]
    assert "Windows-1252" in caplog.text


def test_type_conflicts_cost_nothing_outside_the_adapter_and_one_row_inside(tmp_path, make_scorer):
    rows = [chat(i, meta={"source_id": f"doc-{i}", "lang": "en"}, quality=0.5 + i / 100) for i in range(30)]
    rows[11]["meta"]["source_id"] = 11  # nested type change
    rows[7]["quality"] = "n/a"  # scalar type change
    rows[20]["messages"] = "not a list of turns"  # the adapter's own field
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = score(tmp_path, str(tmp_path / "pool.jsonl"), make_scorer())
    assert (manifest["rows_in"], manifest["rows_scored"], manifest["rows_rejected"]) == (30, 29, 1)
    assert manifest["rejected_by_reason"] == {"wrong_type": 1}
    assert manifest["json_text_columns"] == ["meta", "quality"]
    data = pq.read_table(tmp_path / "run" / "data").to_pylist()
    by_id = {r["id"]: r for r in data}
    assert json.loads(by_id["r11"]["meta"]) == {"source_id": 11, "lang": "en"}
    assert json.loads(by_id["r7"]["quality"]) == "n/a" and json.loads(by_id["r8"]["quality"]) == 0.58
    rejects = pq.read_table(tmp_path / "run" / "rejects").to_pylist()
    assert [(r["drift_row_index"], r["drift_reject_reason"]) for r in rejects] == [(20, "wrong_type:messages")]
    assert json.loads(rejects[0]["drift_raw_line"])["messages"] == "not a list of turns"


# ------------------------------------------------------------------------------------ 2. layouts of the same data


def test_datasets_sequence_chat_layout_is_read_as_turns(tmp_path, make_scorer):
    from datasets import Dataset, Features, Sequence, Value

    rows = [{"id": f"s{i}", "messages": {"role": ["user", "assistant"], "content": [f"q{i}", f"a{i}"]}}
            for i in range(9)]
    rows[4]["messages"] = {"role": ["user", "assistant"], "content": ["q4"]}  # ragged: that row alone
    feats = Features({"id": Value("string"),
                      "messages": Sequence({"role": Value("string"), "content": Value("string")})})
    Dataset.from_list(rows, features=feats).to_parquet(str(tmp_path / "seq.parquet"))
    assert pa.types.is_struct(pq.read_schema(tmp_path / "seq.parquet").field("messages").type)
    manifest = score(tmp_path, str(tmp_path / "seq.parquet"), make_scorer())
    assert (manifest["rows_scored"], manifest["rows_rejected"]) == (8, 1)
    assert manifest["rejected_by_reason"] == {"ragged_turns": 1}


def two_writer_pool(root: Path) -> list[str]:
    """One pool, two writers: polars (large types, extra column, no id) and pyarrow (string, extra struct field)."""
    import polars as pl

    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"messages": [chat(i)["messages"] for i in range(12)], "source": ["forum"] * 12,
                  "task": ["add"] * 12}).write_parquet(root / "a.parquet")
    rows = [chat(100 + i, task="mul") for i in range(12)]
    for r in rows:
        r["messages"][0]["name"] = "anon"
    pq.write_table(pa.Table.from_pylist(rows), root / "b.parquet", row_group_size=5)
    assert pa.types.is_large_list(pq.read_schema(root / "a.parquet").field("messages").type)
    return [str(root / "a.parquet"), str(root / "b.parquet")]


@pytest.mark.parametrize("policy", ["top:0.5", "positive", "weights", "repeat"])
def test_one_schema_out_for_score_and_every_refine_policy(tmp_path, make_scorer, policy):
    from drift_stream.refine.policies import refine_run

    paths = two_writer_pool(tmp_path / "pool")
    manifest = score(tmp_path, paths, make_scorer(), batch_rows=5)
    assert manifest["rows_scored"] == 24
    shards = sorted(glob.glob(str(tmp_path / "run" / "data" / "*.parquet")))
    schemas = [pq.read_schema(p) for p in shards]
    assert all(s.equals(schemas[0]) for s in schemas)
    assert schemas[0].field("messages").type == pa.list_(pa.struct(
        [("role", pa.string()), ("content", pa.string()), ("name", pa.string())]))
    ds = load_as_one_table(shards)
    assert ds.num_rows == 24 and set(ds.column_names) >= {"id", "source", "task", "messages", "drift_score"}
    assert list(ds["source"]).count("forum") == 12 and list(ds["source"]).count(None) == 12

    refine_run(str(tmp_path / "run"), policy, str(tmp_path / "refined"), progress=False)
    out = sorted(glob.glob(str(tmp_path / "refined" / "data" / "*.parquet")))
    out_schemas = [pq.read_schema(p) for p in out]
    assert all(s.equals(out_schemas[0]) for s in out_schemas)
    load_as_one_table(out)


def test_refine_unifies_shards_of_an_older_run_with_different_schemas(tmp_path, make_scorer):
    """A run scored before one-schema-out (or by another tool): shard 1 with large types and a missing column."""
    from drift_stream.refine.policies import refine_run

    rows = [chat(i, task="t") for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), tmp_path / "b.parquet")
    score(tmp_path, [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], make_scorer())
    shard = sorted(glob.glob(str(tmp_path / "run" / "data" / "*.parquet")))[1]
    table = pq.read_table(shard).drop_columns(["task"])
    large = pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in table.schema])
    pq.write_table(table.cast(large), shard)
    for policy in ("repeat", "top:0.5"):
        refine_run(str(tmp_path / "run"), policy, str(tmp_path / policy.replace(":", "_")), progress=False)
        ds = load_as_one_table(glob.glob(str(tmp_path / policy.replace(":", "_") / "data" / "*.parquet")))
        assert "task" in ds.column_names


# ---------------------------------------------------------------------------------------- 5. paths as users have


def test_paths_with_brackets_spaces_and_a_literal_that_wins_over_its_glob(tmp_path, make_scorer):
    from drift_stream.refine.policies import refine_run
    from drift_stream.refine.report import write_report

    folder = tmp_path / "exports [2024]"
    folder.mkdir()
    rows = [chat(i) for i in range(6)]
    for name in ("pool[v2].jsonl", "data [copy].jsonl", "poolv.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = expand_inputs([str(folder / "pool[v2].jsonl")])
    assert [Path(f.url).name for f in files] == ["pool[v2].jsonl"]  # not "poolv.jsonl", its glob reading
    assert len(expand_inputs([str(folder)])) == 3
    assert [Path(f.url).name for f in expand_inputs([str(tmp_path / "exports [2024]" / "pool?v2?.jsonl")])] == [
        "pool[v2].jsonl"]  # no literal file of that name: a glob
    out = tmp_path / "runs" / "pool[v2] *"
    run_score(RunConfig(data=(str(folder / "pool[v2].jsonl"), str(folder / "data [copy].jsonl")), out=str(out)),
              make_scorer(), progress=False)
    refined = tmp_path / "runs" / "top [0.5]"
    refine_run(str(out), "top:0.5", str(refined), progress=False)
    write_report(str(out), str(tmp_path / "runs" / "r [1].html"))
    # what refine wrote is an input for score again
    again = score(tmp_path, str(refined / "data"), make_scorer(), name="again[1]")
    assert again["rows_scored"] == 6


# --------------------------------------------------------------------------------- 6. runs that look wrong say so


def test_all_rejected_raises_unless_allowed_and_mostly_rejected_warns(tmp_path, make_scorer, caplog):
    (tmp_path / "alpaca.json").write_text(json.dumps([alpaca(i) for i in range(10)], indent=2))
    with pytest.raises(AllRejectedError, match=r"10 of 10 rows were rejected with adapter 'messages'.*"
                                               r"missing_field \(10\).*wrong --adapter"):
        score(tmp_path, str(tmp_path / "alpaca.json"), make_scorer())
    manifest = score(tmp_path, str(tmp_path / "alpaca.json"), make_scorer(), allow_all_rejected=True)
    assert manifest["rows_rejected"] == 10
    assert score(tmp_path, str(tmp_path / "alpaca.json"), make_scorer("alpaca"), name="ok")["rows_scored"] == 10

    rows = [chat(i) for i in range(3)] + [{"id": f"x{i}", "conversations": []} for i in range(7)]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        manifest = score(tmp_path, str(tmp_path / "mixed.jsonl"), make_scorer(), name="mostly")
    assert manifest["rows_scored"] == 3
    assert "7 of 10 rows were rejected" in caplog.text and "missing_field (7)" in caplog.text


def test_cli_all_rejected_exit_code_and_one_line_errors(tmp_path, tiny_model_dir, capsys):
    from drift_stream.cli.main import main

    (tmp_path / "alpaca.json").write_text(json.dumps([alpaca(i) for i in range(4)]))
    base = ["score", "--data", str(tmp_path / "alpaca.json"), "--model", tiny_model_dir, "--scorer", "random", "-q"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every row was rejected" in err
    assert main(base + ["--out", str(tmp_path / "b"), "--allow-all-rejected"]) == 0
    assert main(base + ["--out", str(tmp_path / "c"), "--adapter", "alpaca"]) == 0
    (tmp_path / "t.jsonl").write_text("a,b\n1,2\n")
    assert main(["score", "--data", str(tmp_path / "t.jsonl"), "--model", tiny_model_dir, "--scorer", "random",
                 "--out", str(tmp_path / "d"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.jsonl is neither JSON Lines nor a JSON array" in err


def test_rows_in_equals_scored_plus_rejected_over_mixed_kinds(tmp_path, make_scorer):
    """One run over every kind at once: array, UTF-16 lines, parquet of another writer, a bad line."""
    (tmp_path / "a.json").write_text(json.dumps([chat(i) for i in range(5)], indent=2))
    text = "".join(json.dumps(chat(10 + i)) + "\r\n" for i in range(5)) + "{bad\r\n"
    (tmp_path / "b.jsonl").write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    pq.write_table(pa.Table.from_pylist([chat(20 + i, extra=i) for i in range(5)]), tmp_path / "c.parquet")
    manifest = score(tmp_path, [str(tmp_path / n) for n in ("a.json", "b.jsonl", "c.parquet")], make_scorer())
    assert manifest["rows_in"] == manifest["rows_scored"] + manifest["rows_rejected"] == 16
    assert manifest["rows_rejected"] == 1
    ds = load_as_one_table(glob.glob(str(tmp_path / "run" / "data" / "*.parquet")))
    assert sorted(v for v in ds["extra"] if v is not None) == list(range(5))  # null where a file lacked it


def test_s3_keys_with_brackets_and_spaces_through_score_and_refine(tmp_path, make_scorer, s3_server):
    from drift_stream.refine.policies import refine_run

    fs = s3_server.filesystem()
    bucket = s3_server.new_bucket("brackets")
    rows = [chat(i) for i in range(6)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    for name in ("pool[v2].jsonl", "data [copy].jsonl", "poolv.jsonl"):
        fs.pipe_file(f"{bucket}/exports [1]/{name}", body)
    opts = s3_server.storage_options
    files = expand_inputs([f"s3://{bucket}/exports [1]/pool[v2].jsonl"], opts)
    assert [f.url.rsplit("/", 1)[1] for f in files] == ["pool[v2].jsonl"]
    out = f"s3://{bucket}/runs/pool[v2]"
    manifest = run_score(RunConfig(data=(f"s3://{bucket}/exports [1]/pool[v2].jsonl",
                                         f"s3://{bucket}/exports [1]/data [copy].jsonl"), out=out,
                                   storage_options=opts), make_scorer(), progress=False)
    assert manifest["rows_scored"] == 12
    refine_run(out, "top:0.5", f"s3://{bucket}/refined [a]", storage_options=opts, progress=False)
    again = run_score(RunConfig(data=(f"s3://{bucket}/refined [a]/data",), out=str(tmp_path / "again"),
                                storage_options=opts), make_scorer(), progress=False)
    assert again["rows_scored"] == 6


def test_quiet_hides_the_weights_loading_bar(tmp_path, tiny_model_dir, capsys):
    from drift_stream.cli.main import main

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(3)))
    assert main(["score", "--data", str(tmp_path / "p.jsonl"), "--model", tiny_model_dir, "--scorer", "loss",
                 "--max-tokens", "128", "--out", str(tmp_path / "run"), "-q"]) == 0
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err and "%|" not in captured.err
    assert captured.out == ""


def test_an_adapter_column_of_mixed_scalars_is_read_as_text(tmp_path, make_scorer):
    """`id` a number in one writer's file and a string in another's (and in one JSON Lines file): no row lost."""
    rows = [chat(i) for i in range(4)]
    pq.write_table(pa.Table.from_pylist([{**r, "id": i} for i, r in enumerate(rows)]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    mixed = [{**r, "id": i if i % 2 else f"x{i}"} for i, r in enumerate(rows)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    files = [str(tmp_path / n) for n in ("a.parquet", "b.parquet", "c.jsonl")]
    manifest = score(tmp_path, files, make_scorer())
    assert (manifest["rows_scored"], manifest["rows_rejected"]) == (12, 0)
    ds = load_as_one_table(glob.glob(str(tmp_path / "run" / "data" / "*.parquet")))
    assert sorted(ds["id"]) == sorted(["0", "1", "2", "3", "r0", "r1", "r2", "r3", "x0", "1", "x2", "3"])
