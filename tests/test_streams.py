"""io/streams.py on local files: listing, sharding, parquet / jsonl(.gz/.zst) chunks, bad lines, prefetch."""

from __future__ import annotations

import gzip
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import record_local_reads
import zstandard

from drift_stream.errors import ConfigError, InputError
from drift_stream.io.background import prefetch
from drift_stream.io.streams import (
    as_plan,
    expand_inputs,
    input_schema,
    iter_chunks,
    plan_inputs,
    redact_url,
    resolve_storage_options,
    shard_files,
)


def rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
         "n": i}
        for i in range(start, start + n)
    ]


def write_jsonl(path, records, compression=None, extra_lines=()):
    text = "".join(json.dumps(r) + "\n" for r in records).encode() + b"".join(extra_lines)
    if compression == "gzip":
        text = gzip.compress(text)
    elif compression == "zstd":
        text = zstandard.ZstdCompressor().compress(text)
    path.write_bytes(text)
    return str(path)


def read_all(url, batch_rows=7, storage_options=None):
    files = expand_inputs([url], storage_options)
    assert len(files) == 1
    schema = input_schema(files[0], storage_options)
    chunks = list(iter_chunks(files[0], schema, batch_rows, storage_options))
    return files[0], schema, chunks


# ------------------------------------------------------------------------------------------------ listing + sharding


def test_expand_inputs_dir_glob_order_dedupe(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.parquet", "a.parquet", "sub/c.jsonl", "sub/d.jsonl.gz", "_SUCCESS", ".x.parquet.tmp",
                 ".hidden.parquet", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    files = expand_inputs([str(tmp_path)])
    names = [f.url.rsplit("/", 1)[-1] for f in files]
    assert names == ["a.parquet", "b.parquet", "c.jsonl", "d.jsonl.gz"]
    assert [f.index for f in files] == [0, 1, 2, 3] and {f.num_files for f in files} == {4}
    assert [f.format for f in files] == ["parquet", "parquet", "jsonl", "jsonl"]
    assert files[3].compression == "gzip"
    # Arguments keep their order; each argument's matches are sorted; duplicates drop (first wins).
    files = expand_inputs([str(tmp_path / "sub" / "*"), str(tmp_path / "b.parquet"), str(tmp_path)])
    names = [f.url.rsplit("/", 1)[-1] for f in files]
    assert names == ["c.jsonl", "d.jsonl.gz", "b.parquet", "a.parquet"]
    assert all(f.url.startswith("/") for f in files)  # local inputs are recorded as absolute paths


def test_expand_inputs_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.parquet")])
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(InputError, match=r"unsupported input file .*x\.csv"):
        expand_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(InputError, match="matched no"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(ConfigError):
        expand_inputs([])


def test_shard_files_cover_input_exactly_once(tmp_path):
    for i in range(7):
        (tmp_path / f"f{i}.parquet").write_bytes(b"")
    files = expand_inputs([str(tmp_path)])
    for n in (1, 2, 3, 7, 10):
        shards = [shard_files(files, n, i) for i in range(n)]
        assert sorted(f.index for s in shards for f in s) == list(range(7))
        for i, s in enumerate(shards):
            assert [f.index for f in s] == [j for j in range(7) if j % n == i]
    assert shard_files(files, 10, 9) == []  # more shards than files: an empty shard, not an error
    with pytest.raises(ConfigError, match="shard_index"):
        shard_files(files, 3, 3)
    with pytest.raises(ConfigError, match="num_shards"):
        shard_files(files, 0, 0)


def test_redact_url_and_env_endpoint(monkeypatch):
    assert redact_url("https://user:pw@host/a.parquet?X-Amz-Signature=abc&v=1") == (
        "https://host/a.parquet?X-Amz-Signature=REDACTED&v=1"
    )
    assert redact_url("/local/path.parquet") == "/local/path.parquet"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert resolve_storage_options("s3://b/k")["endpoint_url"] == "http://127.0.0.1:1"
    assert resolve_storage_options("s3://b/k", {"endpoint_url": "http://x"})["endpoint_url"] == "http://x"
    assert "endpoint_url" not in resolve_storage_options("/tmp/x")


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "jsonl.gz", "jsonl.zst"])
def test_read_formats_in_bounded_chunks(tmp_path, kind):
    records = rows(50)
    path = tmp_path / f"data.{kind}"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=16)
    else:
        write_jsonl(path, records, {"jsonl": None, "jsonl.gz": "gzip", "jsonl.zst": "zstd"}[kind])
    file, schema, chunks = read_all(str(path), batch_rows=7)
    assert all(c.table.num_rows <= 7 for c in chunks)
    assert all(c.table.schema.equals(schema) for c in chunks)
    table = pa.concat_tables(c.table for c in chunks)
    assert table.to_pylist() == records
    assert np.concatenate([c.row_index for c in chunks]).tolist() == list(range(50))


