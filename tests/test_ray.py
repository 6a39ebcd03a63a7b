"""Ray Data: the core scorer on a real local Ray actor pool gives the same rows and scores as a direct call."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

ray = pytest.importorskip("ray")

ROWS = [
    {"id": f"r{i}", "messages": [{"role": "user", "content": f"{i} + 2?"},
                                 {"role": "assistant", "content": f"{i} + 2 = {i + 2}"}]}
    for i in range(24)
] + [{"id": "bad", "messages": [{"role": "user", "content": "no reply"}]}]


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: two scoring actors hold one each and the read / repartition tasks need their own, or the pool
    # waits forever for a free CPU.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_map_batches_on_actor_pool_equals_direct_scoring(local_ray, tiny_model_dir):
    import ray.data

    from drift_stream.integrations.ray import score_with_ray
    from drift_stream.scoring import build_scorer

    table = pa.Table.from_pylist(ROWS)
    direct = build_scorer("loss", model=tiny_model_dir)(table)
    ds = ray.data.from_arrow(table).repartition(3)
    scored = score_with_ray(ds, scorer="loss", model=tiny_model_dir, concurrency=2, batch_size=8)
    got = sorted(scored.take_all(), key=lambda r: r["id"])
    want = sorted(direct.to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["drift_reject_reason"] for r in got] == [r["drift_reject_reason"] for r in want]
    g = np.array([np.nan if r["drift_score"] is None else r["drift_score"] for r in got], dtype=float)
    w = np.array([np.nan if r["drift_score"] is None else r["drift_score"] for r in want], dtype=float)
    np.testing.assert_allclose(g, w, rtol=1e-5)
    assert got[0]["messages"] == want[0]["messages"]
