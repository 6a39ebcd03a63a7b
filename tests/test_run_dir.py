"""io/run_dir.py: score statistics against numpy, config check, atomic shards and markers, manifest."""

from __future__ import annotations

import json
import os

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.errors import RunDirMismatchError
from drift_stream.io.manifest import (
    ORDER_STATS_POINTS,
    QUANTILES,
    ScoreSummary,
    config_diff,
    merge_score_summaries,
)
from drift_stream.io.run_dir import (
    RunDirectory,
    reason_code,
    rejects_schema,
    shard_name,
)
from drift_stream.io.streams import InputFile

SCHEMA = json.loads(open(os.path.join(os.path.dirname(__file__), "..", "schemas", "run_manifest.schema.json")).read())


def summaries(parts):
    out = []
    for part in parts:
        s = ScoreSummary()
        s.add(part)
        out.append(s.to_dict())
    return out


def test_score_stats_exact_against_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=n).astype(np.float32) for n in (0, 1, 17, 300, 4096)]
    parts[2][3] = np.nan  # non-finite scores are counted apart, not averaged
    stats = merge_score_summaries(summaries(parts))
    values = np.concatenate(parts).astype(np.float64)
    values = values[np.isfinite(values)]
    assert stats["count"] == values.size == 1 + 16 + 300 + 4096
    assert stats["nonfinite"] == 1
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-12)
    assert (stats["min"], stats["max"]) == (values.min(), values.max())
    assert stats["quantiles_exact"] is True
    np.testing.assert_allclose([stats["quantiles"][str(q)] for q in QUANTILES], np.quantile(values, QUANTILES), rtol=0, atol=1e-12)


def test_score_stats_sketch_is_close_when_files_are_large():
    rng = np.random.default_rng(1)
    parts = [rng.uniform(size=50_000).astype(np.float32), rng.uniform(size=9_000).astype(np.float32) * 2]
    stats = merge_score_summaries(summaries(parts))
    values = np.sort(np.concatenate(parts).astype(np.float64))
    assert stats["quantiles_exact"] is False
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)  # mean/std/min/max stay exact
    assert stats["std"] == pytest.approx(values.std(), rel=1e-12)
    for q in QUANTILES:
        # the sketch keeps ORDER_STATS_POINTS evenly spaced order statistics per file: rank error <= n / points
        rank = np.searchsorted(values, stats["quantiles"][str(q)]) / values.size
        assert abs(rank - q) <= 1.5 / ORDER_STATS_POINTS * 50_000 / values.size + 1e-4, (q, rank)


def test_empty_stats_and_helpers():
    stats = merge_score_summaries(summaries([np.zeros(0)]))
    assert stats["count"] == 0 and stats["mean"] is None and stats["quantiles"] == {}
    assert shard_name(3, 12) == "train-00003-of-00012.parquet"
    assert reason_code("too_long:2049>2048") == "too_long" and reason_code("empty_response") == "empty_response"
    diff = config_diff({"a": 1, "s": {"seed": 0, "x": [1]}}, {"a": 1, "s": {"seed": 1}, "new": True})
    assert diff == ["  new: <absent> -> true", "  s.seed: 0 -> 1", "  s.x: [1] -> <absent>"]


def test_check_config_records_then_refuses_a_different_one(tmp_path):
    run = RunDirectory(str(tmp_path / "out"))
    config = {"input_files": ["/a.parquet"], "scorer": {"scorer": "random", "seed": 0}}
    run.check_config(config)
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded["config"] == config
    mtime = os.stat(tmp_path / "out" / "config.json").st_mtime_ns
    RunDirectory(str(tmp_path / "out")).check_config(config)  # same config: accepted, not rewritten
    assert os.stat(tmp_path / "out" / "config.json").st_mtime_ns == mtime
    other = {"input_files": ["/a.parquet"], "scorer": {"scorer": "random", "seed": 1}}
    with pytest.raises(RunDirMismatchError) as info:
        RunDirectory(str(tmp_path / "out")).check_config(other)
    message = str(info.value)
    assert "scorer.seed: 0 -> 1" in message
    assert message.count('"seed": 0') == 1 and message.count('"seed": 1') == 1  # both configs printed


def _file(index=0, num=2):
    return InputFile(url=f"/in/f{index}.parquet", index=index, num_files=num, format="parquet")


