"""Queries without a contrast (drop / reference as a positive target / adaptive K) and query weighting, on the
tiny model, each against an explicit computation from the bank's own rollouts and vectors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.bank.contrast import (
    contrast_counts,
    contrast_plan,
    has_contrast,
    learnability,
    query_weights,
)
from drift_stream.bank.targets import signed_weights
from drift_stream.data.example_types import Example
from drift_stream.data.tokenization import ChatTokenizer, collate
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.errors import ConfigError
from drift_stream.grads.features import GradientFeaturizer
from drift_stream.grads.projection import FeatureConfig
from drift_stream.model.loading import load_model, load_tokenizer
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.build import build_scorer
from drift_stream.scoring.drift import weighted_query_mean

FEATURES = FeatureConfig(proj_dim_in=4, proj_dim_out=4)
K = 4
ROLLOUTS = RolloutConfig(num_rollouts=K, max_new_tokens=10, seed=3, batch_size=16)
QUESTIONS = [{"id": f"q{i:02d}", "question": f"What is {i} + {i + 2}?", "answer": str(2 * i + 2)} for i in range(12)]


def thirds(completion, query):
    """Correct for about one rollout in three: some queries get no correct rollout, most a mix."""
    return float(sum(map(ord, completion)) % 3 == 0)


VERIFIER = FunctionVerifier(thirds, "test:thirds")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrast")
    save_tiny_model(root / "model", arch="llama", seed=1)
    return root


def build(root, name, rollouts=ROLLOUTS, **config):
    cfg = BankConfig(features=FEATURES, rollouts=rollouts, save_rollout_vectors=True, preconditioner="identity",
                     **config)
    return build_bank(root / "model", QUESTIONS, root / name, cfg, verifier=VERIFIER, progress=False)


@pytest.fixture(scope="module")
def keep(root):
    return build(root, "keep")


def outcomes(bank):
    """{query id: [rewards of its rollouts in index order]} from rollouts.parquet."""
    out: dict[str, list[float]] = {}
    for r in sorted(bank.rollouts().to_pylist(), key=lambda r: (r["query_id"], r["rollout_index"])):
        out.setdefault(r["query_id"], []).append(r["reward"])
    return out


def test_plan_and_weights_by_hand():
    assert has_contrast([1.0, 0.0]) and not has_contrast([0.0, 0.0]) and not has_contrast([1.0, 1.0])
    assert contrast_plan([0.0, 0.0], 1.0, "keep", True) == ([0.0, 0.0], None, False)
    assert contrast_plan([0.0, 0.0], 1.0, "drop", True) == ([0.0, 0.0], "no_contrast", False)
    assert contrast_plan([1.0, 1.0], 1.0, "drop", True) == ([1.0, 1.0], "no_contrast", False)
    assert contrast_plan([0.0, 0.0], 1.0, "reference", True) == ([0.0, 0.0, 1.0], None, True)
    assert contrast_plan([0.0, 0.0], 1.0, "reference", False) == ([0.0, 0.0], None, False)  # no reference
    assert contrast_plan([1.0, 1.0], 1.0, "reference", True) == ([1.0, 1.0], None, False)  # all correct: as is
    assert contrast_plan([1.0, 0.0], 1.0, "drop", True) == ([1.0, 0.0], None, False)
    assert learnability(0.5) == 0.25 and learnability(0.0) == 0.0 and learnability(1.0) == 0.0
    np.testing.assert_array_equal(query_weights([0.25, 1.0, 0.5], "learnability"), [0.1875, 0.0, 0.25])
    np.testing.assert_array_equal(query_weights([0.25, 1.0], "uniform"), [1.0, 1.0])
    per_query = np.array([[1.0, 2.0, 4.0], [-1.0, 0.0, 3.0]])
    np.testing.assert_allclose(weighted_query_mean(per_query, np.array([1.0, 0.0, 3.0])), [13 / 4, 8 / 4], rtol=1e-15)
    np.testing.assert_array_equal(weighted_query_mean(per_query, None), per_query.mean(axis=1))
    assert contrast_counts([{"correct": 1, "incorrect": 0}, {"correct": 0, "incorrect": 3},
                            {"correct": 2, "incorrect": 1}, {"correct": 0, "incorrect": 0}]) == {
        "all_correct": 1, "all_incorrect": 1, "mixed": 1, "none": 1}
    with pytest.raises(ConfigError, match="no_contrast"):
        BankConfig(no_contrast="skip")
    with pytest.raises(ConfigError, match="query_weighting"):
        BankConfig(query_weighting="p(1-p)")
    with pytest.raises(ConfigError, match="max_rollouts"):
        BankConfig(rollouts=RolloutConfig(num_rollouts=4), max_rollouts=4)
    with pytest.raises(ConfigError, match="on-policy"):
        BankConfig(targets="off-policy", query_weighting="learnability")


def test_keep_is_the_old_bank_and_records_the_contrast(keep):
    m = keep.manifest
    assert m["contrast"]["no_contrast"] == "keep" and m["contrast"]["adaptive"] is None
    assert keep.query_weights is None  # uniform: no weights stored, scores are the plain mean
    by_outcome = {"all_correct": 0, "all_incorrect": 0, "mixed": 0, "none": 0}
    for rewards in outcomes(keep).values():
        c = sum(r == 1.0 for r in rewards)
        by_outcome["mixed" if 0 < c < K else "all_correct" if c == K else "all_incorrect"] += 1
    assert m["contrast"]["queries"] == by_outcome
    assert by_outcome["all_incorrect"] >= 1 and by_outcome["mixed"] >= 1  # the constructed case has both kinds


def test_drop_leaves_out_exactly_the_queries_without_a_contrast(root, keep):
    bank = build(root, "drop", no_contrast="drop")
    rewards = outcomes(keep)
    expected = [q for q in keep.query_ids if has_contrast(rewards[q])]
    assert bank.query_ids == expected
    for row in bank.manifest["queries"]:
        assert (row["excluded"] == "no_contrast") == (not has_contrast(rewards[row["id"]]))
    rows = [keep.query_ids.index(q) for q in expected]
    torch.testing.assert_close(bank.signed_vectors, keep.signed_vectors[rows], rtol=0, atol=0)


def test_reference_is_a_positive_target_when_no_rollout_is_correct(root, keep):
    bank = build(root, "reference", no_contrast="reference")
    tokenizer, model = load_tokenizer(root / "model"), load_model(root / "model", device="cpu")
    chat = ChatTokenizer(tokenizer, max_tokens=2048)
    featurizer = GradientFeaturizer(model, FEATURES)
    table = bank.rollouts().to_pylist()
    used = 0
    for j, q in enumerate(QUESTIONS):
        mine = [(i, r) for i, r in enumerate(table) if r["query_id"] == q["id"]]
        rewards = [r["reward"] for _, r in mine]
        stack = bank.rollout_vectors[[i for i, _ in mine]].double()
        row = bank.manifest["queries"][j]
        if 1.0 in rewards:  # unchanged: the plain on-policy vector
            assert not row["reference_target"]
            signs, _ = signed_weights(rewards, "sign")
            expected = sum(s * v for s, v in zip(signs, stack)) / len(mine)
        else:  # (u(ref) - sum_k u(tau_k)) / (K + 1)
            assert row["reference_target"]
            used += 1
            ref = Example(id=q["id"], messages=({"role": "user", "content": q["question"]},
                                                {"role": "assistant", "content": q["answer"]}))
            u_ref = featurizer.featurize(collate([chat.encode(ref)], chat.pad_token_id)).features[0].double()
            expected = (u_ref - stack.sum(dim=0)) / (len(mine) + 1)
        got = bank.signed_vectors[bank.query_ids.index(q["id"])].double()
        torch.testing.assert_close(got, expected.float().double(), rtol=1e-5, atol=1e-7)
    assert used >= 1 and bank.manifest["contrast"]["reference_targets"] == used


def test_adaptive_k_tops_up_queries_without_a_contrast(root, keep):
    bank = build(root, "adaptive", max_rollouts=3 * K)
    first = {(r["query_id"], r["rollout_index"]): r["completion"] for r in keep.rollouts().to_pylist()}
    # round r samples with rollout seed + r: its rollouts are those of a plain bank built with that seed
    round1 = build(root, "seed4", rollouts=RolloutConfig(num_rollouts=K, max_new_tokens=10, seed=4, batch_size=16))
    second = {(r["query_id"], r["rollout_index"]): r["completion"] for r in round1.rollouts().to_pylist()}
    rewards = outcomes(bank)
    topped = 0
    for q in QUESTIONS:
        got = rewards[q["id"]]
        table = sorted((r for r in bank.rollouts().to_pylist() if r["query_id"] == q["id"]),
                       key=lambda r: r["rollout_index"])
        assert [r["rollout_index"] for r in table] == list(range(len(got)))
        for r in table[:K]:
            assert r["completion"] == first[(q["id"], r["rollout_index"])]
        if len(got) > K:
            topped += 1
            assert not has_contrast(got[:K])  # only queries without a contrast were topped up
            for r in table[K:2 * K]:
                assert r["completion"] == second[(q["id"], r["rollout_index"] - K)]
        # stop rule: K rollouts in each round until both outcomes appear or 3K are drawn
        rounds = len(got) // K
        assert len(got) % K == 0 and all(not has_contrast(got[:K * r]) for r in range(1, rounds))
        assert has_contrast(got) or len(got) == 3 * K
    info = bank.manifest["contrast"]["adaptive"]
    assert topped >= 1 and info["queries_topped_up"] == topped
    assert info["extra_rollouts"] == sum(len(v) - K for v in rewards.values())
    assert info["queries_resolved"] == sum(has_contrast(v) and len(v) > K for v in rewards.values())
    row = {r["id"]: r for r in bank.manifest["queries"]}
    for qid, got in rewards.items():
        assert row[qid]["correct"] + row[qid]["incorrect"] + row[qid]["failed"] == len(got)


def test_learnability_weighted_score_equals_the_explicit_weighted_mean(root, keep):
    bank = build(root, "learnability", query_weighting="learnability")
    rewards = outcomes(keep)
    p = np.array([np.mean([r == 1.0 for r in rewards[q]]) for q in bank.query_ids])
    np.testing.assert_allclose(bank.query_weights.double().numpy(), p * (1 - p), rtol=1e-6)
    assert [r["weight"] for r in bank.manifest["queries"]] == pytest.approx((p * (1 - p)).tolist(), rel=1e-12)
    torch.testing.assert_close(bank.query_vectors, keep.query_vectors, rtol=0, atol=0)  # weights leave g_j alone
    rows = pa.Table.from_pylist([{"id": f"r{i}", "messages": [
        {"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i} + 1 = {i + 1}"}]}
        for i in range(6)])
    common = dict(model=str(root / "model"), keep_query_scores=True, batch_size=4)
    uniform = build_scorer("drift", bank=str(keep.path), **common)(rows).to_pydict()
    weighted = build_scorer("drift", bank=str(bank.path), **common)(rows).to_pydict()
    per_query = np.array(uniform["drift_query_scores"], dtype=np.float64)  # [n, m], float32 in the column
    np.testing.assert_allclose(uniform["drift_score"], per_query.mean(axis=1), rtol=1e-5)
    expected = per_query @ (p * (1 - p)) / (p * (1 - p)).sum()
    np.testing.assert_allclose(weighted["drift_score"], expected, rtol=1e-4, atol=1e-7)
    assert not np.allclose(weighted["drift_score"], uniform["drift_score"], rtol=1e-3)  # the weights matter here


def test_cli_bank_build_records_the_contrast_options(root, tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from drift_stream.cli.main import main

    pq.write_table(pa.Table.from_pylist(QUESTIONS[:4]), tmp_path / "q.parquet")
    code = main(["bank", "build", "--model", str(root / "model"), "--queries", str(tmp_path / "q.parquet"),
                 "--rollouts", "2", "--max-new-tokens", "6", "--proj-dim", "4", "--out", str(tmp_path / "bank"),
                 "--no-contrast", "reference", "--max-rollouts", "4", "--quiet"])
    assert code == 0
    m = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert m["config"]["no_contrast"] == "reference" and m["config"]["max_rollouts"] == 4
    # the tiny model never answers right (numeric verifier): every query is topped up to 4, then gets its reference
    assert m["contrast"]["adaptive"]["queries_topped_up"] == 4 and m["contrast"]["adaptive"]["extra_rollouts"] == 8
    assert m["contrast"]["reference_targets"] == 4 and all(r["reference_target"] for r in m["queries"])
    assert main(["bank", "info", str(tmp_path / "bank")]) == 0
    assert "no_contrast reference" in capsys.readouterr().out
