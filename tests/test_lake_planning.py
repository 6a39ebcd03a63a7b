"""Issue 23: planning from what is cheap (each file from its own footer / first rows, read once), one schema settled
when the last marker is written, and O(files) bookkeeping (a shard process reads only its own markers)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.io import json_rows, run_dir
from drift_stream.io.columns import ID, SOURCE_ID
from drift_stream.io.run_dir import RunDirectory, empty_data_schema, rejects_schema
from drift_stream.io.schema import SchemaPlan
from drift_stream.io.streams import expand_inputs, iter_chunks, iter_planned, plan_inputs

SCHEMA = json.loads((Path(__file__).parent.parent / "schemas" / "run_manifest.schema.json").read_text())


@pytest.fixture(scope="module")
def make_scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return lambda: build_scorer("random", model=tiny_model_dir, adapter="messages", seed=0)


def chat(i: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], **extra}


def lines(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# ------------------------------------------------------------------------------------------------ bounded planning


def test_a_plan_needs_only_the_sample_not_the_whole_file(tmp_path):
    """A gzip file of 4 x SAMPLE_ROWS rows cut short at half its bytes: planning it succeeds (it reads the first
    SAMPLE_ROWS rows and the reader's 1 MiB read-ahead, not the cut); reading it stops with the InputError naming
    the file."""
    n = 4 * json_rows.SAMPLE_ROWS
    data = gzip.compress(lines({"k": i, "text": hashlib.sha256(str(i).encode()).hexdigest() * 3} for i in range(n)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    files = expand_inputs([str(tmp_path / "cut.jsonl.gz")])
    plan = plan_inputs(files)
    assert plan.schema.names == ["k", "text"]
    items = iter_planned(files[0], 1000)
    assert isinstance(next(items), SchemaPlan)
    with pytest.raises(Exception, match="cut.jsonl.gz"):
        for _ in items:
            pass


def test_rows_after_the_sample_that_do_not_fit_are_rejected_with_their_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(json_rows, "SAMPLE_ROWS", 5)
    records = [{"k": i, "tag": "t"} for i in range(12)]
    records[7] = {"k": 7, "tag": "t", "late": True}  # a key the sample never showed
    records[9] = {"k": "nine", "tag": "t"}  # another type than the sample's
    (tmp_path / "x.jsonl").write_bytes(lines(records))
    file = expand_inputs([str(tmp_path / "x.jsonl")])[0]
    items = list(iter_planned(file, 4))
    plan, chunks = items[0], items[1:]
    assert plan.schema == pa.schema([("k", pa.int64()), ("tag", pa.string())])
    bad = [(b.row_index, b.reason) for c in chunks for b in c.bad_rows]
    assert bad == [(7, "unplanned_column:late"), (9, "wrong_type:k")]
    assert json.loads([b for c in chunks for b in c.bad_rows][0].raw) == records[7]  # kept whole in rejects
    kept = [int(i) for c in chunks for i in c.row_index]
    assert kept == [0, 1, 2, 3, 4, 5, 6, 8, 10, 11]
    # the same file read with a plan given from outside (iter_chunks) is read the same way
    again = list(iter_chunks(file, plan, 4))
    assert [(b.row_index, b.reason) for c in again for b in c.bad_rows] == bad


def test_output_schemas_give_id_as_string():
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    assert rejects_schema(schema).field(ID).type == pa.string()
    assert rejects_schema(schema).names[:2] == ["id", "text"]  # in its input position
    assert empty_data_schema(schema).field(ID).type == pa.string()


# --------------------------------------------------------------------------------- settling and O(files) bookkeeping


def two_writers(root: Path) -> list[str]:
    """File 0: parquet, int ids, a `meta` struct; file 1: JSON Lines, no ids, `meta` a string, an extra column."""
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([chat(i, id=i, meta={"lang": "en"}) for i in range(6)]), root / "a.parquet")
    (root / "b.jsonl").write_bytes(lines(chat(10 + i, meta="web", score=0.5) for i in range(5)))
    return [str(root / "a.parquet"), str(root / "b.jsonl")]


class CountingReads:
    """Counts the run directory's JSON reads by file (an observer that calls through)."""

    def __init__(self, monkeypatch):
        self.reads: list[str] = []
        original = RunDirectory._read_json

        def read(run, rel):
            self.reads.append(rel)
            return original(run, rel)

        monkeypatch.setattr(RunDirectory, "_read_json", read)

    def markers(self) -> list[str]:
        return [r for r in self.reads if r.startswith("completions/")]


def test_shards_plan_their_own_files_and_the_last_one_settles_one_schema(tmp_path, make_scorer, monkeypatch):
    paths = two_writers(tmp_path / "pool")
    out = tmp_path / "run"
    seen = CountingReads(monkeypatch)
    first = run_score(RunConfig(data=tuple(paths), out=str(out), num_shards=2, shard_index=0), make_scorer(),
                      progress=False)
    assert not first["complete"] and first["num_completed_files"] == 1 and first["rows_scored"] == 6
    assert seen.markers() == []  # its counts are those of the marker it wrote: no marker is read back
    assert not (out / "manifest.json").exists() and not (out / "schema.json").exists()
    shard0 = pq.read_schema(out / "data" / "train-00000-of-00002.parquet")
    assert shard0.field("meta").type == pa.struct([("lang", pa.string())])  # planned from its own file

    seen.reads.clear()
    run_dir._MARKERS.clear()  # as in another process: nothing read yet
    last = run_score(RunConfig(data=tuple(paths), out=str(out), num_shards=2, shard_index=1), make_scorer(),
                     progress=False)
    assert last["complete"] and (last["rows_in"], last["rows_scored"]) == (11, 11)
    assert seen.markers() == ["completions/00000.json"]  # each other process's marker read once, not its own
    jsonschema.validate(last, SCHEMA)
    schemas = [pq.read_schema(p) for p in sorted((out / "data").glob("*.parquet"))]
    assert all(s.remove_metadata().equals(schemas[0].remove_metadata()) for s in schemas)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "data").glob("*.parquet")))
    assert [json.loads(v) for v in table.column("meta").to_pylist()] == [{"lang": "en"}] * 6 + ["web"] * 5
    assert table.column("score").to_pylist() == [None] * 6 + [0.5] * 5
    assert table.column(SOURCE_ID).to_pylist() == list(range(6)) + [None] * 5
    assert table.column(ID).to_pylist()[:6] == [str(i) for i in range(6)]
    plan = json.loads((out / "schema.json").read_text())
    assert plan["json_columns"] == ["meta"] and "score: double" in plan["schema"]
    assert plan["source_id_column"] == last["source_id_column"] == {"name": SOURCE_ID, "type": "int64"}
    assert last["repeated_ids"] == {"ids": 0, "rows": 0, "examples": []}
    assert json.loads((out / "manifest.json").read_text()) == last

    # a rerun of the finished run changes nothing (the settled shards are not encoded twice)
    before = {p.name: p.read_bytes() for p in (out / "data").glob("*.parquet")}
    again = run_score(RunConfig(data=tuple(paths), out=str(out)), make_scorer(), progress=False)
    assert again == last
    assert {p.name: p.read_bytes() for p in (out / "data").glob("*.parquet")} == before


