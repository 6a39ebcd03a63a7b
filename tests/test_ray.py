"""Ray: `score --engine ray` on a real local Ray cluster writes the same run directory as the local engine.

One local Ray (4 logical CPUs: two scoring actors, a replacement and Ray's own tasks) for the module, the shipped
tiny model, a small on-policy bank built once, five input files (four parquet on S3, one jsonl with an undecodable line
and a row the scorer rejects). The local engine's run is the reference every Ray run is compared against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray]

NUM_FILES = 5
ROWS_PER_FILE = 10
FLOAT_COLUMNS = ("drift_score", "drift_grad_norm", "drift_loss")


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: each scoring actor holds one; a replacement actor needs one free while the other still runs.
    context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def assets():
    from drift_stream.embedded.demo import demo_assets

    return demo_assets()


def build_small_bank(assets, out):
    from drift_stream.bank.build import build_bank
    from drift_stream.bank.config import BankConfig
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.rollouts.engine import RolloutConfig

    queries = pq.read_table(assets.queries).slice(0, 6).to_pylist()
    config = BankConfig(rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=24, seed=1),
                        features=FeatureConfig(proj_dim_in=8, proj_dim_out=8), preconditioner="identity")
    return build_bank(assets.model, queries, str(out), config, verifier="numeric", adapter="qa", progress=False)


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory, assets):
    out = tmp_path_factory.mktemp("ray_bank") / "bank"
    build_small_bank(assets, out)
    return str(out)


@pytest.fixture(scope="module")
def pool(s3_server, assets):
    """S3 URL of a prefix holding the input files (parquet files + 1 jsonl with 2 bad rows)."""
    rows = pq.read_table(assets.pool).slice(0, NUM_FILES * ROWS_PER_FILE).to_pylist()
    bucket = s3_server.new_bucket("raypool")
    fs = s3_server.filesystem()
    for i in range(NUM_FILES - 1):
        part = rows[i * ROWS_PER_FILE:(i + 1) * ROWS_PER_FILE]
        with fs.open(f"{bucket}/pool/part-{i}.parquet", "wb") as handle:
            pq.write_table(pa.Table.from_pylist(part), handle)
    last = rows[(NUM_FILES - 1) * ROWS_PER_FILE:]
    last[3] = {**last[3], "messages": [{"role": "user", "content": "a prompt with no reply"}]}
    lines = [json.dumps(r) for r in last]
    lines.insert(5, '{"id": "broken", "messages": [')
    fs.pipe_file(f"{bucket}/pool/part-{NUM_FILES - 1}.jsonl", ("\n".join(lines) + "\n").encode())
    return f"s3://{bucket}/pool/*"


@pytest.fixture(scope="module")
def scorer_kwargs(assets, bank_dir):
    return dict(scorer="drift", model=assets.model, adapter="messages", bank=bank_dir, beta="auto",
                calibration_rows=16, keep_query_scores=True, batch_size=8, max_tokens=256)


def run_config(pool, out, s3_server):
    from drift_stream.engines.local import RunConfig

    return RunConfig(data=(pool,), out=str(out), batch_rows=8, storage_options=s3_server.storage_options)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pool, scorer_kwargs, s3_server):
    """The local engine's run directory over the same input."""
    from drift_stream.engines.local import run_score
    from drift_stream.scoring.build import build_scorer

    out = tmp_path_factory.mktemp("ray_reference") / "run"
    kwargs = dict(scorer_kwargs)
    manifest = run_score(run_config(pool, out, s3_server), build_scorer(kwargs.pop("scorer"), **kwargs),
                         progress=False)
    assert manifest["complete"] and manifest["rows_rejected"] == 2 and manifest["scorer_info"]["beta_mode"] == "auto"
    return str(out)


def _read_run(url, storage_options=None):
    """{relative path: table or parsed JSON} of a run directory (local or s3://)."""
    from drift_stream.io.streams import filesystem

    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache()
    out = {}
    for path in fs.find(root):
        rel = path[len(root) + 1:]
        if rel.startswith("."):
            continue
        with fs.open(path, "rb") as handle:
            out[rel] = json.loads(handle.read()) if rel.endswith(".json") else pq.read_table(handle)
    return out


