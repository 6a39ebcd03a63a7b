"""Refine policies over synthetic run directories (real parquet, local and fsspec memory://)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import fsspec
import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.errors import ConfigError, InputError, RunDirMismatchError
from drift_stream.io.manifest import ScoreSummary
from drift_stream.refine.policies import Policy, RefineConfig, refine_run

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "refine_manifest.schema.json"
META = pa.struct([("source", pa.string()), ("level", pa.int64())])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def make_table(n: int, start: int, rng: np.random.Generator, *, raw: bool = False) -> pa.Table:
    """Scored rows: chat messages, a struct, a list column; scores rounded to 0.1 so that many tie."""
    rows = np.arange(start, start + n)
    score = np.round(rng.normal(0.0, 1.0, n), 1).astype(np.float32)
    norm = rng.lognormal(0.0, 1.0, n).astype(np.float32)
    # Every 7th row repeats the id of the row before (content-hash ids can collide) with the same score.
    ids = [f"ex-{r:05d}" for r in rows]
    for j in range(1, n):
        if rows[j] % 7 == 0:
            ids[j] = ids[j - 1]
            score[j] = score[j - 1]
    cols = {
        "id": pa.array(ids, pa.string()),
        "row_no": pa.array(rows, pa.int64()),
        "messages": pa.array([[{"role": "user", "content": f"What is {r} + 1? <b>&</b>"},
                               {"role": "assistant", "content": f"{r + 1}"}] for r in rows], MESSAGES),
        "meta": pa.array([{"source": "gym", "level": int(r % 3)} for r in rows], META),
        "drift_score": pa.array(score, pa.float32()),
        "drift_grad_norm": pa.array(norm, pa.float32()),
        "drift_num_tokens": pa.array(rng.integers(5, 200, n), pa.int32()),
        "drift_query_scores": pa.array([[float(s), float(-s)] for s in score], pa.list_(pa.float32())),
    }
    if raw:
        cols["drift_raw_score"] = pa.array(score * norm, pa.float32())
    return pa.table(cols)


def write_run(root: str, sizes=(40, 0, 25, 35), *, seed: int = 0, raw: bool = False, bank: str | None = None,
              storage_options: dict | None = None) -> pa.Table:
    """A run directory as `drift-stream score` writes it; returns the concatenated scored table."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    rng = np.random.default_rng(seed)
    tables, start = [], 0
    for i, n in enumerate(sizes):
        t = make_table(n, start, rng, raw=raw)
        start += n
        tables.append(t)
        fs.makedirs(f"{path}/data", exist_ok=True)
        with fs.open(f"{path}/data/train-{i:05d}-of-{len(sizes):05d}.parquet", "wb") as f:
            pq.write_table(t, f)
    rejects = pa.table({"id": ["bad-1", "bad-2", "bad-3"],
                        "messages": pa.array([[{"role": "user", "content": "x"}]] * 3, MESSAGES),
                        "drift_reject_reason": ["too_long:300>256", "empty_response", "too_long:999>256"]})
    fs.makedirs(f"{path}/rejects", exist_ok=True)
    with fs.open(f"{path}/rejects/train-00000-of-{len(sizes):05d}.parquet", "wb") as f:
        pq.write_table(rejects, f)
    full = pa.concat_tables(tables)
    inputs = mark_complete(root, sizes, rejected={0: 3}, storage_options=storage_options)
    # the shape of schemas/run_manifest.schema.json (the fields the report and refine read)
    manifest = {"kind": "score", "rows_in": full.num_rows + 3, "rows_scored": full.num_rows, "rows_rejected": 3,
                "rejected_by_reason": {"empty_response": 1, "too_long": 2}, "version": "0.1.0", "complete": True,
                "input_files": inputs,
                "config": {"input_files": inputs, "scorer": {"scorer": "drift", "bank": bank}},
                "scorer_info": {"beta": 1.0, "beta_mode": "fixed"}}
    if raw:
        manifest["scorer_info"] = {"beta": 0.93, "beta_mode": "auto", "debias": {
            "beta": 0.93, "spearman_score_vs_norm_before": 0.61, "spearman_score_vs_norm_after": 0.02,
            "calibration_rows": 64}}
    with fs.open(f"{path}/manifest.json", "w") as f:
        json.dump(manifest, f)
    return full


