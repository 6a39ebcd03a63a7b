"""Verifiers run where they can be stopped (issue 17, finding 6): a catastrophic regex costs at most its timeout,
the build goes on, no thread or process is left behind, and rollouts are verified in parallel."""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
import time

import pytest

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.grads.projection import FeatureConfig
from drift_stream.rollouts.engine import Query, RolloutConfig
from drift_stream.rollouts.verifiers import (
    FunctionVerifier,
    VerifyResult,
    load_verifier,
    verify_rollouts,
)

EVIL = "a" * 40 + "b"  # (a+)+$ backtracks through ~2^40 ways to split the a's before failing at the b


def q(qid: str = "q", answer: str = "1") -> Query:
    return Query(id=qid, messages=({"role": "user", "content": "?"},), answer=answer)


def test_a_catastrophic_regex_costs_at_most_its_timeout_and_leaves_nothing_behind():
    verifier = load_verifier("regex:(a+)+$")
    threads = threading.active_count()
    start = time.perf_counter()
    results = verify_rollouts(verifier, [(EVIL, q("evil")), ("aaa", q("a")), ("bbb", q("b"))], timeout_s=0.5,
                              workers=2)
    elapsed = time.perf_counter() - start
    assert results == [VerifyResult(None, "timeout:0.5s"), VerifyResult(1.0), VerifyResult(0.0)]
    # 0.5 s timeout + process starts; the thread-based timeout took 13.4 s for 34 a's and this pattern never ends
    assert elapsed < 3.0, elapsed
    assert threading.active_count() == threads and multiprocessing.active_children() == []


def test_rollouts_are_verified_in_parallel():
    def slow(completion, query):
        time.sleep(0.5)
        return 1.0

    start = time.perf_counter()
    results = verify_rollouts(FunctionVerifier(slow, "test:slow"), [("x", q(str(i))) for i in range(4)],
                              timeout_s=5, workers=4)
    assert results == [VerifyResult(1.0)] * 4
    assert time.perf_counter() - start < 1.9  # serial: 2.0 s of sleeping alone


def test_a_verifier_that_kills_its_process_is_one_failed_rollout():
    def dies(completion, query):
        if completion == "die":
            os._exit(3)
        return 1.0

    results = verify_rollouts(FunctionVerifier(dies, "test:dies"), [("ok", q()), ("die", q()), ("ok", q())],
                              timeout_s=5, workers=1)
    assert results == [VerifyResult(1.0), VerifyResult(None, "error:verifier process died (exit code 3)"),
                       VerifyResult(1.0)]


@pytest.mark.parametrize("workers", [1, 2])
def test_results_keep_input_order(workers):
    items = [(str(i), q(str(i), str(i % 3))) for i in range(9)]
    got = verify_rollouts(load_verifier("numeric"), items, timeout_s=5, workers=workers)
    assert got == [VerifyResult(float(i % 3 == i)) for i in range(9)]


def test_the_bank_build_goes_on_past_a_hanging_verifier(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", arch="llama", seed=1)
    questions = [{"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(3)]

    def reward(completion, query):
        if query.id == "q1":  # a user's pattern that backtracks forever on this rollout
            return float(re.search(r"(a+)+$", EVIL) is not None)
        return float(sum(map(ord, completion)) % 2 == 0)

    config = BankConfig(features=FeatureConfig(proj_dim_in=4, proj_dim_out=4), preconditioner="identity",
                        rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=8, seed=3), verifier_timeout_s=0.5)
    bank = build_bank(model_dir, questions, tmp_path / "bank", config,
                      verifier=FunctionVerifier(reward, "test:evil"), progress=False)
    rows = {r["id"]: r for r in bank.manifest["queries"]}
    assert rows["q1"]["failed"] == 4 and rows["q1"]["excluded"] == "no_valid_rollouts"
    reasons = [r["failure_reason"] for r in bank.rollouts().to_pylist() if r["query_id"] == "q1"]
    assert reasons == ["timeout:0.5s"] * 4
    assert rows["q0"]["failed"] == rows["q2"]["failed"] == 0
    # 4 timeouts of 0.5 s on 2 worker processes, plus 8 quick calls and process starts
    assert bank.manifest["timings_s"]["verification"] < 4.0
    assert multiprocessing.active_children() == []
