"""The one run-directory reader: refine / report / export see completed shards only, and refuse an incomplete run.

A real `drift-stream score` run (random scorer, 8 input files, a 4-task "array" of which only tasks 0 and 1 ran),
as in issue 17: before the reader, `refine` silently kept the top 10% of the finished half.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.cli.main import main
from drift_stream.errors import IncompleteRunError
from drift_stream.io.run_dir import RunDirectory
from drift_stream.io.run_reader import read_completed_shards
from drift_stream.refine.policies import refine_run
from drift_stream.refine.report import write_report

NUM_FILES, ROWS_PER_FILE = 8, 5


@pytest.fixture()
def pool(tmp_path):
    files = []
    for f in range(NUM_FILES):
        rows = [{"messages": [{"role": "user", "content": f"{f}-{i}?"}, {"role": "assistant", "content": str(i)}]}
                for i in range(ROWS_PER_FILE)]
        path = tmp_path / "pool" / f"part-{f}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        files.append(str(path))
    return files


def score_task(pool, out, model, task: int, num_tasks: int = 4) -> int:
    return main(["score", "--data", *pool, "--model", model, "--out", str(out), "--scorer", "random",
                 "--num-shards", str(num_tasks), "--shard-index", str(task), "--quiet"])


def test_refine_and_report_refuse_an_incomplete_run_and_allow_it_with_the_flag(tmp_path, pool, tiny_model_dir,
                                                                                capsys):
    run = tmp_path / "run"
    for task in (0, 1):  # tasks 2 and 3 of the array "failed": input files 2, 3, 6, 7 have no marker
        assert score_task(pool, run, tiny_model_dir, task) == 0
    capsys.readouterr()

    with pytest.raises(IncompleteRunError) as err:
        refine_run(str(run), "top:0.1", str(tmp_path / "r"), progress=False)
    text = str(err.value)
    for f in (2, 3, 6, 7):
        assert f"part-{f}.parquet" in text
    for f in (0, 1, 4, 5):
        assert f"  {pool[f]}\n" not in text
    assert "4 of 8 input files (50.0%)" in text and "--allow-incomplete" in text
    assert err.value.url == str(run) and err.value.config["scorer"]["scorer"] == "random"
    assert not (tmp_path / "r").exists()

    # The CLI: exit 2 with the same message and the score command that completes the run (valid CLI: parsed back).
    assert main(["refine", str(run), "--policy", "top:0.1", "--out", str(tmp_path / "r")]) == 2
    err_text = capsys.readouterr().err
    assert "is not complete" in err_text
    command = err_text.split("the score command of this run:\n  ")[1].strip()
    assert command.startswith("drift-stream score --data") and f"--out {run}" in command
    assert "--scorer random" in command
    assert main(["refine", str(run), "--policy", "top:0.5", "--out", str(tmp_path / "r"), "--allow-incomplete"]) == 0
    assert "refined 50.0% of its input files" in capsys.readouterr().err
    kept = pq.read_table(tmp_path / "r" / "data")
    assert kept.num_rows == 10  # top 50% of the 4 finished files' 20 rows
    assert main(["report", str(run)]) == 2
    assert "is not complete" in capsys.readouterr().err
    path = write_report(str(run), str(tmp_path / "p.html"), allow_incomplete=True)
    assert "Incomplete run" in open(path).read() and "4 of 8 input files (50.0%)" in open(path).read()

    # Finishing the array makes the run complete: refine now reads all 40 rows without the flag.
    for task in (2, 3):
        assert score_task(pool, run, tiny_model_dir, task) == 0
    m = refine_run(str(run), "top:0.5", str(tmp_path / "r2"), progress=False)
    assert m["rows_in"] == NUM_FILES * ROWS_PER_FILE and m["source_fraction_files"] == 1.0


def test_a_shard_without_its_marker_is_never_handed_out(tmp_path, pool, tiny_model_dir):
    run = tmp_path / "run"
    assert score_task(pool, run, tiny_model_dir, 0, num_tasks=1) == 0
    # A writer killed between publishing its data shard and writing the marker leaves exactly this.
    (run / "completions" / "00003.json").unlink()
    (run / "manifest.json").unlink()
    shards = read_completed_shards(RunDirectory.open(str(run)), allow_incomplete=True)
    assert not shards.complete and shards.missing_input_files == [pool[3]]
    assert [p.rsplit("/", 1)[-1] for p in shards.data_files] == [
        f"train-{i:05d}-of-00008.parquet" for i in range(NUM_FILES) if i != 3]
    assert shards.rows_scored == 7 * ROWS_PER_FILE and shards.fraction_files == 7 / 8
    assert shards.scan().collect().height == 7 * ROWS_PER_FILE
    with pytest.raises(IncompleteRunError, match=r"part-3\.parquet"):
        read_completed_shards(RunDirectory.open(str(run)))


def test_refine_finds_s3_through_aws_endpoint_url_and_records_once(s3_server, tmp_path, monkeypatch):
    # One filesystem resolver: refine used to open s3:// without the AWS_ENDPOINT_URL fallback of io/streams.py.
    from test_refine import write_run

    bucket = s3_server.new_bucket("reader")
    full = write_run(f"s3://{bucket}/run", storage_options=s3_server.storage_options)
    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    m = refine_run(f"s3://{bucket}/run", "top:0.5", f"s3://{bucket}/top", progress=False)  # no storage_options
    assert m["rows_in"] == full.num_rows and m["source_fraction_files"] == 1.0
    run = RunDirectory(f"s3://{bucket}/run")
    assert run.write_json_once("beta.json", {"beta": 1.5})["beta"] == 1.5
    assert run.write_json_once("beta.json", {"beta": 0.5})["beta"] == 1.5  # first writer wins on S3 too
    s3_server.filesystem().rm(f"{bucket}/run/completions/00002.json")
    with pytest.raises(IncompleteRunError, match=r"in-2\.parquet"):
        refine_run(f"s3://{bucket}/run", "top:0.5", f"s3://{bucket}/top2", progress=False)