def test_shard_writer_publishes_atomically_then_marks(tmp_path):
    run = RunDirectory(str(tmp_path))
    schema = pa.schema([("text", pa.string())])
    writer = run.shard_writer(_file(1), schema)
    scored = pa.table({"text": ["a", "b"], "id": ["1", "2"], "drift_score": pa.array([0.5, 0.25], pa.float32())})
    writer.write_scored(scored)
    writer.write_rejects(pa.table({"text": ["c"], "drift_reject_reason": ["empty_response"],
                                   "drift_row_index": pa.array([2], pa.int64())}))
    final = tmp_path / "data" / "train-00001-of-00002.parquet"
    assert not final.exists() and list((tmp_path / "data").glob(".train-00001-of-00002.parquet.tmp-*"))
    assert run.completed_indexes() == set()
    summary = ScoreSummary()
    summary.add(np.array([0.5, 0.25]))
    marker = writer.commit({"rows_in": 3, "rows_scored": 2, "rows_rejected": 1,
                            "rejected_by_reason": {"empty_response": 1}}, summary)
    assert pq.read_table(final).equals(scored)
    rejects = pq.read_table(tmp_path / "rejects" / "train-00001-of-00002.parquet")
    assert rejects.schema.equals(rejects_schema(schema))
    assert rejects.to_pylist() == [{"text": "c", "id": None, "drift_reject_reason": "empty_response",
                                    "drift_row_index": 2, "drift_raw_line": None}]
    assert run.completed_indexes() == {1} and run.completed()[1] == marker
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []  # no temp files left


def test_abort_leaves_nothing_and_stale_rejects_are_removed(tmp_path):
    run = RunDirectory(str(tmp_path))
    schema = pa.schema([("text", pa.string())])
    (tmp_path / "rejects").mkdir()
    stale = tmp_path / "rejects" / "train-00000-of-00002.parquet"
    stale.write_bytes(b"left over by an interrupted attempt")
    writer = run.shard_writer(_file(0), schema)
    writer.write_scored(pa.table({"text": ["a"], "id": ["1"], "drift_score": pa.array([0.1], pa.float32())}))
    writer.abort()
    assert not any(p.is_file() for p in (tmp_path / "data").rglob("*"))
    writer = run.shard_writer(_file(0), schema)  # a rerun of that file: no rows at all this time
    writer.commit({"rows_in": 0, "rows_scored": 0, "rows_rejected": 0, "rejected_by_reason": {}}, ScoreSummary())
    assert not stale.exists()
    empty = pq.read_table(tmp_path / "data" / "train-00000-of-00002.parquet")
    assert empty.num_rows == 0 and empty.schema.names == ["text", "id", "drift_score", "drift_grad_norm", "drift_num_tokens"]


def test_manifest_from_markers_validates_and_is_not_rewritten(tmp_path):
    run = RunDirectory(str(tmp_path))
    schema = pa.schema([("text", pa.string())])
    inputs = ["/in/f0.parquet", "/in/f1.parquet"]
    for index, scores, reasons in ((0, [0.1, 0.3], {"too_long": 2}), (1, [0.2], {})):
        writer = run.shard_writer(_file(index), schema)
        writer.write_scored(pa.table({"text": ["x"] * len(scores), "id": [str(i) for i in range(len(scores))],
                                      "drift_score": pa.array(scores, pa.float32())}))
        summary = ScoreSummary()
        summary.add(np.array(scores, dtype=np.float32))
        n_rej = sum(reasons.values())
        writer.commit({"rows_in": len(scores) + n_rej, "rows_scored": len(scores), "rows_rejected": n_rej,
                       "rejected_by_reason": reasons}, summary)
        manifest = run.update_manifest({"scorer": {"scorer": "random"}}, inputs)
        jsonschema.validate(manifest, SCHEMA)
        assert manifest["complete"] is (index == 1)
    assert (manifest["rows_in"], manifest["rows_scored"], manifest["rows_rejected"]) == (5, 3, 2)
    assert manifest["rejected_by_reason"] == {"too_long": 2}
    expected = np.array([0.1, 0.3, 0.2], dtype=np.float32).astype(np.float64)
    assert manifest["score_stats"]["mean"] == pytest.approx(expected.mean(), rel=1e-12)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    mtime = os.stat(tmp_path / "manifest.json").st_mtime_ns
    assert run.update_manifest({"scorer": {"scorer": "random"}}, inputs) == manifest
    assert os.stat(tmp_path / "manifest.json").st_mtime_ns == mtime
