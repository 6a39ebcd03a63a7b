"""Validation bank: signed query vectors by explicit arithmetic, disk round trip, fingerprints, failures, off-policy."""

from __future__ import annotations

import json
import logging
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.bank.store import (
    ValidationBank,
    fingerprint_model,
    fingerprint_tokenizer,
    write_bank,
)
from drift_stream.bank.targets import signed_weights
from drift_stream.data.example_types import Example
from drift_stream.data.tokenization import ChatTokenizer, collate
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.errors import BankError, BankMismatchError, ConfigError
from drift_stream.grads.features import GradientFeaturizer
from drift_stream.grads.precondition import Preconditioner
from drift_stream.grads.projection import FeatureConfig
from drift_stream.model.loading import load_model, load_tokenizer
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier

FEATURES = FeatureConfig(proj_dim_in=4, proj_dim_out=4)
ROLLOUTS = RolloutConfig(num_rollouts=4, max_new_tokens=12, seed=3, batch_size=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("bank_model"), arch="llama", seed=1)


def gsm_rows(n=6):
    return [{"id": f"q{i}", "question": f"Tom has {i} apples and buys {i + 2}. How many?",
             "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}.\n#### {2 * i + 2}"}
            for i in range(n)]


def graded(completion, query):
    """A deterministic reward with full, partial and zero credit (the tiny model never solves the task)."""
    return (sum(map(ord, completion)) % 3) / 2


GRADED = FunctionVerifier(graded, "test:graded")


def build(model_dir, out, verifier=GRADED, **config):
    cfg = BankConfig(**{"features": FEATURES, "rollouts": ROLLOUTS, "save_rollout_vectors": True, **config})
    return build_bank(model_dir, gsm_rows(), out, cfg, verifier=verifier, progress=False)


@pytest.fixture(scope="module")
def sign_bank(model_dir, tmp_path_factory):
    return build(model_dir, tmp_path_factory.mktemp("sign") / "bank")


def test_signed_weights_arithmetic():
    assert signed_weights([1.0, 0.0, 0.5, 1.0], "sign") == ([1.0, -1.0, -1.0, 1.0], None)
    assert signed_weights([1.0, 0.0, 0.5, 1.0], "positive") == ([1.0, 0.0, 0.0, 1.0], None)
    weights, _ = signed_weights([1.0, 0.0, 0.5, 1.0], "advantage")
    assert weights == pytest.approx([0.375, -0.625, -0.125, 0.375], abs=1e-15)
    std = math.sqrt((0.375**2 * 2 + 0.625**2 + 0.125**2) / 4)
    weights, _ = signed_weights([1.0, 0.0, 0.5, 1.0], "advantage_std")
    assert weights == pytest.approx([0.375 / std, -0.625 / std, -0.125 / std, 0.375 / std], abs=1e-12)
    assert signed_weights([0.5, 0.5], "sign", correct_threshold=0.5) == ([1.0, 1.0], None)
    assert signed_weights([1.0, 1.0], "advantage") == (None, "equal_rewards")
    assert signed_weights([0.0, 0.5], "positive") == (None, "no_correct_rollout")
    assert signed_weights([], "sign") == (None, "no_valid_rollouts")


def expected_vectors(bank, signing, threshold=1.0):
    """g_j recomputed from the saved per-rollout vectors and the rewards in rollouts.parquet."""
    table = bank.rollouts().to_pylist()
    out = {}
    for qid in bank.query_ids:
        rows = [(i, r) for i, r in enumerate(table) if r["query_id"] == qid and r["failure_reason"] is None]
        weights, _ = signed_weights([r["reward"] for _, r in rows], signing, threshold)
        assert [r["sign"] for _, r in rows] == weights
        stack = bank.rollout_vectors[[i for i, _ in rows]].double()
        out[qid] = sum(w * v for w, v in zip(weights, stack)) / len(rows)
    return torch.stack([out[q] for q in bank.query_ids]).float()


def test_sign_vectors_by_explicit_arithmetic(sign_bank):
    bank = sign_bank
    m = bank.manifest
    table = bank.rollouts()
    assert table.num_rows == 6 * 4 and bank.rollout_vectors.shape == (24, bank.dim)
    rewards = table.column("reward").to_pylist()
    assert {0.0, 0.5, 1.0} <= set(rewards)  # the constructed case has every kind of reward
    signs = table.column("sign").to_pylist()
    assert signs == [1.0 if r == 1.0 else -1.0 for r in rewards]
    torch.testing.assert_close(bank.signed_vectors, expected_vectors(bank, "sign"), rtol=1e-6, atol=0)
    # identity preconditioner (no fisher data) + unit norm
    torch.testing.assert_close(bank.query_vectors, bank.signed_vectors / bank.signed_vectors.norm(dim=1, keepdim=True),
                               rtol=1e-6, atol=1e-7)
    for row in m["queries"]:
        got = [r for r in table.to_pylist() if r["query_id"] == row["id"]]
        assert row["correct"] == sum(r["reward"] == 1.0 for r in got)
        assert row["incorrect"] == sum(r["reward"] < 1.0 for r in got) and row["failed"] == 0
    assert m["pass_rate"] == pytest.approx(sum(r == 1.0 for r in rewards) / 24)
    assert m["preconditioner"]["kind"] == "identity" and m["signing"] == "sign" and m["verifier"] == "test:graded"


