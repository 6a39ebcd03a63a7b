"""Reading and writing runs through a real S3 server (SeaweedFS on 127.0.0.1, see conftest.s3_server)."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zstandard
from killable import KILLABLE_RUN

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import InputError
from drift_stream.io.run_dir import RunDirectory
from drift_stream.io.run_reader import read_completed_shards
from drift_stream.io.streams import InputFile, expand_inputs, input_schema, iter_chunks

pytestmark = pytest.mark.s3

SCHEMA = json.loads((Path(__file__).parent.parent / "schemas" / "run_manifest.schema.json").read_text())


@pytest.fixture(scope="module")
def make_scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return lambda seed=0: build_scorer("random", model=tiny_model_dir, adapter="messages", seed=seed)


def chat(i: int, response: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": f"a{i}" if response is None else response}], "k": i}


def jsonl_bytes(records, extra: bytes = b"") -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode() + extra


def parquet_bytes(records, row_group_size=1000) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def read_prefix(fs, prefix: str) -> pa.Table | None:
    paths = sorted(fs.glob(f"{prefix}/*.parquet"))
    if not paths:
        return None
    return pa.concat_tables(pq.read_table(fs.open(p, "rb")) for p in paths)


def test_read_every_format_from_s3(s3_server):
    fs, bucket = s3_server.filesystem(), s3_server.new_bucket("read")
    records = [chat(i) for i in range(30)]
    payloads = {
        "a.parquet": parquet_bytes(records, row_group_size=8),
        "b.jsonl": jsonl_bytes(records),
        "c.jsonl.gz": gzip.compress(jsonl_bytes(records)),
        "d.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl_bytes(records, b"{oops\n")),
        "_SUCCESS": b"",
    }
    for name, data in payloads.items():
        fs.pipe_file(f"{bucket}/pool/{name}", data)
    files = expand_inputs([f"s3://{bucket}/pool"], s3_server.storage_options)
    assert [f.url for f in files] == [f"s3://{bucket}/pool/{n}" for n in ("a.parquet", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst")]
    for file in files:
        schema = input_schema(file, s3_server.storage_options)
        chunks = list(iter_chunks(file, schema, 7, s3_server.storage_options))
        assert pa.concat_tables(c.table for c in chunks).to_pylist() == records, file.url
        bad = [(b.row_index, b.reason) for c in chunks for b in c.bad_rows]
        assert bad == ([(30, "invalid_json")] if file.url.endswith(".zst") else [])


def test_corrupt_parquet_on_s3_names_the_file(s3_server):
    fs, bucket = s3_server.filesystem(), s3_server.new_bucket("corrupt")
    fs.pipe_file(f"{bucket}/x/broken.parquet", b"PAR1 but not really")
    files = expand_inputs([f"s3://{bucket}/x/*.parquet"], s3_server.storage_options)
    with pytest.raises(InputError, match=rf"s3://{bucket}/x/broken\.parquet"):
        input_schema(files[0], s3_server.storage_options)


def test_small_objects_are_read_through_arrow_and_a_missing_one_is_returned_as_its_error(s3_server):
    """The settling process's marker reads (io/arrow_s3.read_objects): Arrow's own S3 client for s3fs options that
    map onto it, objects in order, an object gone since the listing given back as its error (as fsspec cat_ranges
    gives it), names with glob characters taken literally."""
    import pyarrow.fs

    from drift_stream.io.arrow_s3 import arrow_filesystem, read_objects

    fs, bucket = s3_server.filesystem(), s3_server.new_bucket("small")
    assert isinstance(arrow_filesystem(fs), pyarrow.fs.S3FileSystem)
    paths = [f"{bucket}/runs/pool[v2]/{i}.json" for i in range(5)]
    for i, path in enumerate(paths):
        fs.pipe_file(path, json.dumps({"i": i}).encode())
    got = read_objects(fs, [*paths[:3], f"{bucket}/runs/gone.json", *paths[3:]])
    assert [json.loads(b) for b in got[:3] + got[4:]] == [{"i": i} for i in range(5)]
    assert isinstance(got[3], FileNotFoundError)


def test_aborted_shard_leaves_no_object_on_s3(s3_server):
    bucket = s3_server.new_bucket("abort")
    run = RunDirectory(f"s3://{bucket}/run", s3_server.storage_options)
    writer = run.shard_writer(InputFile("s3://b/in.parquet", 0, 1, "parquet"), pa.schema([("t", pa.string())]))
    writer.write_scored(pa.table({"t": ["x"] * 1000, "id": [str(i) for i in range(1000)],
                                  "drift_score": pa.array([0.5] * 1000, pa.float32())}))
    fs = s3_server.filesystem()
    assert not fs.exists(f"{bucket}/run/data/train-00000-of-00001.parquet")  # nothing visible before commit
    writer.abort()
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/run") == []


def test_10k_pool_from_s3_to_s3(s3_server, make_scorer, caplog):
    caplog.set_level(logging.DEBUG, logger="drift_stream")
    fs, bucket = s3_server.filesystem(), s3_server.new_bucket("pool")
    parquet_records = [[chat(f * 2400 + i, "" if i % 100 == 7 else None) for i in range(2400)] for f in range(4)]
    for f, records in enumerate(parquet_records):
        fs.pipe_file(f"{bucket}/in/part-{f}.parquet", parquet_bytes(records))
    tail = [chat(9600 + i) for i in range(398)]
    fs.pipe_file(f"{bucket}/in/tail.jsonl.gz", gzip.compress(jsonl_bytes(tail, b"not json\n\xff\xfe\n")))
    out = f"s3://{bucket}/runs/r1"
    config = RunConfig(data=(f"s3://{bucket}/in/",), out=out, batch_rows=1000, storage_options=s3_server.storage_options)
    scorer = make_scorer()
    manifest = run_score(config, scorer, progress=False)

    jsonschema.validate(manifest, SCHEMA)
    assert manifest["complete"] and manifest["rows_in"] == 10_000
    assert manifest["rows_in"] == manifest["rows_scored"] + manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == {"empty_response": 96, "invalid_json": 1, "invalid_utf8": 1}
    assert manifest["input_files"][0] == f"s3://{bucket}/in/part-0.parquet"
    data = read_prefix(fs, f"{bucket}/runs/r1/data")
    assert data.num_rows == manifest["rows_scored"] == 10_000 - 98
    assert data.column("k").to_pylist() == [i for i in range(9998) if not (i < 9600 and i % 2400 % 100 == 7)]
    direct = scorer(pa.Table.from_pylist(parquet_records[0]))
    direct = direct.filter(pc.is_null(direct.column("drift_reject_reason"))).drop_columns(["drift_reject_reason"])
    assert data.slice(0, direct.num_rows).equals(direct)
    # the settling process's one read of the data shards (several shards in flight) keeps the input order
    shards = read_completed_shards(RunDirectory.open(out, s3_server.storage_options))
    columns = shards.read_columns(["k", "drift_score", "no_such_column"])
    assert columns.columns == ["k", "drift_score"]
    assert columns.to_arrow().equals(data.select(["k", "drift_score"]))
    assert read_prefix(fs, f"{bucket}/runs/r1/rejects").num_rows == 98
    assert json.loads(fs.cat_file(f"{bucket}/runs/r1/manifest.json")) == manifest

    # Credentials never reach an output object or a log line.
    secret = s3_server.secret_key.encode()
    for path in fs.find(f"{bucket}/runs"):
        assert secret not in fs.cat_file(path), path
    assert s3_server.secret_key not in caplog.text and s3_server.access_key not in caplog.text

    # A finished rerun changes nothing: same objects, same ETags and modification times.
    def objects():
        fs.invalidate_cache()
        return {p: (i["ETag"], i["LastModified"]) for p, i in fs.find(f"{bucket}/runs", detail=True).items()}

    before = objects()
    time.sleep(1.1)  # S3 LastModified has 1 s resolution
    assert run_score(config, make_scorer(), progress=False) == manifest
    assert objects() == before



def test_sigkill_then_rerun_on_s3_equals_uninterrupted_run(s3_server, make_scorer, tiny_model_dir):
    fs, bucket = s3_server.filesystem(), s3_server.new_bucket("kill")
    for f in range(8):
        fs.pipe_file(f"{bucket}/in/part-{f}.parquet",
                     parquet_bytes([chat(f * 30 + i, "" if i == 5 else None) for i in range(30)], row_group_size=10))
    src, out = f"s3://{bucket}/in/", f"s3://{bucket}/killed"
    cmd = [sys.executable, "-c", KILLABLE_RUN, src, out, tiny_model_dir]

    def markers() -> int:
        probe = s3_server.filesystem()
        return len(probe.glob(f"{bucket}/killed/completions/*.json"))

    proc = subprocess.Popen(cmd, env=s3_server.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while markers() < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no completion marker appeared in time"
            time.sleep(0.1)
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    at_kill = markers()
    assert 2 <= at_kill < 8

    options = s3_server.storage_options
    resumed = run_score(RunConfig(data=(src,), out=out, storage_options=options), make_scorer(), progress=False)
    reference = run_score(RunConfig(data=(src,), out=f"s3://{bucket}/ref", storage_options=options),
                          make_scorer(), progress=False)
    assert resumed == reference and resumed["rows_in"] == 240 and resumed["rows_rejected"] == 8
    fs.invalidate_cache()
    data = read_prefix(fs, f"{bucket}/killed/data")
    assert data.equals(read_prefix(fs, f"{bucket}/ref/data"))
    assert len(set(data.column("id").to_pylist())) == data.num_rows == 232
    assert read_prefix(fs, f"{bucket}/killed/rejects").equals(read_prefix(fs, f"{bucket}/ref/rejects"))


def test_an_array_on_s3_reads_each_input_byte_once_and_settles_one_schema(s3_server, make_scorer, monkeypatch):
    """Issue 23 on S3: two shard processes over files of two writers (a struct `meta` / a string `meta`). Every
    input byte is fetched once (observed in s3fs), the first shard writes no manifest, the last one settles one
    schema over both data shards (the struct becomes JSON text) and fetches the markers in one batched call."""
    import s3fs.core

    fs, bucket = s3_server.filesystem(), s3_server.new_bucket("lake")
    fs.pipe_file(f"{bucket}/in/a.parquet", parquet_bytes([{**chat(i), "meta": {"lang": "en"}} for i in range(30)]))
    fs.pipe_file(f"{bucket}/in/b.jsonl.gz", gzip.compress(jsonl_bytes({**chat(30 + i), "meta": "web"}
                                                                        for i in range(20))))
    stored = sum(fs.size(f"{bucket}/in/{n}") for n in ("a.parquet", "b.jsonl.gz"))
    fetched: list[int] = []
    fetch = s3fs.core.S3File._fetch_range

    def observed(self, start, end):
        data = fetch(self, start, end)
        if self.key.startswith("in/"):
            fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", observed)
    cat = s3fs.core.S3FileSystem._cat_file

    async def observed_cat(self, path, *a, **k):
        data = await cat(self, path, *a, **k)
        if "/in/" in path:
            fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_cat_file", observed_cat)
    s3fs.core.S3FileSystem.clear_instance_cache()  # an instance binds its sync cat_file when it is made
    out = f"s3://{bucket}/run"
    for index in (0, 1):
        manifest = run_score(RunConfig(data=(f"s3://{bucket}/in/",), out=out, num_shards=2, shard_index=index,
                                       batch_rows=8, storage_options=s3_server.storage_options), make_scorer(),
                             progress=False)
        if index == 0:
            assert not manifest["complete"] and not fs.exists(f"{bucket}/run/manifest.json")
    assert sum(fetched) == stored  # every input byte once, in an array of two
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["complete"] and manifest["rows_scored"] == 50
    schemas = [pq.read_schema(fs.open(p, "rb")) for p in sorted(fs.glob(f"{bucket}/run/data/*.parquet"))]
    assert len(schemas) == 2 and schemas[0].remove_metadata().equals(schemas[1].remove_metadata())
    data = read_prefix(fs, f"{bucket}/run/data")
    assert [json.loads(v) for v in data.column("meta").to_pylist()] == [{"lang": "en"}] * 30 + ["web"] * 20
    assert json.loads(fs.cat_file(f"{bucket}/run/schema.json"))["json_columns"] == ["meta"]
    markers = RunDirectory.open(out, s3_server.storage_options).completed()
    assert sorted(markers) == [0, 1] and markers[1]["rows_scored"] == 20
