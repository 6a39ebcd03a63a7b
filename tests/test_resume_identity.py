"""A run directory identifies its inputs (issue 22, finding 7): a file regenerated in place (local or S3) or another
IterableDataset with the same shard count is refused on resume, naming what changed; config.json is written once, so
of processes racing the first write with different configs exactly one is accepted.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import InputChangedError, RunDirMismatchError
from drift_stream.io.identity import dataset_fingerprint
from drift_stream.io.run_dir import RunDirectory
from drift_stream.io.streams import expand_inputs


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return build_scorer("random", model=tiny_model_dir, adapter="messages", seed=0)


def chat(i: int, answer: str = "") -> dict:
    return {"id": f"r{i}", "messages": [{"role": "user", "content": f"Calculate {i} + 1."},
                                        {"role": "assistant", "content": answer or f"{i + 1}"}]}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_file_regenerated_in_place_is_refused_naming_it(tmp_path, scorer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [chat(i) for i in range(4)])
    write_jsonl(b, [chat(i) for i in range(4, 8)])
    config = RunConfig(data=(str(a), str(b)), out=str(tmp_path / "run"))
    assert run_score(config, scorer, progress=False)["complete"]
    run_score(config, scorer, progress=False)  # unchanged inputs: the resume is accepted

    # the same name, the same size, other rows: only its identity tells it apart
    before = b.stat()
    write_jsonl(b, [chat(i, answer=f"{i + 2}") for i in range(4, 8)])
    assert b.stat().st_size == before.st_size
    os.utime(b, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # a regeneration a millisecond later
    with pytest.raises(InputChangedError, match=r"b\.jsonl: mtime_ns \d+ -> \d+") as caught:
        run_score(config, scorer, progress=False)
    message = str(caught.value)
    assert "a.jsonl" not in message and "new --out" in message and "delete" in message
    assert isinstance(caught.value, RunDirMismatchError)

    write_jsonl(a, [chat(i) for i in range(5)])  # a longer file: its size says so too
    with pytest.raises(InputChangedError, match=r"a\.jsonl: mtime_ns \d+ -> \d+, size \d+ -> \d+"):
        run_score(config, scorer, progress=False)


def test_the_recorded_identity_is_size_and_mtime_ns(tmp_path, scorer):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [chat(i) for i in range(3)])
    run_score(RunConfig(data=(str(path),), out=str(tmp_path / "run")), scorer, progress=False)
    recorded = RunDirectory.open(str(tmp_path / "run")).read_config()["inputs"]
    assert recorded == {str(path): {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}}


def test_another_iterable_dataset_with_the_same_shard_count_is_refused(tmp_path, scorer):
    import datasets

    def dataset(offset: int):
        return datasets.Dataset.from_list([chat(i + offset) for i in range(6)]).to_iterable_dataset(num_shards=2)

    first, same, other = dataset(0), dataset(0), dataset(100)
    assert dataset_fingerprint(first) == dataset_fingerprint(same) != dataset_fingerprint(other)
    out = str(tmp_path / "run")
    run_score(RunConfig(data=first, out=out), scorer, progress=False)
    run_score(RunConfig(data=same, out=out), scorer, progress=False)  # the same recipe: accepted
    with pytest.raises(InputChangedError, match=r"iterable_dataset:2_shards/00000: fingerprint"):
        run_score(RunConfig(data=other, out=out), scorer, progress=False)


def test_a_streamed_dataset_fingerprint_is_the_same_in_another_process(tmp_path):
    """`datasets` builders hold per-process state: the fingerprint must not (it is compared across processes)."""
    import subprocess
    import sys

    path = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    code = ("import datasets, sys; from drift_stream.io.identity import dataset_fingerprint; "
            f"ds = datasets.load_dataset('parquet', data_files={str(path)!r}, split='train', streaming=True); "
            "print(dataset_fingerprint(ds.map(lambda r: {'y': r['x'] * 2})))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    assert len(runs) == 1 and len(runs.pop()) == 16


def _race(out: str, index: int, rounds: int, barrier, results) -> None:
    for r in range(rounds):
        barrier.wait()
        try:
            RunDirectory(f"{out}/{r}").check_config({"input_files": ["/in.jsonl"], "scorer": {"seed": index}})
            results.put((r, index))
        except RunDirMismatchError:
            results.put((r, None))


def test_processes_racing_the_first_config_write_exactly_one_is_accepted(tmp_path):
    processes, rounds = 4, 25
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_race, args=(str(tmp_path), i, rounds, barrier, results))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in range(processes * rounds)]
    for worker in workers:
        worker.join(timeout=60)
    for r in range(rounds):
        accepted = [index for round_, index in outcomes if round_ == r and index is not None]
        recorded = RunDirectory.open(str(tmp_path / str(r))).read_config()["config"]["scorer"]["seed"]
        assert accepted == [recorded], f"round {r}: accepted {accepted}, recorded {recorded}"


def test_an_s3_object_rewritten_in_place_is_refused_naming_it(tmp_path, scorer, s3_server):
    bucket = s3_server.new_bucket("identity")
    fs = s3_server.filesystem()
    for name, start in (("a", 0), ("b", 4)):
        fs.pipe_file(f"{bucket}/pool/{name}.jsonl",
                     "".join(json.dumps(chat(i)) + "\n" for i in range(start, start + 4)).encode())
    config = RunConfig(data=(f"s3://{bucket}/pool/*.jsonl",), out=f"s3://{bucket}/run",
                       storage_options=s3_server.storage_options)
    assert run_score(config, scorer, progress=False)["complete"]
    recorded = RunDirectory.open(config.out, s3_server.storage_options).read_config()["inputs"]
    assert sorted(recorded) == [f"s3://{bucket}/pool/a.jsonl", f"s3://{bucket}/pool/b.jsonl"]
    assert all(set(v) == {"size", "etag"} for v in recorded.values())
    run_score(config, scorer, progress=False)  # unchanged: accepted

    fs.pipe_file(f"{bucket}/pool/b.jsonl",  # the same size, other bytes
                 "".join(json.dumps(chat(i, answer=f"{i + 2}")) + "\n" for i in range(4, 8)).encode())
    assert expand_inputs(config.data, s3_server.storage_options)[1].identity["size"] == \
        recorded[f"s3://{bucket}/pool/b.jsonl"]["size"]
    with pytest.raises(InputChangedError, match=rf"s3://{bucket}/pool/b\.jsonl: etag \w+ -> \w+"):
        run_score(config, scorer, progress=False)