@pytest.mark.parametrize("signing", ["advantage_std", "positive"])
def test_other_signings_and_no_signal_queries(model_dir, tmp_path, signing, caplog):
    with caplog.at_level(logging.WARNING, logger="drift_stream.bank"):
        bank = build(model_dir, tmp_path / "bank", signing=signing)
    torch.testing.assert_close(bank.signed_vectors, expected_vectors(bank, signing), rtol=1e-6, atol=0)
    table = bank.rollouts().to_pylist()
    for row in bank.manifest["queries"]:
        rewards = [r["reward"] for r in table if r["query_id"] == row["id"]]
        no_signal = (len(set(rewards)) == 1) if signing == "advantage_std" else (1.0 not in rewards)
        assert (row["excluded"] is not None) == no_signal
        assert (row["id"] in bank.query_ids) == (not no_signal)
    excluded = [r for r in bank.manifest["queries"] if r["excluded"]]
    assert excluded, "the constructed case should leave out at least one query"  # checked for this seed
    assert "carry no signal" in caplog.text


def test_proximity_gap_is_explicit(sign_bank, model_dir):
    bank = sign_bank
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    chat = ChatTokenizer(tokenizer, max_tokens=2048)
    featurizer = GradientFeaturizer(model, FEATURES)
    table = bank.rollouts().to_pylist()
    gaps = []
    for row, source in zip(bank.manifest["queries"], gsm_rows()):
        ref = Example(id=row["id"], messages=({"role": "user", "content": source["question"]},
                                              {"role": "assistant", "content": source["answer"]}))
        loss, _ = featurizer.loss_only(collate([chat.encode(ref)], chat.pad_token_id))
        mine = [r for r in table if r["query_id"] == row["id"]]
        rollout_loss = sum(r["loss"] * r["num_completion_tokens"] for r in mine) / sum(
            r["num_completion_tokens"] for r in mine)
        assert row["reference_loss"] == pytest.approx(float(loss[0]), abs=1e-6)
        assert row["rollout_loss"] == pytest.approx(rollout_loss, abs=1e-9)
        assert row["proximity_gap"] == pytest.approx(row["reference_loss"] - rollout_loss, abs=1e-9)
        for r in mine:  # the featurizer's loss of a rollout is minus its mean log-prob at sampling time
            assert r["loss"] == pytest.approx(-r["mean_logprob"], abs=1e-5)
        gaps.append(row["proximity_gap"])
    assert bank.manifest["proximity_gap"]["gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-12)
    summary = bank.summary()
    assert "proximity gap" in summary
    expected = "farther from the model" if bank.manifest["proximity_gap"]["gap"] > 0 else "a strong baseline here"
    assert expected in summary


def test_round_trip_bit_exact_and_deterministic(sign_bank, model_dir, tmp_path):
    bank = sign_bank
    tensors = {"query_vectors": bank.query_vectors, "signed_vectors": bank.signed_vectors,
               "rollout_vectors": bank.rollout_vectors, **bank.preconditioner_state}
    write_bank(tmp_path / "copy", tensors, bank.manifest, bank.rollouts().to_pylist())
    again = ValidationBank.load(tmp_path / "copy")
    assert again.manifest == bank.manifest
    for name, value in tensors.items():
        got = {"query_vectors": again.query_vectors, "signed_vectors": again.signed_vectors,
               "rollout_vectors": again.rollout_vectors, **again.preconditioner_state}[name]
        assert got.dtype == value.dtype and torch.equal(got, value), name
    assert again.rollouts().equals(bank.rollouts())
    for name in ("bank.safetensors", "rollouts.parquet"):
        assert (tmp_path / "copy" / name).read_bytes() == (bank.path / name).read_bytes()
    # A rebuild with the same seed gives the same bank, byte for byte (tensors and rollouts).
    rebuilt = build(model_dir, tmp_path / "rebuilt")
    for name in ("bank.safetensors", "rollouts.parquet"):
        assert (rebuilt.path / name).read_bytes() == (bank.path / name).read_bytes(), name
    with pytest.raises(BankError, match="already holds a bank"):
        build(model_dir, tmp_path / "rebuilt")


def test_mismatched_model_tokenizer_projector_refused(sign_bank, model_dir, tmp_path):
    same_model = load_model(model_dir, device="cpu")
    tokenizer = load_tokenizer(model_dir)
    ok = ValidationBank.load(sign_bank.path, model=same_model, tokenizer=tokenizer,
                             featurizer=GradientFeaturizer(same_model, FEATURES))
    assert ok.mismatches == []
    other = load_model(save_tiny_model(tmp_path / "other", arch="llama", seed=2), device="cpu")
    with pytest.raises(BankMismatchError) as err:
        ValidationBank.load(sign_bank.path, model=other)
    message = str(err.value)
    assert sign_bank.manifest["model"]["fingerprint"][:16] in message
    assert fingerprint_model(other)["fingerprint"][:16] in message
    assert "rebuild the bank or pass --allow-mismatch" in message
    with pytest.raises(BankMismatchError, match="projector"):
        ValidationBank.load(sign_bank.path, featurizer=GradientFeaturizer(same_model, FeatureConfig(4, 4, seed=9)))
    tokenizer.chat_template = tokenizer.chat_template.replace("<|end|>\n", "<|end|>")
    assert fingerprint_tokenizer(tokenizer)["fingerprint"] != sign_bank.manifest["tokenizer"]["fingerprint"]
    with pytest.raises(BankMismatchError, match="tokenizer"):
        ValidationBank.load(sign_bank.path, tokenizer=tokenizer)
    allowed = ValidationBank.load(sign_bank.path, model=other, allow_mismatch=True)
    assert allowed.mismatches == ["model"]


def test_corrupt_or_incomplete_bank_refused(sign_bank, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sign_bank.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["signing"] = "mystery"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="not a valid bank manifest"):
        ValidationBank.load(copy)
    (copy / "rollouts.parquet").unlink()
    with pytest.raises(BankError, match="rollouts.parquet is missing"):
        ValidationBank.load(copy)


def test_raising_and_hanging_verifier_is_contained(model_dir, tmp_path):
    # Decided by the completion, not by a call counter: verifiers run in several worker processes.
    def fragile(completion, query):
        code = sum(map(ord, completion))
        if query.id == "q1" and code % 2:
            raise ValueError("cannot parse")
        if query.id == "q2":
            raise KeyError("answer")
        if query.id == "q3" and code % 3 == 0:
            import time

            time.sleep(1.0)
        return graded(completion, query)

    bank = build(model_dir, tmp_path / "bank", verifier=FunctionVerifier(fragile, "test:fragile"),
                 verifier_timeout_s=0.3)
    rows = {r["id"]: r for r in bank.manifest["queries"]}
    table = bank.rollouts().to_pylist()
    reasons = [r["failure_reason"] for r in table if r["failure_reason"]]
    assert rows["q2"]["failed"] == 4 and rows["q2"]["excluded"] == "no_valid_rollouts"
    assert "q2" not in bank.query_ids
    assert 0 < rows["q1"]["failed"] < 4 and rows["q1"]["id"] in bank.query_ids
    assert any(r.startswith("error:ValueError: cannot parse") for r in reasons)
    assert any(r.startswith("error:KeyError") for r in reasons)
    assert "timeout:0.3s" in reasons
    assert all(r["reward"] is None and r["sign"] is None for r in table if r["failure_reason"])
    torch.testing.assert_close(bank.signed_vectors, expected_vectors(bank, "sign"), rtol=1e-6, atol=0)


def test_off_policy_uses_reference_answers(model_dir, tmp_path):
    bank = build(model_dir, tmp_path / "bank", targets="off-policy")
    assert bank.manifest["targets"] == "off-policy" and bank.rollouts().num_rows == 0
    assert bank.manifest["pass_rate"] is None and bank.manifest["verifier"] is None
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    chat = ChatTokenizer(tokenizer, max_tokens=2048)
    refs = [chat.encode(Example(id=r["id"], messages=({"role": "user", "content": r["question"]},
                                                      {"role": "assistant", "content": r["answer"]})))
            for r in gsm_rows()]
    features = GradientFeaturizer(model, FEATURES).featurize(collate(refs, chat.pad_token_id)).features
    assert bank.query_ids == [r["id"] for r in gsm_rows()]
    torch.testing.assert_close(bank.signed_vectors, features, rtol=1e-6, atol=1e-7)


def test_block_preconditioner_from_fisher_data(model_dir, tmp_path):
    pool = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w * (i % 3 + 1)}]}
            for i, w in enumerate(["cat", "dog", "owl", "fish", "emu", "yak", "eel", "ant"] * 3)]
    pool.insert(2, {"messages": [{"role": "robot", "content": "beep"}]})  # rejected, counted
    cfg = BankConfig(features=FEATURES, rollouts=ROLLOUTS, preconditioner="block", damping=0.1, fisher_examples=20)
    bank = build_bank(model_dir, gsm_rows(), tmp_path / "bank", cfg, verifier=GRADED, fisher_data=pool,
                      progress=False)
    pre_info = bank.manifest["preconditioner"]
    assert pre_info["kind"] == "block" and pre_info["examples_used"] == 20
    assert pre_info["rejected"] == {"invalid_role:robot": 1}
    pre = bank.preconditioner()
    expected = pre.apply(bank.signed_vectors.double())
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(bank.query_vectors, expected.float(), rtol=1e-5, atol=1e-7)
    # explicit: the fitted Fisher is the mean outer product of the first 20 usable pool rows' features
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    chat = ChatTokenizer(tokenizer, max_tokens=2048)
    from drift_stream.data.formats import load_adapter

    rows = [chat.encode(load_adapter("messages").to_example(r)) for r in pool if r["messages"][0]["role"] == "user"]
    feats = GradientFeaturizer(model, FEATURES).featurize(collate(rows[:20], chat.pad_token_id)).features.double()
    ref = Preconditioner.from_state_dict(bank.preconditioner_state)
    block = feats[:, :16]
    torch.testing.assert_close(ref._fisher_sum[0], block.T @ block, rtol=1e-5, atol=1e-9)