def test_a_shard_reads_back_only_the_markers_of_files_an_earlier_process_finished(tmp_path, make_scorer,
                                                                                    monkeypatch):
    """Issue 23, O(files) bookkeeping: a shard process that does not settle prints its counts from the markers it
    wrote (kept in memory as they read back), and reads only those of its files finished before it started."""
    root = tmp_path / "pool"
    root.mkdir()
    for f in range(3):
        pq.write_table(pa.Table.from_pylist([chat(10 * f + i, id=f"d{f}-{i}") for i in range(4 + f)]),
                       root / f"p{f}.parquet")
    out = tmp_path / "run"
    config = RunConfig(data=(str(root),), out=str(out), num_shards=2, shard_index=0)  # files 0 and 2 of 3
    first = run_score(config, make_scorer(), progress=False)
    assert not first["complete"] and first["rows_in"] == 4 + 6
    (out / "completions" / "00002.json").unlink()  # as if killed before file 2's marker
    seen = CountingReads(monkeypatch)
    listings: list[str] = []
    list_markers = RunDirectory.list_markers
    monkeypatch.setattr(RunDirectory, "list_markers", lambda run: listings.append(run.url) or list_markers(run))
    run_dir._MARKERS.clear()  # as in another process
    resumed = run_score(config, make_scorer(), progress=False)
    assert seen.markers() == ["completions/00000.json"]  # file 0, finished by the first process; not file 2
    assert resumed == first
    assert len(listings) == 2  # the markers listed once to skip finished files, once to finish


def test_a_shard_prints_its_summary_from_its_result_without_reading_the_run(tmp_path, make_scorer, monkeypatch):
    """`drift-stream score` hands run_score's result to summarize_run: a shard's line comes from its own counts, and
    the settling process's summary from the manifest it wrote, the same text as read from the run directory."""
    from drift_stream.refine.report import summarize_run

    paths = two_writers(tmp_path / "pool")
    out = tmp_path / "run"
    first = run_score(RunConfig(data=tuple(paths), out=str(out), num_shards=2, shard_index=0), make_scorer(),
                      progress=False)
    line = summarize_run(str(out), allow_incomplete=True)  # from the run directory
    assert "(INCOMPLETE: not settled yet, 1 of 2 input files scored;" in line
    last = run_score(RunConfig(data=tuple(paths), out=str(out), num_shards=2, shard_index=1), make_scorer(),
                     progress=False)
    full = summarize_run(str(out), allow_incomplete=True)
    assert last["complete"] and "drift_score: mean" in full
    monkeypatch.setattr(RunDirectory, "__init__", lambda *a, **k: pytest.fail("the run directory was opened"))
    assert summarize_run(str(out), allow_incomplete=True, result=first) == line
    assert summarize_run(str(out), allow_incomplete=True, result=last) == full


