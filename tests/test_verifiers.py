"""Verifiers on real-shaped answers (GSM8K, boxed, answer tags, reasoning-gym entries) and their failures."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from drift_stream.data.answers import extract_answer
from drift_stream.errors import ConfigError
from drift_stream.rollouts.engine import Query
from drift_stream.rollouts.verifiers import (
    FunctionVerifier,
    VerifyResult,
    load_verifier,
    parse_number,
    run_verifier,
    verify_rollouts,
)

GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def q(answer, question="How many clips?", reference=None, task=None, metadata=None, qid="q"):
    return Query(id=qid, messages=({"role": "user", "content": question},), answer=answer, reference=reference,
                 task=task, metadata=metadata)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so <answer> 17 </answer>", "17"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("thus $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{3}, finally \\boxed{{4}}", "{4}"),
        (GSM8K_REFERENCE, "72"),
        ("The final answer is 1,000.", "1,000"),
        ("Answer: yes", "yes"),
        ("no marked answer 12 here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "span, expected",
    [("30.0", Fraction(30)), ("1,000", Fraction(1000)), ("$12.50", Fraction(25, 2)), ("50%", Fraction(50)),
     ("3/4", Fraction(3, 4)), ("\\frac{3}{4}", Fraction(3, 4)), ("-\\frac{1}{8}", Fraction(-1, 8)),
     ("-2.5e3", Fraction(-2500)), ("about 7 apples", Fraction(7)), ("none", None)],
)
def test_parse_number(span, expected):
    assert parse_number(span) == expected


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("She sold 24 in May, so 48 + 24 = 72.\n#### 72", 1.0),
        ("48 + 24 = 72 clips. #### 72.0", 1.0),
        ("The answer is \\boxed{72}", 1.0),
        ("<answer>72</answer>", 1.0),
        ("Answer: 72 clips", 1.0),
        ("48 + 24 gives 72", 1.0),  # last number
        ("#### 71", 0.0),
        ("72 is wrong, \\boxed{70}", 0.0),  # the marked answer wins over other numbers
        ("I do not know", 0.0),
    ],
)
def test_numeric_gsm8k(completion, reward):
    verifier = load_verifier("numeric")
    assert verifier.score(completion, q("72", reference=GSM8K_REFERENCE)) == reward


def test_numeric_tolerance_and_commas():
    verifier = load_verifier("numeric")
    assert verifier.score("#### 1,000", q("1000")) == 1.0
    assert verifier.score("#### 30", q("30.0")) == 1.0
    assert verifier.score("#### 0.3333333334", q("1/3")) == 1.0  # within rel_tol 1e-6
    assert verifier.score("#### 0.3334", q("1/3")) == 0.0
    assert verifier.score("\\boxed{\\frac{1}{2}}", q("0.5")) == 1.0
    # The reference itself may still carry the GSM8K marker (answer not extracted by the adapter).
    assert verifier.score("#### 72", q(None, reference=GSM8K_REFERENCE)) == 1.0


def test_numeric_reference_not_a_number_is_a_failure():
    result = run_verifier(load_verifier("numeric"), "#### 3", q("three"), timeout_s=5)
    assert result.reward is None and result.failure.startswith("error:VerifierError")
    assert "not a number" in result.failure


def test_exact():
    verifier = load_verifier("exact")
    assert verifier.score("<answer> Paris </answer>", q("Paris")) == 1.0
    assert verifier.score("  Paris.\n", q("Paris")) == 1.0  # no marker: the whole completion
    assert verifier.score("<answer>paris</answer>", q("Paris")) == 0.0
    assert verifier.score("It is Paris", q("Paris")) == 0.0


def test_regex_with_answer_placeholder():
    verifier = load_verifier(r"regex:\bfinal: {answer}\b")
    assert verifier.spec() == r"regex:\bfinal: {answer}\b"
    assert verifier.score("work... final: 3.5 done", q("3.5")) == 1.0
    assert verifier.score("final: 3x5", q("3.5")) == 0.0  # the reference is escaped: '.' is literal
    assert load_verifier(r"regex:^\d{3}$").score("123", q(None)) == 1.0
    with pytest.raises(ConfigError, match="does not compile"):
        load_verifier("regex:(")


def test_math_equivalence():
    verifier = load_verifier("math")
    assert verifier.score("So the result is $\\boxed{\\frac{1}{2}}$.", q("0.5")) == 1.0
    assert verifier.score("The answer is $\\boxed{\\frac{2}{4}}$", q("\\frac{1}{2}")) == 1.0
    assert verifier.score("$\\boxed{x^2 + 2x + 1}$", q("(x+1)^2")) == 1.0
    assert verifier.score("$\\boxed{3}$", q("\\frac{1}{2}")) == 0.0
    assert verifier.score("no math here", q("2")) == 0.0


def test_math_is_safe_in_threads():
    # math-verify's default SIGALRM timeouts raise off the main thread; ours must not.
    verifier = load_verifier("math")
    query = q("\\frac{1}{2}")
    with ThreadPoolExecutor(max_workers=4) as pool:
        rewards = list(pool.map(lambda c: verifier.score(c, query), ["$\\boxed{0.5}$", "$\\boxed{1}$"] * 4))
    assert rewards == [1.0, 0.0] * 4
    assert run_verifier(verifier, "$\\boxed{0.5}$", query, timeout_s=30) == VerifyResult(1.0)


@pytest.fixture(scope="module")
def gym_entries():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    entries = []
    for name in ("basic_arithmetic", "spell_backward", "leg_counting"):
        dataset = reasoning_gym.create_dataset(name, size=3, seed=7)
        entries.extend((name, dataset, dataset[i]) for i in range(3))
    return entries


def test_reasoning_gym_scores_like_the_dataset(gym_entries):
    verifier = load_verifier("reasoning_gym")
    for name, dataset, entry in gym_entries:
        # As a queries file carries it: the metadata column as JSON, the task from metadata.source_dataset.
        query = q(entry["answer"], question=entry["question"],
                  metadata=json.loads(json.dumps(entry["metadata"])), qid=f"{name}-{entry['metadata']['source_index']}")
        right = f"Let me think.\n<answer>{entry['answer']}</answer>"
        wrong = "<answer>definitely not it</answer>"
        assert verifier.score(right, query) == 1.0 == dataset.score_answer(entry["answer"], entry)
        assert verifier.score(wrong, query) == dataset.score_answer("definitely not it", entry)
        assert verifier.score(wrong, query) < 1.0
        assert verifier.score(f"  {entry['answer']}\n", query) == 1.0  # no tags: the stripped completion


def test_reasoning_gym_explicit_task_and_failures(gym_entries):
    verifier = load_verifier("reasoning_gym")
    name, _, entry = gym_entries[0]
    metadata = {k: v for k, v in entry["metadata"].items() if k != "source_dataset"}
    query = q(entry["answer"], question=entry["question"], task=name, metadata=metadata)
    assert verifier.score(f"<answer>{entry['answer']}</answer>", query) == 1.0
    no_task = run_verifier(verifier, "<answer>1</answer>", q("1", metadata=metadata), timeout_s=5)
    assert no_task.reward is None and "names no reasoning-gym task" in no_task.failure
    unknown = run_verifier(verifier, "<answer>1</answer>", q("1", task="no_such_task"), timeout_s=5)
    assert unknown.reward is None and "no_such_task" in unknown.failure


def test_reasoning_gym_judges_against_the_extracted_answer_not_the_worked_reference(gym_entries):
    verifier = load_verifier("reasoning_gym")
    name, _, entry = gym_entries[0]
    worked = f"Step by step the result is {entry['answer']}.\n#### {entry['answer']}"
    query = q(entry["answer"], question=entry["question"], reference=worked, task=name, metadata=entry["metadata"])
    assert verifier.score(f"<answer>{entry['answer']}</answer>", query) == 1.0


def test_user_function_by_module_and_by_file(tmp_path, monkeypatch):
    code = (
        "def reward(completion, query):\n"
        "    return completion.strip() == query.answer\n"
        "def bad(completion, query):\n"
        "    return 1.5\n"
    )
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_verifier("my_rewards:reward")
    by_file = load_verifier(f"{tmp_path / 'my_rewards.py'}:reward")
    for verifier in (by_module, by_file):
        assert run_verifier(verifier, " 7 ", q("7")) == VerifyResult(1.0)
        assert run_verifier(verifier, "8", q("7")) == VerifyResult(0.0)
    assert run_verifier(load_verifier("my_rewards:bad"), "x", q("7")) == VerifyResult(None, "bad_reward:1.5")
    with pytest.raises(ConfigError, match="no callable 'missing'"):
        load_verifier("my_rewards:missing")
    with pytest.raises(ConfigError, match="cannot import"):
        load_verifier("no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match="unknown verifier"):
        load_verifier("numerical")


def test_failures_are_contained_and_reported(caplog):
    def flaky(completion, query):
        if completion == "raise":
            raise RuntimeError("verifier blew up")
        if completion == "hang":
            threading.Event().wait(1.0)
        if completion == "nan":
            return math.nan
        return 1.0

    verifier = FunctionVerifier(flaky, "test:flaky")
    items = [(c, q("1", qid=c)) for c in ("ok", "raise", "hang", "nan", "ok")]
    with caplog.at_level("WARNING"):
        results = verify_rollouts(verifier, items, timeout_s=0.2)
    assert results[0] == results[4] == VerifyResult(1.0)
    assert results[1] == VerifyResult(None, "error:RuntimeError: verifier blew up")
    assert results[2] == VerifyResult(None, "timeout:0.2s")
    assert results[3] == VerifyResult(None, "bad_reward:nan")
    assert "failed on 3 of 5 rollouts" in caplog.text
    # Without a timeout, exceptions are still contained.
    assert run_verifier(verifier, "raise", q("1"), timeout_s=None).failure == "error:RuntimeError: verifier blew up"
