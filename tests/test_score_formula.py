"""The DRIFT / less / if score against the formula, computed explicitly (issue 17, finding 7).

S(z_i) = mean_j <b_j, u_i> / ||u_i||^beta, with b_j the bank's query vectors and u_i the featurizer's projected
gradient of row i taken alone (a batch of one), in float64. A sum over queries instead of the mean, ||u||^(beta/2),
or any other exponent fails these checks: the tiny model's ||u_i|| spread over more than a factor 2 and m = 3.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.data.tokenization import collate
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.grads.projection import FeatureConfig
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.build import build_scorer

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(3)]


def parity(completion, query):
    return float(sum(map(ord, completion)) % 2 == 0)


def rows(n: int = 10) -> pa.Table:
    rng = np.random.default_rng(4)
    out = []
    for i in range(n):
        answer = "".join(rng.choice(list("0123456789+= abcxyz"), size=int(rng.integers(1, 50))))
        out.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} + 3?"},
                                                {"role": "assistant", "content": answer}]})
    return pa.Table.from_pylist(out)


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("formula")
    model_dir = save_tiny_model(root / "model", arch="llama", seed=3)
    features = FeatureConfig(proj_dim_in=4, proj_dim_out=4)
    on = build_bank(model_dir, QUESTIONS, root / "on", BankConfig(
        features=features, preconditioner="identity", rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=8, seed=1)),
        verifier=FunctionVerifier(parity, "test:parity"), progress=False)
    off = build_bank(model_dir, QUESTIONS, root / "off", BankConfig(features=features, targets="off-policy",
                                                                   preconditioner="identity"), progress=False)
    return model_dir, on, off


def explicit(scorer, table: pa.Table, bank, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores [n], per-query scores [n, m], norms [n]) from one-row featurizations, in float64."""
    b = bank.query_vectors.to(torch.float64)  # [m, D]
    assert bank.query_weights is None  # uniform weighting: the plain mean over queries
    scores, per_query, norms = [], [], []
    for row in table.to_pylist():
        example = scorer.chat.encode(scorer.adapter.to_example(row))
        u = scorer.featurizer.featurize(collate([example], scorer.chat.pad_token_id)).features[0].to(torch.float64)
        norm = torch.sqrt((u * u).sum())  # ||u_i||, explicitly
        q = torch.stack([(b[j] * u).sum() for j in range(b.shape[0])]) / norm**beta  # [m]
        scores.append(float(q.sum() / b.shape[0]))
        per_query.append(q.numpy())
        norms.append(float(norm))
    return np.array(scores), np.stack(per_query), np.array(norms)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_drift_score_and_query_scores_equal_the_formula(banks, beta):
    model_dir, on, _ = banks
    table = rows()
    scorer = build_scorer("drift", model=model_dir, bank=str(on.path), beta=beta, keep_query_scores=True,
                          batch_size=4)
    out = scorer(table)
    assert out.column("drift_reject_reason").null_count == table.num_rows  # every row scored
    want, want_q, norms = explicit(scorer, table, on, beta)
    assert norms.max() / norms.min() > 2 and on.query_vectors.shape[0] == 3  # the checks can tell formulas apart
    np.testing.assert_allclose(out.column("drift_score").to_numpy(), want, rtol=2e-5, atol=0)
    got_q = np.array(out.column("drift_query_scores").to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(got_q, want_q, rtol=2e-5, atol=0)
    np.testing.assert_allclose(out.column("drift_grad_norm").to_numpy(), norms, rtol=2e-5, atol=0)


@pytest.mark.parametrize("name,beta", [("less", 1.0), ("if", 0.0)])
def test_off_policy_baselines_equal_the_formula(banks, name, beta):
    model_dir, _, off = banks
    table = rows()
    scorer = build_scorer(name, model=model_dir, bank=str(off.path), keep_query_scores=True, batch_size=3)
    out = scorer(table)
    want, want_q, _ = explicit(scorer, table, off, beta)
    np.testing.assert_allclose(out.column("drift_score").to_numpy(), want, rtol=2e-5, atol=0)
    got_q = np.array(out.column("drift_query_scores").to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(got_q, want_q, rtol=2e-5, atol=0)
