"""Reference solutions in a second author's style (drift_stream.embedded.task_references): correct, worked, another layout."""

import re

import pytest

pytest.importorskip("reasoning_gym")

from drift_stream.embedded import tasks as T  # noqa: E402
from drift_stream.embedded.task_references import (  # noqa: E402
    REFERENCE_STYLES,
    prose_answer,
    prose_response,
    reference_solution,
)
from drift_stream.errors import ConfigError  # noqa: E402

_OPS = {
    r"add (-?\d+) and (-?\d+) to get (-?\d+)": lambda a, b: a + b,
    r"subtract (-?\d+) from (-?\d+), which leaves (-?\d+)": lambda b, a: a - b,
    r"multiply (-?\d+) by (-?\d+), which gives (-?\d+)": lambda a, b: a * b,
    r"(\d+) animals? with (\d+) legs each have (\d+) legs": lambda a, b: a * b,
    r"adding (\d+) and (\d+) gives (\d+) legs in total": lambda a, b: a + b,
    r"(\d+) divided by (\d+) leaves remainder (\d+)": lambda a, b: a % b,
}


@pytest.mark.parametrize("task", sorted(T.TASK_SPECS))
def test_prose_solutions_are_correct_and_in_another_layout(task):
    checked = 0
    for item in T.generate_items(task, count=40, seed=3, split="dev"):
        text = prose_response(item)
        assert prose_answer(text) == item.answer
        assert T.ANSWER_MARKER not in text and "\n" in text  # another template family: no `####`, one line a step
        for line in text.splitlines()[:-1]:
            for pattern, fn in _OPS.items():
                for m in re.finditer(pattern, line):  # every worked step is the right arithmetic
                    a, b, c = (int(x) for x in m.groups())
                    assert fn(a, b) == c, (line, item)
                    checked += 1
        assert text.endswith(f"$\\boxed{{{item.answer}}}$.")
    assert checked >= 40  # every item had at least one checked step


def test_reference_solution_styles():
    item = T.generate_items("chain_sum", count=1, seed=0)[0]
    assert reference_solution(item, "pool") == item.response
    assert reference_solution(item, "answer") == item.answer
    assert reference_solution(item, "prose") == prose_response(item)
    with pytest.raises(ConfigError, match="unknown reference style"):
        reference_solution(item, "latex")
    assert prose_answer("no box") is None


def test_splits_carry_reference_columns_without_changing_the_draws():
    small = T.DataRecipe(pool_size=40, queries={"chain_sum": 5, "basic_arithmetic": 5}, test={"gcd": 4, "chain_sum": 4},
                         dev={"products": 3, "leg_counting": 3})
    plain = T.make_splits(small)
    styled = T.make_splits(T.DataRecipe(**{**small.__dict__, "reference_styles": REFERENCE_STYLES}))
    assert styled.pool == plain.pool
    for a_rows, b_rows in ((plain.test, styled.test), (plain.dev, styled.dev), (plain.queries, styled.queries)):
        assert len(a_rows) == len(b_rows) > 0
        for a, b in zip(a_rows, b_rows):
            assert {k: b[k] for k in a} == a
            assert b["reference_answer"] == a["answer"]
            assert prose_answer(b["reference_prose"]) == a["answer"]
            assert T.extract_answer(b["reference_pool"]) == a["answer"]
    with pytest.raises(ConfigError, match="unknown reference styles"):
        T.make_queries({"gcd": 1}, seed=0, split="test", reference_styles=("latex",))