def _comparable(value):
    """Drop float noise: scores are compared separately within 1e-6."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in ("score_stats", "score_summary", "scorer_info")}
    return value


def assert_same_run(got_url, want_url, storage_options=None):
    got, want = _read_run(got_url, storage_options), _read_run(want_url)
    assert sorted(got) == sorted(want)
    assert any(k.startswith("rejects/") for k in want) and any(k.startswith("completions/") for k in want)
    for rel, value in want.items():
        if isinstance(value, dict):
            assert _comparable(got[rel]) == _comparable(value), rel
            if "scorer_info" in value:
                assert got[rel]["scorer_info"]["beta"] == pytest.approx(value["scorer_info"]["beta"], abs=1e-9)
            stats = value.get("score_stats") or value.get("score_summary")
            if stats:
                theirs = got[rel].get("score_stats") or got[rel].get("score_summary")
                assert theirs["count"] == stats["count"]
                assert theirs["mean"] == pytest.approx(stats["mean"], abs=1e-6)
            continue
        table = got[rel]
        assert table.schema.equals(value.schema, check_metadata=False), rel
        for name in value.column_names:
            if name in FLOAT_COLUMNS:
                a = np.array(table.column(name).to_pylist(), dtype=float)
                b = np.array(value.column(name).to_pylist(), dtype=float)
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"{rel}:{name}")
            elif name == "drift_query_scores":
                for x, y in zip(table.column(name).to_pylist(), value.column(name).to_pylist()):
                    np.testing.assert_allclose(np.array(x, float), np.array(y, float), rtol=0, atol=1e-6)
            else:
                assert table.column(name).to_pylist() == value.column(name).to_pylist(), f"{rel}:{name}"


def _markers(out):
    directory = os.path.join(out, "completions")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _score_actors():
    from drift_stream.engines.ray import ACTOR_NAME_PREFIX

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_NAME_PREFIX)]


@pytest.mark.slow
@pytest.mark.s3
def test_two_actors_s3_in_and_out_equal_the_local_engine_and_refine_report_export_read_it(
        local_ray, pool, reference, scorer_kwargs, s3_server, tmp_path):
    from drift_stream.cli.main import main
    from drift_stream.refine.export import export_run
    from drift_stream.refine.policies import refine_run
    from drift_stream.refine.report import write_report

    out = f"s3://{s3_server.new_bucket('rayout')}/run"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in scorer_kwargs.items() if k != "keep_query_scores"]
    code = main(["score", "--engine", "ray", "--actors", "2", "--data", pool, "--out", out, "--batch-rows", "8",
                 "--keep-query-scores", "--quiet", "--storage-options", json.dumps(s3_server.storage_options), *args])
    assert code == 0
    assert_same_run(out, reference, s3_server.storage_options)

    # refine and report read the Ray-written run (on S3) and give what they give for the local one
    refine_run(out, "top:0.5", str(tmp_path / "refined_ray"), storage_options=s3_server.storage_options,
               progress=False)
    refine_run(reference, "top:0.5", str(tmp_path / "refined_local"), progress=False)
    got = pq.read_table(tmp_path / "refined_ray" / "data").sort_by("id")
    want = pq.read_table(tmp_path / "refined_local" / "data").sort_by("id")
    assert got.num_rows == want.num_rows > 0 and got.column("id").equals(want.column("id"))
    html = write_report(out, str(tmp_path / "report.html"), storage_options=s3_server.storage_options)
    assert "drift_score" in open(html).read()
    # export reads a refine of the Ray run as it reads one of the local run
    exported = {}
    for name, run, options in (("ray", out, s3_server.storage_options), ("local", reference, None)):
        refine_run(run, "weights", str(tmp_path / f"weighted_{name}"), storage_options=options, progress=False)
        # (export reads the scored run's config for its adapter: the Ray run's is on S3)
        export_run(str(tmp_path / f"weighted_{name}"), "trl", str(tmp_path / f"export_{name}"), storage_options=options)
        exported[name] = pq.read_table(tmp_path / f"export_{name}" / "data").sort_by("id")
    assert exported["ray"].num_rows == exported["local"].num_rows > 0
    for column in ("id", "prompt", "completion"):
        assert exported["ray"].column(column).equals(exported["local"].column(column)), column
    np.testing.assert_allclose(exported["ray"].column("weight").to_numpy(),
                               exported["local"].column("weight").to_numpy(), rtol=1e-5)


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_replaced_and_its_file_redone(local_ray, pool, reference, scorer_kwargs,
                                                                 s3_server, tmp_path):
    from drift_stream.engines.ray import RayEngine, score_on_ray

    out = tmp_path / "run"
    engine = RayEngine(scorer_kwargs, actors=2)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        manifest=score_on_ray(run_config(pool, out, s3_server), scorer_kwargs, engine, progress=False)))
    thread.start()
    try:
        _wait_for(lambda: len(_markers(out)) >= 1, 240, "the first finished file")
        assert len(_markers(out)) < NUM_FILES - 1, "the run finished before an actor could be killed"
        ray.kill(ray.get_actor(engine.actor_names[0]))
    finally:
        thread.join(timeout=300)
    assert result["manifest"]["complete"]
    assert engine.stats["actors_replaced"] >= 1 and engine.stats["files_redone"] >= 1
    assert_same_run(str(out), reference)


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes_and_equals_the_local_engine(local_ray, pool, reference, scorer_kwargs,
                                                                      s3_server, tmp_path):
    from drift_stream.engines.ray import RayEngine, score_on_ray

    out = tmp_path / "run"
    config = tmp_path / "score.yaml"
    lines = [f"{k}: {json.dumps(v)}" for k, v in scorer_kwargs.items()]
    config.write_text("\n".join([*lines, f"data: [{json.dumps(pool)}]", "batch_rows: 8", "engine: ray", "actors: 2",
                                 f"ray_address: {json.dumps(local_ray)}", "quiet: true"]) + "\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "drift_stream.cli.main", "score", "--config", str(config), "--out", str(out),
         "--storage-options", json.dumps(s3_server.storage_options)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(lambda: len(_markers(out)) >= 1 or driver.poll() is not None, 240, "the first finished file")
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
        driver.stderr.close()
    done = {name: os.stat(out / "completions" / name).st_mtime_ns for name in _markers(out)}
    assert 1 <= len(done) < NUM_FILES and not (out / "manifest.json").exists()
    # Ray ends a dead driver's actors; wait so that none of them still writes while the rerun starts
    _wait_for(lambda: not _score_actors(), 60, "the killed driver's actors to end")

    engine = RayEngine(scorer_kwargs, actors=2)
    manifest = score_on_ray(run_config(pool, out, s3_server), scorer_kwargs, engine, progress=False)
    assert manifest["complete"]
    assert {n: os.stat(out / "completions" / n).st_mtime_ns for n in done} == done  # finished files were skipped
    assert_same_run(str(out), reference)


@pytest.mark.slow
def test_map_batches_on_actor_pool_equals_direct_scoring(local_ray, tiny_model_dir):
    import ray.data

    from drift_stream.engines.ray import score_with_ray
    from drift_stream.scoring.build import build_scorer

    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"{i} + 2?"},
                                         {"role": "assistant", "content": f"{i} + 2 = {i + 2}"}]} for i in range(24)]
    rows.append({"id": "bad", "messages": [{"role": "user", "content": "no reply"}]})
    table = pa.Table.from_pylist(rows)
    direct = build_scorer("loss", model=tiny_model_dir)(table)
    ds = ray.data.from_arrow(table).repartition(3)
    scored = score_with_ray(ds, scorer="loss", model=tiny_model_dir, concurrency=2, batch_size=8)
    got = sorted(scored.take_all(), key=lambda r: r["id"])
    want = sorted(direct.to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["drift_reject_reason"] for r in got] == [r["drift_reject_reason"] for r in want]
    g = np.array([np.nan if r["drift_score"] is None else r["drift_score"] for r in got], dtype=float)
    w = np.array([np.nan if r["drift_score"] is None else r["drift_score"] for r in want], dtype=float)
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
    assert got[0]["messages"] == want[0]["messages"]


@pytest.mark.slow
def test_bank_build_on_two_actors_equals_the_local_build(local_ray, assets, bank_dir, tmp_path):
    from drift_stream.bank.store import ValidationBank
    from drift_stream.cli.main import main

    # the same bank as `bank_dir`, through the CLI
    queries = tmp_path / "queries.parquet"
    pq.write_table(pq.read_table(assets.queries).slice(0, 6), queries)
    code = main(["bank", "build", "--engine", "ray", "--actors", "2", "--model", assets.model, "--queries",
                 str(queries), "--adapter", "qa", "--verifier", "numeric", "--rollouts", "4", "--max-new-tokens", "24",
                 "--seed", "1", "--proj-dim", "8", "--preconditioner", "identity", "--out", str(tmp_path / "bank"),
                 "--quiet"])
    assert code == 0
    got, want = ValidationBank.load(tmp_path / "bank"), ValidationBank.load(bank_dir)
    a = pq.read_table(tmp_path / "bank" / "rollouts.parquet")
    b = pq.read_table(os.path.join(bank_dir, "rollouts.parquet"))
    assert a.num_rows == b.num_rows == 24
    for name in ("query_id", "rollout_index", "completion", "completion_ids", "reward", "sign", "failure_reason"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    for name in ("mean_logprob", "loss"):
        np.testing.assert_allclose(np.array(a.column(name).to_pylist(), float),
                                   np.array(b.column(name).to_pylist(), float), rtol=0, atol=1e-5, err_msg=name)
    assert got.fingerprint == want.fingerprint
    np.testing.assert_allclose(got.query_vectors.numpy(), want.query_vectors.numpy(), rtol=0, atol=1e-6)
    mine = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    theirs = json.loads(open(os.path.join(bank_dir, "manifest.json")).read())
    for key in ("query_ids", "num_queries", "pass_rate", "dim", "projector", "model", "config"):
        assert mine[key] == theirs[key], key


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--dtype", "bfloat16"), ("--max-batch-tokens", "96")],
                         ids=["dtype-bfloat16", "max-batch-tokens"])
def test_bank_build_on_ray_honours_dtype_and_max_batch_tokens_as_the_local_build(local_ray, assets, tmp_path, flags):
    """Issue 22 finding 6: the actors ran in the checkpoint's dtype whatever --dtype said (rollouts and features in
    float32, the Fisher fit and the fingerprint in bfloat16), and --max-batch-tokens raised TypeError."""
    from drift_stream.bank.store import ValidationBank
    from drift_stream.cli.main import main

    queries = tmp_path / "queries.parquet"
    pq.write_table(pq.read_table(assets.queries).slice(0, 6), queries)
    banks = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        code = main(["bank", "build", "--engine", engine, "--actors", "2", "--model", assets.model, "--queries",
                     str(queries), "--adapter", "qa", "--verifier", "numeric", "--rollouts", "4",
                     "--max-new-tokens", "24", "--seed", "1", "--proj-dim", "8", "--preconditioner", "identity",
                     "--out", str(out), "--quiet", *flags])
        assert code == 0
        banks[engine] = (ValidationBank.load(out), pq.read_table(out / "rollouts.parquet"),
                         json.loads((out / "manifest.json").read_text()))
    (got, got_rollouts, mine), (want, want_rollouts, theirs) = banks["ray"], banks["local"]
    assert mine["model"]["dtype"] == theirs["model"]["dtype"] == ("bfloat16" if "--dtype" in flags else "float32")
    assert mine["config"] == theirs["config"]
    for name in ("query_id", "rollout_index", "completion_ids", "reward", "failure_reason"):
        assert got_rollouts.column(name).to_pylist() == want_rollouts.column(name).to_pylist(), name
    for name in ("mean_logprob", "loss"):
        np.testing.assert_allclose(np.array(got_rollouts.column(name).to_pylist(), float),
                                   np.array(want_rollouts.column(name).to_pylist(), float), rtol=0, atol=1e-5,
                                   err_msg=name)
    assert got.fingerprint == want.fingerprint
    np.testing.assert_allclose(got.query_vectors.numpy(), want.query_vectors.numpy(), rtol=0, atol=1e-6)