def test_a_homogeneous_lake_is_settled_without_rewriting_a_shard(tmp_path, make_scorer):
    root = tmp_path / "pool"
    root.mkdir()
    for f in range(3):
        pq.write_table(pa.Table.from_pylist([chat(10 * f + i, id=f"d{f}-{i % 2}") for i in range(4)]),
                       root / f"p{f}.parquet")
    out = tmp_path / "run"
    for index in (1, 0, 2):
        run_score(RunConfig(data=(str(root),), out=str(out), num_shards=3, shard_index=index), make_scorer(),
                  progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    manifest = run_score(RunConfig(data=(str(root),), out=str(out), num_shards=3, shard_index=2), make_scorer(),
                         progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")} == mtimes
    assert manifest["complete"] and manifest["repeated_ids"]["ids"] == 6  # d{f}-0 and d{f}-1, twice each
    assert manifest["repeated_ids"]["examples"][0] == {"id": "d0-0", "rows": 2}
    assert "source_id_column" not in manifest


def test_a_complete_run_is_scanned_once_and_its_summary_reads_the_manifest(tmp_path, make_scorer, monkeypatch):
    """The settling process reads the data shards once, for the repeated ids and the summary's numbers together
    (engines/run_summary.py), and the summary printed after the run reads manifest.json, no data or rejects shard
    (before: one scan for the ids, two more and every rejects file for the summary)."""
    from drift_stream.io.run_reader import CompletedShards
    from drift_stream.refine.report import gather, summarize_run

    root = tmp_path / "pool"
    root.mkdir()
    for f in range(3):
        rows = [chat(10 * f + i, id=f"d{f}-{i % 3}") for i in range(5)]
        rows[-1]["messages"][1]["content"] = ""  # rejected: empty_response
        pq.write_table(pa.Table.from_pylist(rows), root / f"p{f}.parquet")
    scans, opened = [], []
    scan, open_data = CompletedShards.scan, CompletedShards.open_data
    monkeypatch.setattr(CompletedShards, "scan", lambda self: scans.append(self.url) or scan(self))
    monkeypatch.setattr(CompletedShards, "open_data", lambda self, path: opened.append(path) or open_data(self, path))
    out = tmp_path / "run"
    manifest = run_score(RunConfig(data=(str(root),), out=str(out), on_bad_row="reject"), make_scorer(),
                         progress=False)
    assert manifest["complete"] and manifest["rejected_by_reason"] == {"empty_response": 3}
    assert len(scans) == 1 and not opened  # the one scan of the data
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["repeated_ids"]["ids"] == 3 and set(manifest["summary"]) == {"score_stats", "spearman"}
    scans.clear()
    text = summarize_run(str(out), allow_incomplete=True)  # as `drift-stream score` prints it
    assert not scans and not opened
    s = gather(str(out), top_k=0)
    st = s.score_stats
    assert f"median {st['median']:.4g}" in text and "rejected 3 (empty_response: 3)" in text
    assert [manifest["summary"]["score_stats"][k] for k in st] == list(st.values())


def test_the_driver_reads_no_input_before_the_engine_starts(tmp_path, make_scorer, monkeypatch):
    """What `--engine ray` relies on: run_score lists the files and checks the config, then hands the files to the
    engine (`score_files`, a RayEngine there) without opening one of them (no schema pass on the driver)."""
    from drift_stream.engines.local import score_file
    from drift_stream.io import streams

    paths = two_writers(tmp_path / "pool")
    opened: list[str] = []
    original = streams._open
    monkeypatch.setattr(streams, "_open", lambda file, *a, **k: opened.append(file.url) or original(file, *a, **k))
    seen_at_start: list[list[str]] = []

    def engine(todo, run, scorer, config, progress):
        seen_at_start.append(list(opened))
        for file in todo:
            score_file(file, run, scorer, config)

    manifest = run_score(RunConfig(data=tuple(paths), out=str(tmp_path / "run")), make_scorer(), progress=False,
                         score_files=engine)
    assert seen_at_start == [[]] and sorted(opened) == sorted(paths)  # then each file opened once, by its worker
    assert manifest["complete"] and manifest["rows_scored"] == 11
