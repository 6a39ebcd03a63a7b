"""Bank fingerprints are taken from the checkpoint's values, not the dtype they were loaded in (issue 17, finding 5).

A bf16 checkpoint loads as bf16 on a GPU and as float32 on a CPU: a bank built one way scores the other way, with a
warning; a different checkpoint is still refused, in any dtype.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest
import torch

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.bank.store import compare_model_fingerprints, fingerprint_model
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.errors import BankMismatchError
from drift_stream.grads.projection import FeatureConfig
from drift_stream.model.loading import load_model
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.build import build_scorer

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(3)]
ROWS = pa.Table.from_pylist([{"messages": [{"role": "user", "content": f"What is {i} + 3?"},
                                           {"role": "assistant", "content": f"{i + 3} because {i} plus 3"}]}
                             for i in range(6)])


def parity(completion, query):
    return float(sum(map(ord, completion)) % 2 == 0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A bf16 checkpoint (as most hub models ship), a float32 one, and another model."""
    root = tmp_path_factory.mktemp("fp")
    fp32 = save_tiny_model(root / "fp32", arch="llama", seed=2)
    bf16 = str(root / "bf16")
    load_model(fp32, device="cpu", dtype="bfloat16").save_pretrained(bf16)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(fp32).save_pretrained(bf16)
    other = save_tiny_model(root / "other", arch="llama", seed=99)
    return root, fp32, bf16, other


def test_the_fingerprint_ignores_the_load_dtype_and_records_it(checkpoints):
    _, fp32, bf16, other = checkpoints
    as_bf16 = fingerprint_model(load_model(bf16, device="cpu", dtype="bfloat16"))
    as_fp32 = fingerprint_model(load_model(bf16, device="cpu", dtype="float32"))
    assert as_bf16["dtype"] == "bfloat16" and as_fp32["dtype"] == "float32" and as_fp32["device"] == "cpu"
    assert as_bf16["fingerprint"] == as_fp32["fingerprint"]
    same, note = compare_model_fingerprints(as_bf16, as_fp32)
    assert same and "bfloat16" in note and "float32" in note
    # A float32 checkpoint loaded in bf16 is the same checkpoint at bf16 precision, but not at float32 precision.
    full = fingerprint_model(load_model(fp32, device="cpu", dtype="float32"))
    half = fingerprint_model(load_model(fp32, device="cpu", dtype="bfloat16"))
    assert compare_model_fingerprints(full, half)[0]
    assert full["params_sha256_by_dtype"]["float32"] != half["params_sha256_by_dtype"]["float32"]
    # Another checkpoint differs at every precision.
    assert not compare_model_fingerprints(full, fingerprint_model(load_model(other, device="cpu")))[0]


def test_a_change_below_bf16_resolution_is_refused_between_float32_models(checkpoints):
    _, fp32, _, _ = checkpoints
    model = load_model(fp32, device="cpu", dtype="float32")
    before = fingerprint_model(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.mul_(1 + 2**-12)  # below bf16's 2^-8 relative resolution: a tiny fine-tune step
    after = fingerprint_model(model)
    assert not compare_model_fingerprints(before, after)[0]


def test_a_bank_built_in_bf16_scores_with_a_float32_model_and_refuses_another(checkpoints, caplog):
    root, _, bf16, other = checkpoints
    config = BankConfig(features=FeatureConfig(proj_dim_in=4, proj_dim_out=4), preconditioner="identity",
                        rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=8, seed=5))
    bank = str(root / "bank")
    built = build_bank(bf16, QUESTIONS, bank, config, verifier=FunctionVerifier(parity, "test:parity"),
                       dtype="bfloat16", progress=False)
    assert built.manifest["model"]["dtype"] == "bfloat16"
    with caplog.at_level(logging.WARNING, logger="drift_stream.bank.store"):
        out = build_scorer("drift", model=bf16, bank=bank, dtype="float32")(ROWS)  # the CPU scorer: float32
    assert out.column("drift_score").null_count < ROWS.num_rows
    assert any("built with the model in bfloat16" in r.getMessage() and "float32" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(BankMismatchError, match="rebuild the bank or pass --allow-mismatch"):
        build_scorer("drift", model=other, bank=bank, dtype="float32")(ROWS)
    with pytest.raises(BankMismatchError):
        build_scorer("drift", model=other, bank=bank, dtype="bfloat16")(ROWS)
