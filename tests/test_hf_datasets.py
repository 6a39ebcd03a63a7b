"""The `datasets` step on any Dataset (issue 13, kind 4): eager and iterable, any batch order, score columns typed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

datasets = pytest.importorskip("datasets")

SCORE_TYPES = {"drift_score": pa.float32(), "drift_grad_norm": pa.float32(), "drift_loss": pa.float32(),
               "drift_num_tokens": pa.int32(), "drift_reject_reason": pa.string()}


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return build_scorer("random", model=tiny_model_dir, adapter="messages")


def rows(n: int = 24) -> list[dict]:
    """Rows 0-7 all scorable, 8-15 two unscorable (9, 13), 16-23 all unscorable (empty answer); a sometimes-null
    pass-through column `note` (null in the whole first batch)."""
    out = []
    for i in range(n):
        bad = i in (9, 13) or i >= 16
        out.append({"id": f"d{i}", "note": None if i < 10 else f"n{i}",
                    "messages": [{"role": "user", "content": f"Calculate {i} + 1."},
                                 {"role": "assistant", "content": "  " if bad else f"{i + 1}"}]})
    return out


def check_types(schema: pa.Schema) -> None:
    for name, type_ in SCORE_TYPES.items():
        assert schema.field(name).type == type_, name


def expected_scored(scorer, data: list[dict]) -> dict[str, float]:
    out = scorer(pa.Table.from_pylist(data)).to_pylist()
    return {r["id"]: r["drift_score"] for r in out if r["drift_reject_reason"] is None}


@pytest.mark.parametrize("order", ["forward", "reversed"])  # first batch: no reject / only rejects
def test_eager_dataset_map_any_batch_order(tmp_path, scorer, order):
    data = rows() if order == "forward" else rows()[::-1]
    ds = datasets.Dataset.from_list(data)
    out = ds.map(scorer, batched=True, batch_size=8)
    check_types(out.data.schema)
    assert out.num_rows == 24 and out["note"] == [r["note"] for r in data]
    assert sum(r is None for r in out["drift_reject_reason"]) == 14
    kept = out.filter(lambda b: [s is not None for s in b["drift_score"]], batched=True)
    assert dict(zip(kept["id"], kept["drift_score"])) == pytest.approx(expected_scored(scorer, data))
    kept.to_parquet(str(tmp_path / "kept.parquet"))
    check_types(pq.read_schema(tmp_path / "kept.parquet"))


def test_score_dataset_on_dataset_and_iterable_dataset(tmp_path, scorer):
    from drift_stream.integrations.hf_datasets import keep_positive, score_dataset

    data = rows()[::-1]
    eager = score_dataset(datasets.Dataset.from_list(data), scorer, batch_size=8)
    check_types(eager.data.schema)
    iterable = score_dataset(datasets.Dataset.from_list(data).to_iterable_dataset(num_shards=3), scorer, batch_size=8)
    assert iterable.features["drift_score"] == datasets.Value("float32")
    assert iterable.features["drift_reject_reason"] == datasets.Value("string")
    # materialise the stream: the writer sees a first batch of only rejected rows; the stream's features type it
    gen = datasets.Dataset.from_generator(lambda: (yield from iterable), features=iterable.features,
                                          writer_batch_size=4)
    check_types(gen.data.schema)
    assert sorted(gen["id"]) == sorted(eager["id"])
    assert dict(zip(gen["id"], gen["drift_score"])) == dict(zip(eager["id"], eager["drift_score"]))
    kept = iterable.filter(keep_positive, batched=True)
    assert sorted(r["id"] for r in kept) == sorted(expected_scored(scorer, data))
    path = tmp_path / "stream.parquet"
    iterable.to_parquet(str(path))
    check_types(pq.read_schema(path))
    assert pq.read_table(path).num_rows == 24


def test_iterable_dataset_map_with_scored_features(scorer):
    from drift_stream.integrations.hf_datasets import scored_features

    it = datasets.Dataset.from_list(rows()[::-1]).to_iterable_dataset()
    out = it.map(scorer, batched=True, batch_size=8, features=scored_features(it.features, scorer))
    got = datasets.Dataset.from_generator(lambda: (yield from out), features=out.features, writer_batch_size=8)
    check_types(got.data.schema)
    assert got.num_rows == 24


def test_score_dataset_refuses_other_objects(scorer):
    from drift_stream.integrations.hf_datasets import score_dataset

    with pytest.raises(TypeError, match="Dataset or IterableDataset"):
        score_dataset(rows(), scorer)