def test_a_parquet_input_is_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    """pyarrow's ParquetFile pre-buffers every row group iter_batches will read (its default): one read of the whole
    input file, held while its chunks are scored (a 344 MiB file: +441 MiB of peak RSS, +141 MiB without). The
    reader passes pre_buffer=False, so no read is much larger than a row group."""

    from drift_stream.io.streams import iter_planned

    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows(100_000)), path, row_group_size=5_000)  # ~2 MiB; its footer 64 KiB
    reads = record_local_reads(monkeypatch, path)  # bytes of each read of the file
    (file,) = expand_inputs([str(path)])
    chunks = [item for item in iter_planned(file, 4096) if hasattr(item, "table")]
    assert sum(c.table.num_rows for c in chunks) == 100_000 and len(reads) > 20  # 20 row groups
    assert max(reads) < path.stat().st_size / 10, (max(reads), path.stat().st_size)


def test_jsonl_bad_lines_become_bad_rows(tmp_path):
    good = rows(5)
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]), "", "   ", "[1, 2]",
             json.dumps(good[2]), None, json.dumps(good[3]), '"a string"', json.dumps(good[4])]
    data = b"".join((b"\xff\xfe{bad utf8}" if line is None else line.encode()) + b"\n" for line in lines)
    (tmp_path / "x.jsonl").write_bytes(data)
    _, _, chunks = read_all(str(tmp_path / "x.jsonl"), batch_rows=3)
    table = pa.concat_tables(c.table for c in chunks)
    assert table.to_pylist() == good
    assert np.concatenate([c.row_index for c in chunks]).tolist() == [0, 2, 6, 8, 10]
    bad = [(b.row_index, b.reason) for c in chunks for b in c.bad_rows]
    assert bad == [(1, "invalid_json"), (5, "not_a_json_object"), (7, "invalid_utf8"), (9, "not_a_json_object")]
    assert [b.raw for c in chunks for b in c.bad_rows][0] == "{not json"
    # good + bad rows per chunk never exceed batch_rows (blank lines 3, 4 are not rows)
    assert all(c.table.num_rows + len(c.bad_rows) <= 3 for c in chunks)


def test_jsonl_schema_is_unified_over_the_whole_file(tmp_path):
    # 5000 rows: more than one schema-pass chunk (4096); `tag` is null, then a string; `x` int, then float.
    records = [{"tag": None, "x": 1} for _ in range(4500)] + [{"tag": "t", "x": 2.5, "extra": True}] * 500
    write_jsonl(tmp_path / "x.jsonl", records)
    _, schema, chunks = read_all(str(tmp_path / "x.jsonl"), batch_rows=1000)
    assert schema.field("tag").type == pa.string() and schema.field("x").type == pa.float64()
    assert schema.field("extra").type == pa.bool_()
    table = pa.concat_tables(c.table for c in chunks)
    assert table.column("x").to_pylist() == [1.0] * 4500 + [2.5] * 500
    assert table.column("extra").null_count == 4500


def test_jsonl_type_conflict_in_a_passthrough_column_is_carried_as_json_text(tmp_path):
    # 5000 + 1 rows: the conflict appears only in the second schema-pass chunk
    write_jsonl(tmp_path / "mixed.jsonl", [{"x": 1, "k": i} for i in range(5000)] + [{"x": "one", "k": 5000}])
    _, schema, chunks = read_all(str(tmp_path / "mixed.jsonl"), batch_rows=1000)
    assert schema.field("x").type == pa.string() and schema.field("k").type == pa.int64()
    assert as_plan(schema).json_columns == ("x",)
    table = pa.concat_tables(c.table for c in chunks)
    assert table.num_rows == 5001 and not any(c.bad_rows for c in chunks)
    assert [json.loads(v) for v in table.column("x").to_pylist()] == [1] * 5000 + ["one"]


def test_jsonl_type_conflict_in_an_adapter_column_rejects_only_that_row(tmp_path):
    records = [{"x": [1, 2], "k": i} for i in range(6)]
    records[4]["x"] = "not a list"
    write_jsonl(tmp_path / "strict.jsonl", records)
    files = expand_inputs([str(tmp_path / "strict.jsonl")])
    plan = plan_inputs(files, strict_columns=["x"])
    assert plan.schema.field("x").type == pa.list_(pa.int64()) and plan.strict_columns == ("x",)
    chunks = list(iter_chunks(files[0], plan, 4))
    assert np.concatenate([c.row_index for c in chunks]).tolist() == [0, 1, 2, 3, 5]
    bad = [b for c in chunks for b in c.bad_rows]
    assert [(b.row_index, b.reason) for b in bad] == [(4, "wrong_type:x")]
    assert json.loads(bad[0].raw) == records[4]


def test_corrupt_parquet_names_the_file(tmp_path):
    (tmp_path / "garbage.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match=r"garbage\.parquet.*not a readable parquet"):
        read_all(str(tmp_path / "garbage.parquet"))
    # a real parquet file whose data pages are damaged: the footer reads, the pages do not
    pq.write_table(pa.table({"t": [f"row {i} " * 20 for i in range(2000)]}), tmp_path / "ok.parquet",
                   compression="snappy", row_group_size=500)
    data = bytearray((tmp_path / "ok.parquet").read_bytes())
    data[100:20000] = b"\x00" * (20000 - 100)
    (tmp_path / "damaged.parquet").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"damaged\.parquet"):
        read_all(str(tmp_path / "damaged.parquet"), batch_rows=100)


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz"):
        read_all(str(tmp_path / "cut.jsonl.gz"))


