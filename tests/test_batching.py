"""Token-budget batches (--max-batch-tokens): same scores, losses and bank as any other batching; padding recorded."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.bank.store import ValidationBank
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import ConfigError
from drift_stream.grads.projection import FeatureConfig
from drift_stream.model.batching import PaddingStats, plan_batches
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.base import ScoreConfig
from drift_stream.scoring.build import build_scorer

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(3)]
ROWS = [
    {"id": f"r{i}", "messages": [{"role": "user", "content": "What is " + "1+" * (i % 7) + "1?"},
                                 {"role": "assistant", "content": "It is " + "x" * (3 * i % 23) + "."}]}
    for i in range(14)
]


def parity(completion, query):
    return float(sum(map(ord, completion)) % 2 == 0)


def make_config(**kw):
    return BankConfig(features=FeatureConfig(proj_dim_in=4, proj_dim_out=4), preconditioner="identity",
                      rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=12, seed=5, batch_size=16), **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    model_dir = save_tiny_model(root / "model", arch="llama", seed=2)
    bank = str(root / "bank")
    build_bank(model_dir, QUESTIONS, bank, make_config(), verifier=FunctionVerifier(parity, "test:parity"),
               progress=False)
    return root, model_dir, bank


def test_plan_batches_cover_every_row_once_within_the_budget():
    lengths = [5, 40, 7, 7, 120, 3, 33, 9, 9, 61]
    assert plan_batches(lengths, batch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for budget in (2, 40, 64, 100, 10_000):
        batches = plan_batches(lengths, batch_size=4, max_batch_tokens=budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            longest = max(lengths[i] for i in b)
            assert longest * len(b) <= budget or len(b) == 1
            assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    assert plan_batches(lengths, batch_size=4, max_batch_tokens=64) == [[5, 0, 2, 3, 7, 8], [6], [1], [9], [4]]
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        plan_batches(lengths, batch_size=4, max_batch_tokens=0)
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        ScoreConfig(max_batch_tokens=1)
    stats = PaddingStats()
    stats.add([3, 5])
    stats.add([7])
    assert stats.to_dict() == {"real_tokens": 15, "padded_tokens": 17, "batches": 2, "padding_efficiency": 15 / 17}


def _columns(table):
    return {name: np.array(table.column(name).to_pylist(), dtype=float)
            for name in ("drift_score", "drift_loss", "drift_grad_norm")}


def test_scores_identical_under_any_batching_and_drift_loss_equals_loss_scorer(setup):
    _, model_dir, bank = setup
    table = pa.Table.from_pylist(ROWS)
    runs = {}
    for name, kw in {"rows8": dict(batch_size=8), "rows1": dict(batch_size=1),
                     "tokens60": dict(max_batch_tokens=60), "tokens1e4": dict(max_batch_tokens=10_000)}.items():
        scorer = build_scorer("drift", model=model_dir, bank=bank, beta=1.0, keep_query_scores=True, **kw)
        out = scorer(table)
        runs[name] = (_columns(out), np.array(out.column("drift_query_scores").to_pylist(), dtype=float))
        assert scorer.pop_padding_stats()["batches"] >= 1
    ref, ref_q = runs["rows8"]
    assert np.isfinite(ref["drift_score"]).all() and np.abs(ref["drift_score"]).max() > 0
    for name, (cols, q) in runs.items():
        for col, values in cols.items():
            np.testing.assert_allclose(values, ref[col], rtol=1e-5, atol=1e-7, err_msg=f"{name}:{col}")
        np.testing.assert_allclose(q, ref_q, rtol=1e-5, atol=1e-7, err_msg=name)
    # one loss: drift_loss does not depend on --scorer
    loss = _columns(build_scorer("loss", model=model_dir, max_batch_tokens=60)(table))["drift_loss"]
    np.testing.assert_allclose(loss, ref["drift_loss"], rtol=1e-6)


def test_manifest_records_padding_efficiency(setup, tmp_path):
    root, model_dir, _ = setup
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), pool)
    scorer = build_scorer("loss", model=model_dir, max_batch_tokens=100)
    manifest = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "out"), batch_rows=8), scorer,
                         progress=False)
    lengths = [len(scorer.chat.encode(scorer.adapter.to_example(r)).input_ids) for r in ROWS]
    expected = PaddingStats()
    for window in (lengths[:8], lengths[8:]):  # each batch of rows is its own window
        for idx in plan_batches(window, batch_size=8, max_batch_tokens=100):
            expected.add([window[i] for i in idx])
    assert manifest["padding"] == expected.to_dict()
    assert 0.5 < manifest["padding"]["padding_efficiency"] <= 1.0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["padding"] == expected.to_dict()
    by_rows = run_score(RunConfig(data=(str(pool),), out=str(tmp_path / "out8"), batch_rows=8),
                        build_scorer("loss", model=model_dir, batch_size=8), progress=False)
    assert by_rows["padding"]["padding_efficiency"] < manifest["padding"]["padding_efficiency"]


def test_bank_identical_with_a_token_budget(setup):
    root, model_dir, bank = setup
    other = str(root / "bank_tokens")
    build_bank(model_dir, QUESTIONS, other, make_config(max_batch_tokens=50),
               verifier=FunctionVerifier(parity, "test:parity"), progress=False)
    a, b = ValidationBank.load(bank), ValidationBank.load(other)
    assert a.query_vectors.abs().max() > 0
    torch.testing.assert_close(b.query_vectors, a.query_vectors, rtol=1e-5, atol=1e-7)