def mark_complete(root: str, sizes, *, rejected: dict[int, int] | None = None, only=None,
                  storage_options: dict | None = None) -> list[str]:
    """Completion markers (as io/run_dir.ShardWriter.commit writes them) and config.json for the shards of `root`;
    `only`: the input indexes that finished (default all). Returns the input file names."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    rejected = rejected or {}
    inputs = [f"in-{i}.parquet" for i in range(len(sizes))]
    fs.makedirs(f"{path}/completions", exist_ok=True)
    for i, n in enumerate(sizes):
        if only is not None and i not in only:
            continue
        name = f"train-{i:05d}-of-{len(sizes):05d}.parquet"
        summary = ScoreSummary()
        with fs.open(f"{path}/data/{name}", "rb") as f:
            summary.add(pq.read_table(f, columns=["drift_score"]).column(0).to_numpy(zero_copy_only=False))
        marker = {"input_index": i, "num_input_files": len(sizes), "input_file": inputs[i],
                  "data_file": f"data/{name}", "rejects_file": f"rejects/{name}" if rejected.get(i) else None,
                  "rows_in": n + rejected.get(i, 0), "rows_scored": n, "rows_rejected": rejected.get(i, 0),
                  "rejected_by_reason": {"too_long": rejected[i]} if rejected.get(i) else {},
                  "score_summary": summary.to_dict()}
        with fs.open(f"{path}/completions/{i:05d}.json", "w") as f:
            json.dump(marker, f)
    with fs.open(f"{path}/config.json", "w") as f:
        json.dump({"config": {"input_files": inputs, "scorer": {"scorer": "random", "model": "m"}}}, f)
    return inputs


def read_out(root: str, storage_options: dict | None = None) -> list[pa.Table]:
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    out = []
    for p in sorted(fs.glob(f"{path}/data/train-*.parquet")):
        with fs.open(p, "rb") as f:
            out.append(pq.read_table(f))
    return out


def expected_top(full: pa.Table, p: float) -> list[int]:
    """Global row numbers of the top round(p * N) rows: an explicit sort by (-score, id, row)."""
    n = full.num_rows
    k = int(math.floor(p * n + 0.5))
    keys = sorted(zip((-full["drift_score"].to_numpy().astype(np.float64)).tolist(), full["id"].to_pylist(),
                      full["row_no"].to_pylist()))
    return sorted(r for _, _, r in keys[:k])


def explicit_weights(score: np.ndarray, temperature: float) -> np.ndarray:
    """weight_map exp_z, computed directly: exp(z / T) / mean."""
    z = (score.astype(np.float64) - score.mean()) / score.std()
    w = np.exp(z / temperature)
    return w / w.mean()


@pytest.fixture()
def run(tmp_path):
    full = write_run(str(tmp_path / "run"))
    return str(tmp_path / "run"), full


@pytest.mark.parametrize("p", [0.013, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_top_keeps_exactly_the_sorted_rows(run, tmp_path, p):
    root, full = run
    assert len(set(full["drift_score"].to_pylist())) < full.num_rows / 2  # the data really has ties
    out = str(tmp_path / f"top{p}")
    manifest = refine_run(root, f"top:{p}", out, progress=False)
    shards = read_out(out)
    assert len(shards) == 4  # one output shard per input shard, empty ones included
    kept = sorted(r for t in shards for r in t["row_no"].to_pylist())
    want = expected_top(full, p)
    assert kept == want
    assert manifest["rows_kept"] == manifest["rows_written"] == len(want) == int(math.floor(p * 100 + 0.5))
    assert all(all(t["keep"].to_pylist()) for t in shards)
    cut = manifest["cut"]
    assert cut["rows_target"] == len(want)
    scores = {r: s for r, s in zip(full["row_no"].to_pylist(), full["drift_score"].to_pylist())}
    assert cut["score"] == min(scores[r] for r in want)


@pytest.mark.parametrize("p,want,last", [(0.2, [0], 0), (0.4, [0, 1], 1), (0.6, [0, 1, 3], 3), (0.8, [0, 1, 2, 3], 2)])
def test_top_breaks_ties_on_duplicate_ids_by_position(tmp_path, p, want, last):
    # All scores equal, ids collide within and across shards: order is (id, position in run).
    (tmp_path / "run" / "data").mkdir(parents=True)
    for i, (ids, rows) in enumerate(((["a", "a", "b"], [0, 1, 2]), (["a", "b"], [3, 4]))):
        pq.write_table(pa.table({"id": ids, "row_no": rows, "drift_score": pa.array([1.5] * len(ids), pa.float32())}),
                       tmp_path / "run" / "data" / f"train-{i:05d}-of-00002.parquet")
    mark_complete(str(tmp_path / "run"), [3, 2])
    m = refine_run(str(tmp_path / "run"), f"top:{p}", str(tmp_path / "o"), progress=False)
    assert sorted(r for t in read_out(str(tmp_path / "o")) for r in t["row_no"].to_pylist()) == want
    assert (m["cut"]["id"], m["cut"]["row"]) == (["a", "a", "b", "a", "b"][last], last)


def test_top_that_rounds_to_no_row(run, tmp_path):
    root, full = run
    m = refine_run(root, "top:0.004", str(tmp_path / "o"), progress=False)  # round(0.4) = 0
    assert m["rows_kept"] == m["rows_written"] == 0 and m["cut"]["rows_target"] == 0
    assert [t.num_rows for t in read_out(str(tmp_path / "o"))] == [0, 0, 0, 0]
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    assert refine_run(root, "top:0.005", str(tmp_path / "p"), progress=False)["rows_kept"] == 1  # 0.5 rounds up


def test_top_keep_all_marks_rows(run, tmp_path):
    root, full = run
    out = str(tmp_path / "all")
    manifest = refine_run(root, "top:0.3", out, keep_all=True, progress=False)
    t = pa.concat_tables(read_out(out))
    assert t.num_rows == full.num_rows == manifest["rows_written"]
    assert t["row_no"].to_pylist() == full["row_no"].to_pylist()  # order preserved
    kept = sorted(r for r, k in zip(t["row_no"].to_pylist(), t["keep"].to_pylist()) if k)
    assert kept == expected_top(full, 0.3)
    assert manifest["rows_kept"] == 30


@pytest.mark.parametrize("policy,cut", [("threshold:0.45", 0.45), ("threshold:-1", -1.0), ("positive", 0.0)])
def test_threshold_and_positive(run, tmp_path, policy, cut):
    root, full = run
    out = str(tmp_path / "thr")
    manifest = refine_run(root, policy, out, progress=False)
    t = pa.concat_tables(read_out(out))
    score = full["drift_score"].to_numpy().astype(np.float64)
    want = full["row_no"].to_numpy()[score > cut].tolist()
    assert t["row_no"].to_pylist() == want
    assert 0 < len(want) < full.num_rows
    assert manifest["rows_kept"] == len(want)
    assert manifest["cut"] == {"score": cut}
    assert manifest["score_stats_kept"]["min"] > cut


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_weights_mean_one_monotone_and_explicit(run, tmp_path, temperature):
    """The exp_z map (the only map of earlier versions) still gives its numbers."""
    root, full = run
    out = str(tmp_path / "w")
    manifest = refine_run(root, "weights", out, temperature=temperature, weight_map="exp_z", progress=False)
    t = pa.concat_tables(read_out(out))
    assert t.num_rows == full.num_rows and t.schema.field("weight").type == pa.float32()
    w = t["weight"].to_numpy().astype(np.float64)
    score = t["drift_score"].to_numpy()
    assert abs(w.mean() - 1.0) < 1e-6
    np.testing.assert_allclose(w, explicit_weights(score, temperature), rtol=2e-6)
    order = np.argsort(score, kind="stable")
    s_sorted, w_sorted = score[order].astype(np.float64), w[order]
    step = np.diff(s_sorted) > 0
    assert np.all(np.diff(w_sorted)[step] > 0) and np.all(np.diff(w_sorted)[~step] == 0)
    assert manifest["weight_stats"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert manifest["rows_kept"] == full.num_rows


def test_weights_sharpen_with_lower_temperature(run, tmp_path):
    root, _ = run
    for weight_map in ("rank", "clipped_z", "exp_z"):
        maxima = [refine_run(root, "weights", str(tmp_path / f"w{weight_map}{t}"), temperature=t,
                             weight_map=weight_map, progress=False)["weight_stats"]["max"] for t in (0.5, 1.0, 2.0)]
        assert maxima[0] > maxima[1] > maxima[2] > 1.0


def test_repeat_reproducible_and_close_to_weights(run, tmp_path):
    root, full = run
    a = refine_run(root, "repeat", str(tmp_path / "a"), seed=3, weight_map="exp_z", progress=False)
    b = refine_run(root, "repeat", str(tmp_path / "b"), seed=3, weight_map="exp_z", progress=False)
    c = refine_run(root, "repeat", str(tmp_path / "c"), seed=4, weight_map="exp_z", progress=False)
    ta, tb, tc = read_out(str(tmp_path / "a")), read_out(str(tmp_path / "b")), read_out(str(tmp_path / "c"))
    assert all(x.equals(y) for x, y in zip(ta, tb)) and a["rows_written"] == b["rows_written"]
    assert [x["row_no"].to_pylist() for x in ta] != [x["row_no"].to_pylist() for x in tc]
    assert "weight" not in ta[0].column_names and "keep" not in ta[0].column_names

    w = explicit_weights(full["drift_score"].to_numpy(), 1.0)
    frac = w - np.floor(w)
    sigma = math.sqrt(float((frac * (1 - frac)).sum()))
    for manifest, tables in ((a, ta), (c, tc)):
        total = sum(t.num_rows for t in tables)
        assert total == manifest["rows_written"] == manifest["repeat"]["copies_total"]
        assert abs(total - w.sum()) <= 4 * sigma + 1
        copies = np.bincount(np.concatenate([t["row_no"].to_numpy() for t in tables]), minlength=full.num_rows)
        assert np.all((copies == np.floor(w)) | (copies == np.floor(w) + 1))
        assert manifest["rows_kept"] == int((copies > 0).sum())
    # shuffled across shards: output shard 0 holds rows of several input shards, not in input order
    first = ta[0]["row_no"].to_numpy()
    assert len({int(r) // 50 for r in first}) > 1 and np.any(np.diff(first) < 0)


def test_every_input_column_passes_through(run, tmp_path):
    root, full = run
    refine_run(root, "top:0.5", str(tmp_path / "t"), progress=False)
    refine_run(root, "weights", str(tmp_path / "w"), progress=False)
    for name, extra in (("t", "keep"), ("w", "weight")):
        t = pa.concat_tables(read_out(str(tmp_path / name)))
        assert t.column_names == full.column_names + [extra]
        assert t.schema.remove(t.schema.get_field_index(extra)).equals(full.schema)
        want = full.filter(pa.compute.is_in(full["row_no"], t["row_no"]))
        assert t.drop_columns([extra]).equals(want)


def test_refine_into_and_from_memory_url(tmp_path):
    fs = fsspec.filesystem("memory")
    try:
        full = write_run("memory://refine-src/run")
        manifest = refine_run("memory://refine-src/run", "top:0.2", "memory://refine-dst/out", progress=False)
        assert fs.exists("/refine-dst/out/manifest.json")
        t = pa.concat_tables(read_out("memory://refine-dst/out"))
        assert sorted(t["row_no"].to_pylist()) == expected_top(full, 0.2)
        assert manifest["source_run"] == "memory://refine-src/run"
        assert not [p for p in fs.find("/refine-dst") if "tmp" in p]
        # local source, memory:// destination, repeat (the external shuffle uploads each bucket)
        write_run(str(tmp_path / "run"))
        m = refine_run(str(tmp_path / "run"), "repeat", "memory://refine-dst/rep", progress=False)
        assert sum(t.num_rows for t in read_out("memory://refine-dst/rep")) == m["rows_written"] > 0
    finally:
        for d in ("/refine-src", "/refine-dst"):
            if fs.exists(d):
                fs.rm(d, recursive=True)


@pytest.mark.s3
def test_refine_and_report_on_real_s3(s3_server):
    from drift_stream.refine.report import write_report

    so = s3_server.storage_options
    bucket = s3_server.new_bucket("refine")
    full = write_run(f"s3://{bucket}/run", storage_options=so)
    m = refine_run(f"s3://{bucket}/run", "top:0.3", f"s3://{bucket}/top", storage_options=so, progress=False)
    t = pa.concat_tables(read_out(f"s3://{bucket}/top", so))
    assert sorted(t["row_no"].to_pylist()) == expected_top(full, 0.3) and m["rows_kept"] == 30
    r = refine_run(f"s3://{bucket}/run", "repeat", f"s3://{bucket}/rep", seed=1, storage_options=so, progress=False)
    assert sum(x.num_rows for x in read_out(f"s3://{bucket}/rep", so)) == r["rows_written"]
    fs = s3_server.filesystem()
    assert json.loads(fs.cat_file(f"{bucket}/top/manifest.json")) == m
    assert sorted(p.split(f"{bucket}/top/", 1)[1] for p in fs.find(f"{bucket}/top")) == (
        [f"completions/{i:05d}.json" for i in range(4)] + [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)]
        + ["manifest.json", "refine_config.json", "refine_plan.json"])  # nothing left behind on S3
    write_report(f"s3://{bucket}/run", storage_options=so)
    assert b'id="rejects"' in fs.cat_file(f"{bucket}/run/report.html")


def test_manifest_matches_schema_and_reruns(run, tmp_path):
    root, full = run
    schema = json.loads(SCHEMA.read_text())
    out = str(tmp_path / "o")
    for policy, weight_map in (("top:0.1", "rank"), ("positive", "rank"), ("weights", "rank"),
                               ("weights", "clipped_z"), ("weights", "exp_z"), ("repeat", "rank")):
        name = f"{policy.replace(':', '_')}_{weight_map}"
        m = refine_run(root, policy, str(tmp_path / name), weight_map=weight_map, progress=False)
        jsonschema.validate(m, schema)
        on_disk = json.loads((tmp_path / name / "manifest.json").read_text())
        assert on_disk == m and m["rows_in"] == full.num_rows and m["source_rows_rejected"] == 3
        assert m["config"]["weight_map"] == weight_map
        assert (m["weight_summary"] is None) == (policy not in ("weights", "repeat"))
    first = refine_run(root, "top:0.1", out, progress=False)
    before = [t for t in read_out(out)]
    again = refine_run(root, "top:0.1", out, progress=False)  # same config: same output
    assert [t.equals(u) for t, u in zip(before, read_out(out))] == [True] * 4
    assert again["rows_kept"] == first["rows_kept"]
    with pytest.raises(RunDirMismatchError, match="top:0.2"):
        refine_run(root, "top:0.2", out, progress=False)
    write_run(str(tmp_path / "other"))
    with pytest.raises(RunDirMismatchError, match="other"):
        refine_run(str(tmp_path / "other"), "top:0.1", out, progress=False)
    assert not [f for f in os.listdir(tmp_path / "o" / "data") if f.startswith(".")]


@pytest.mark.parametrize("spec,match", [
    ("top:1.5", r"\(0, 1\]"), ("top:0", r"\(0, 1\]"), ("top:-0.1", r"\(0, 1\]"), ("top", "finite number"),
    ("threshold:abc", "number"), ("threshold:nan", "finite"), ("positive:1", "takes no value"),
    ("weights:2", "takes no value"), ("bogus", "unknown refine policy"), ("", "non-empty"),
])
def test_bad_policy_strings(spec, match):
    with pytest.raises(ConfigError, match=match):
        Policy.parse(spec)


def test_policy_parse_round_trip_and_config_errors(run, tmp_path):
    assert Policy.parse("top:0.1") == Policy("top", 0.1) and str(Policy.parse(" TOP:0.10 ")) == "top:0.1"
    assert Policy.parse("threshold:-2") == Policy("threshold", -2.0) and Policy.parse("positive").value is None
    for spec in ("top:0.123456789", "threshold:-2", "threshold:1e-09", "weights"):
        assert Policy.parse(str(Policy.parse(spec))) == Policy.parse(spec)
    assert str(Policy.parse("threshold:-2")) == "threshold:-2"
    with pytest.raises(ConfigError, match="temperature"):
        RefineConfig("weights", temperature=0.0)
    with pytest.raises(ConfigError, match="keep_all"):
        RefineConfig("weights", keep_all=True)
    assert RefineConfig("weights").weight_map == "rank"  # the default map
    with pytest.raises(ConfigError, match="weight_map 'softmax'.*rank, clipped_z, exp_z"):
        RefineConfig("weights", weight_map="softmax")
    for bad in (0.0, -1.0, math.inf, True):
        with pytest.raises(ConfigError, match="clip_z"):
            RefineConfig("weights", weight_map="clipped_z", clip_z=bad)
    root, _ = run
    with pytest.raises(ConfigError, match="run directory itself"):
        refine_run(root, "positive", root, progress=False)


def test_bad_inputs_are_typed_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        refine_run(str(tmp_path / "nothing"), "positive", str(tmp_path / "o"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a run directory"):
        refine_run(str(tmp_path / "empty"), "positive", str(tmp_path / "o"), progress=False)
    t = make_table(5, 0, np.random.default_rng(0))
    t = t.set_column(t.schema.get_field_index("drift_score"), "drift_score",
                     pa.array([0.1, float("nan"), 0.2, 0.3, 0.4], pa.float32()))
    (tmp_path / "nan" / "data").mkdir(parents=True)
    pq.write_table(t, tmp_path / "nan" / "data" / "train-00000-of-00001.parquet")
    mark_complete(str(tmp_path / "nan"), [5])
    with pytest.raises(InputError, match="NaN"):
        refine_run(str(tmp_path / "nan"), "top:0.5", str(tmp_path / "o"), progress=False)
    pq.write_table(t.drop_columns(["id"]), tmp_path / "nan" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(InputError, match="no id column"):
        refine_run(str(tmp_path / "nan"), "top:0.5", str(tmp_path / "o"), progress=False)


@pytest.mark.parametrize("policy,column", [("top:0.5", "keep"), ("weights", "weight")])
def test_hf_datasets_reads_refined_shards(tmp_path, policy, column):
    # Shards written by `datasets` carry its feature list in the parquet metadata; refine must extend it.
    datasets = pytest.importorskip("datasets")
    (tmp_path / "run" / "data").mkdir(parents=True)
    rows = {"id": ["a", "b", "c", "d"], "messages": [[{"role": "user", "content": f"q{i}"}] for i in range(4)],
            "drift_score": [0.1, 0.5, -0.2, 0.3]}
    src = datasets.Dataset.from_dict(rows).cast_column("drift_score", datasets.Value("float32"))
    src.to_parquet(str(tmp_path / "run" / "data" / "train-00000-of-00001.parquet"))
    mark_complete(str(tmp_path / "run"), [4])
    refine_run(str(tmp_path / "run"), policy, str(tmp_path / "o"), progress=False)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "o" / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert column in ds.column_names and ds.num_rows == (2 if column == "keep" else 4)
    assert ds[0]["messages"] == [{"role": "user", "content": "q1" if column == "keep" else "q0"}]
    meta = json.loads(pq.read_schema(tmp_path / "o" / "data" / "train-00000-of-00001.parquet").metadata[b"huggingface"])
    assert meta["info"]["features"][column] == {"dtype": "bool" if column == "keep" else "float32", "_type": "Value"}


def expected_stratified(full: pa.Table, p: float, groups: list[str]) -> list[int]:
    """Explicit stratified top:P: k = round(P*N) split by largest remainders over groups, then top inside each."""
    n = full.num_rows
    k = int(math.floor(p * n + 0.5))
    names = sorted(set(groups))
    sizes = {g: groups.count(g) for g in names}
    exact = {g: k * sizes[g] / n for g in names}
    counts = {g: int(math.floor(exact[g])) for g in names}
    for g in sorted(names, key=lambda g: (-(exact[g] - counts[g]), g))[: k - sum(counts.values())]:
        counts[g] += 1
    score = full["drift_score"].to_numpy().astype(np.float64)
    ids, rows = full["id"].to_pylist(), full["row_no"].to_pylist()
    kept = []
    for g in names:
        members = sorted((-score[i], ids[i], rows[i]) for i in range(n) if groups[i] == g)
        kept += [r for _, _, r in members[: counts[g]]]
    return sorted(kept)


@pytest.mark.parametrize("p", [0.1, 0.33, 0.5])
def test_stratified_top_keeps_each_groups_share(tmp_path, run, p):
    root, full = run
    level = [str(m["level"]) for m in full["meta"].to_pylist()]
    # stratify by a plain column: write a run whose shards carry `task` = meta.level
    tasked = str(tmp_path / "tasked")
    for path in sorted(Path(root, "data").glob("*.parquet")):
        t = pq.read_table(path)
        t = t.append_column("task", pa.array([f"t{m['level']}" for m in t["meta"].to_pylist()]))
        Path(tasked, "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(t, Path(tasked, "data", path.name))
    mark_complete(tasked, [pq.read_metadata(p).num_rows for p in sorted(Path(root, "data").glob("*.parquet"))])
    m = refine_run(tasked, f"top:{p}", str(tmp_path / "o"), stratify_by=["task"], progress=False)
    kept = sorted(r for t in read_out(str(tmp_path / "o")) for r in t["row_no"].to_pylist())
    assert kept == expected_stratified(full, p, [f"t{x}" for x in level])
    assert sum(g["kept"] for g in m["cut"]["strata"]) == m["rows_kept"] == len(kept)
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))


def test_stratified_top_with_length_buckets(tmp_path, run):
    root, full = run
    m = refine_run(root, "top:0.25", str(tmp_path / "o"), length_buckets=4, progress=False)
    tokens = full["drift_num_tokens"].to_numpy().astype(np.float64)
    edges = np.quantile(tokens, [0.25, 0.5, 0.75])
    np.testing.assert_allclose(m["cut"]["length_edges"], edges)
    buckets = [f"len{int((t > edges).sum())}" for t in tokens]
    kept = sorted(r for t in read_out(str(tmp_path / "o")) for r in t["row_no"].to_pylist())
    assert kept == expected_stratified(full, 0.25, buckets)


def test_stratify_needs_top_and_an_existing_column(tmp_path, run):
    root, _ = run
    with pytest.raises(ConfigError, match="only apply to top"):
        refine_run(root, "weights", str(tmp_path / "o"), stratify_by=["task"], progress=False)
    with pytest.raises(ConfigError, match="no column nope"):
        refine_run(root, "top:0.1", str(tmp_path / "o2"), stratify_by=["nope"], progress=False)
