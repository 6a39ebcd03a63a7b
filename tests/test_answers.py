"""One answer extractor (answers.py): verifiers and the task pool read `####` the same way."""

from __future__ import annotations

import pytest

from drift_stream.data import answers
from drift_stream.data.answers import extract_answer as verifier_extract
from drift_stream.embedded import tasks
from drift_stream.rollouts.engine import Query
from drift_stream.rollouts.verifiers import load_verifier


@pytest.mark.parametrize("text,want", [
    ("3+4=7 #### 7", "7"),
    ("#### 1 #### -12 ", "-12"),  # the last marker wins (the verifiers' regex used to read "1 #### -12")
    ("work\n#### 5\nsome trailing chatter", "5"),
    ("3+4=7", None),
    ("#### ", None),
])
def test_the_pool_and_the_verifiers_read_hashes_alike(text, want):
    assert tasks.extract_answer(text) == want
    assert verifier_extract(text) == want
    assert answers.extract_answer(text, forms=("hashes",)) == want


def test_forms_in_order_and_the_last_occurrence_wins():
    assert answers.extract_answer("<answer>1</answer> \\boxed{2} #### 3") == "1"
    assert answers.extract_answer("\\boxed{\\frac{1}{2}} then \\boxed{3} #### 4") == "3"
    assert answers.extract_answer("Answer: 4\nThe final answer is 5.") == "5"
    assert answers.extract_answer("\\boxed{2}", forms=("hashes",)) is None
    with pytest.raises(ValueError, match="unknown answer forms"):
        answers.extract_answer("x", forms=("latex",))


def test_numeric_verifier_takes_the_last_marked_answer():
    query = Query(id="q", messages=({"role": "user", "content": "?"},), answer="-12")
    assert load_verifier("numeric").score("#### 1 #### -12", query) == 1.0