def test_iterable_dataset_input():
    import datasets

    records = rows(23)
    ds = datasets.Dataset.from_list(records).to_iterable_dataset(num_shards=3)
    files = expand_inputs(ds)
    assert [f.index for f in files] == [0, 1, 2] and {f.format for f in files} == {"dataset"}
    got = []
    for f in files:
        schema = input_schema(f)
        chunks = list(iter_chunks(f, schema, 4))
        assert all(c.table.num_rows <= 4 for c in chunks)
        got += pa.concat_tables(c.table for c in chunks).to_pylist()
    assert got == records


# ------------------------------------------------------------------------------------------------ prefetch


def test_prefetch_keeps_order_bounds_readahead_and_reraises():
    produced = []

    def source():
        for i in range(20):
            produced.append(i)
            yield i

    consumed = []
    for item in prefetch(source(), max_items=2):
        time.sleep(0.01)
        # the producer may hold one item in hand beyond the 2 queued ones
        assert len(produced) - len(consumed) <= 4
        consumed.append(item)
    assert consumed == list(range(20))

    def failing():
        yield 1
        raise InputError("boom in reader")

    with pytest.raises(InputError, match="boom in reader"):
        list(prefetch(failing(), max_items=2))


def test_prefetch_overlaps_work():
    def slow_source():
        for i in range(6):
            time.sleep(0.05)  # reading
            yield i

    start = time.perf_counter()
    for _ in prefetch(slow_source(), max_items=2):
        time.sleep(0.05)  # computing
    overlapped = time.perf_counter() - start
    # serial would be 12 * 0.05 = 0.6 s; overlapped about 7 * 0.05 = 0.35 s
    assert overlapped < 0.5, overlapped


def test_prefetch_stops_thread_when_consumer_closes():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    gen = prefetch(endless(), max_items=2)
    assert next(gen) == 0
    gen.close()
    time.sleep(0.3)
    assert threading.active_count() <= before


def test_jsonl_keys_missing_from_the_first_row_are_kept(tmp_path):
    records = [{"a": 1}, {"a": 2, "b": "x"}, {"c": [{"k": 1}]}, {"c": [{"j": "s"}]}]
    write_jsonl(tmp_path / "x.jsonl", records)
    _, schema, chunks = read_all(str(tmp_path / "x.jsonl"), batch_rows=10)
    assert schema.names == ["a", "b", "c"]
    got = pa.concat_tables(c.table for c in chunks).to_pylist()
    assert got[1] == {"a": 2, "b": "x", "c": None}
    assert got[3]["c"] == [{"k": None, "j": "s"}]


def test_jsonl_nested_type_conflict_in_one_chunk(tmp_path):
    # meta.source_id: a string in every row but one (a number): meta is carried as JSON text, no row is lost
    records = [{"meta": {"source_id": f"doc-{i}", "lang": "en"}, "n": i} for i in range(5)]
    records[2]["meta"]["source_id"] = 2
    write_jsonl(tmp_path / "mixed1.jsonl", records)
    _, schema, chunks = read_all(str(tmp_path / "mixed1.jsonl"))
    table = pa.concat_tables(c.table for c in chunks)
    assert [json.loads(v) for v in table.column("meta").to_pylist()] == [r["meta"] for r in records]
    assert table.column("n").to_pylist() == list(range(5))


def test_read_over_http(tmp_path):
    import functools
    import http.server

    records = rows(20)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet", row_group_size=6)
    write_jsonl(tmp_path / "b.jsonl.gz", records, "gzip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("a.parquet", "b.jsonl.gz"):
            _, _, chunks = read_all(f"{base}/{name}", batch_rows=6)
            assert pa.concat_tables(c.table for c in chunks).to_pylist() == records
        with pytest.raises(InputError, match=r"missing\.parquet"):
            read_all(f"{base}/missing.parquet")
    finally:
        server.shutdown()
        server.server_close()


def test_publisher_runs_in_order_bounds_what_waits_and_reraises():
    from drift_stream.io.background import Publisher

    done, seen = [], []
    gate = threading.Event()
    publisher = Publisher(depth=2)
    publisher.submit(lambda: gate.wait(5) and done.append(0) or 0, then=seen.append)
    publisher.submit(lambda: done.append(1) or 1, then=seen.append)
    assert seen == []  # nothing waited for yet: the caller goes on
    gate.set()
    for i in range(2, 5):
        publisher.submit(lambda i=i: done.append(i) or i, then=seen.append)
    publisher.close()
    assert done == [0, 1, 2, 3, 4] and seen == [0, 1, 2, 3, 4]

    failing = Publisher(depth=1)
    failing.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.submit(lambda: None)  # the first error comes back with the next call
    failing.close()