def test_queries_file_with_reasoning_gym(model_dir, tmp_path):
    reasoning_gym = pytest.importorskip("reasoning_gym")
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=4, seed=5)
    rows = [{"id": f"rg{i}", "question": e["question"], "answer": e["answer"], "metadata": json.dumps(e["metadata"])}
            for i, e in enumerate(dataset)]
    rows.append({"id": "broken", "question": "2+2?", "answer": "4", "metadata": "{not json"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "queries.parquet")
    cfg = BankConfig(features=FEATURES, rollouts=RolloutConfig(num_rollouts=2, max_new_tokens=8, seed=1))
    bank = build_bank(model_dir, str(tmp_path / "queries.parquet"), tmp_path / "bank", cfg,
                      verifier="reasoning_gym", progress=False)
    m = bank.manifest
    assert m["rejected_queries"] == [{"index": 4, "id": None, "reason": "invalid_json:metadata"}]
    assert [r["id"] for r in m["queries"]] == [f"rg{i}" for i in range(4)]
    assert all(r["correct"] + r["incorrect"] == 2 and r["failed"] == 0 for r in m["queries"])
    assert m["verifier"] == "reasoning_gym" and "1 rejected" in bank.summary()


def test_config_validation():
    for bad in ({"signing": "signed"}, {"targets": "offpolicy"}, {"preconditioner": "kfac"}, {"damping": -1.0},
                {"correct_threshold": 0.0}, {"fisher_examples": 0}, {"verifier_timeout_s": 0}):
        with pytest.raises(ConfigError):
            BankConfig(**bad)
    assert BankConfig().to_dict()["rollouts"]["num_rollouts"] == 8


def test_loaded_model_gives_the_same_bank(sign_bank, model_dir, tmp_path):
    model, tokenizer = load_model(model_dir, device="cpu"), load_tokenizer(model_dir)
    cfg = BankConfig(features=FEATURES, rollouts=ROLLOUTS, save_rollout_vectors=True)
    bank = build_bank(model, gsm_rows(), tmp_path / "bank", cfg, verifier=GRADED, tokenizer=tokenizer, progress=False)
    assert torch.equal(bank.query_vectors, sign_bank.query_vectors)
    assert bank.manifest["model"]["fingerprint"] == sign_bank.manifest["model"]["fingerprint"]
    with pytest.raises(ConfigError, match="tokenizer="):
        build_bank(model, gsm_rows(), tmp_path / "other", cfg, verifier=GRADED, progress=False)


def test_manifest_records_feature_coverage_by_explicit_count(sign_bank, model_dir):
    """The bank says which share of the model's parameters its features see: the tracked linears' weights over every
    parameter (the tiny Llama has no fused experts, so nothing is warned about)."""
    from drift_stream.grads.coverage import coverage_warning
    from drift_stream.model.loading import load_model

    cov = sign_bank.manifest["coverage"]
    model = load_model(model_dir, device="cpu")
    tracked = set(sign_bank.manifest["modules"])
    linear = sum(m.weight.numel() for name, m in model.named_modules() if name in tracked)
    total = sum(p.numel() for p in model.parameters())  # each tensor once (tied head = embedding)
    assert cov["share"] == pytest.approx(linear / total, rel=1e-12)
    assert coverage_warning(cov) is None
