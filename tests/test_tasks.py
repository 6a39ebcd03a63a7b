"""Procedural tasks, splits and corruption (drift_stream/tasks.py) and the shipped demo data."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("reasoning_gym")

from drift_stream.embedded import tasks as T  # noqa: E402
from drift_stream.errors import ConfigError  # noqa: E402

DEMO = Path(T.__file__).parent / "assets" / "demo"
SMALL = T.DataRecipe(
    seed=3,
    pool_size=400,
    queries={"basic_arithmetic": 10, "chain_sum": 10},
    test={"basic_arithmetic": 10, "chain_sum": 10, "gcd": 5, "products": 5, "leg_counting": 5},
)


@pytest.fixture(scope="module")
def small():
    return T.make_splits(SMALL)


def test_extract_and_score_by_hand():
    assert T.extract_answer("3+4=7 #### 7") == "7"
    assert T.extract_answer("#### 1 #### -12 ") == "-12"
    assert T.extract_answer("3+4=7") is None
    assert T.extract_answer("3+4=7 ####  ") is None
    assert T.score_response("chain_sum", "1+2=3 #### 3", "3") == 1.0
    assert T.score_response("chain_sum", "1+2=3 #### 3.0", "3") == 1.0  # reasoning-gym's decimal match
    assert T.score_response("chain_sum", "1+2=4 #### 4", "3") == 0.0
    assert T.score_response("gcd", "truncated gcd(4,2)", "2") == 0.0


def test_worked_responses_by_hand():
    assert T._arith_steps("( 2 - -1 * -2 )") == (["-1*-2=2", "2-2=0"], 0)
    assert T._arith_steps("3 + 4 * 2 - 1") == (["4*2=8", "3+8=11", "11-1=10"], 10)
    for task in T.TASK_SPECS:
        for item in T.generate_items(task, count=30, seed=1):
            assert item.response.endswith(f"#### {item.answer}")
            assert T.score_response(task, item.response, item.answer) == 1.0
            assert item.steps[-1].endswith(f"={item.answer}")


def test_generation_is_deterministic_and_streams_are_apart():
    a = T.generate_items("chain_sum", count=50, seed=0, split="pool")
    assert a == T.generate_items("chain_sum", count=50, seed=0, split="pool")
    assert a != T.generate_items("chain_sum", count=50, seed=1, split="pool")
    seeds = {T.stream_seed(s, split, task) for s in (0, 1) for split in T.SPLITS for task in T.TASK_SPECS}
    ordered = sorted(seeds)
    assert len(ordered) == 2 * len(T.SPLITS) * len(T.TASK_SPECS)
    assert min(b - a for a, b in zip(ordered, ordered[1:])) == 10_000_000


def test_exclude_and_distinct_questions():
    first = T.generate_items("gcd", count=40, seed=0)
    again = T.generate_items("gcd", count=40, seed=0, exclude={it.question for it in first[:20]})
    assert not {it.question for it in first[:20]} & {it.question for it in again}
    assert len({it.question for it in again}) == 40
    assert again[:20] == first[20:]  # skipping excluded items keeps the stream's order


def test_splits_are_disjoint_and_sized(small):
    pool_q = [r["messages"][0]["content"] for r in small.pool]
    query_q = [r["question"] for r in small.queries]
    test_q = [r["question"] for r in small.test]
    assert len(small.pool) == 400 and len(small.queries) == 20 and len(small.test) == 35
    assert len(set(pool_q)) == len(pool_q) and len(set(query_q)) == 20 and len(set(test_q)) == 35
    assert not set(pool_q) & set(query_q)
    assert not set(pool_q) & set(test_q)
    assert not set(query_q) & set(test_q)
    ids = [r["id"] for r in small.pool + small.queries + small.test]
    assert len(set(ids)) == len(ids)
    assert {r["task"] for r in small.queries} == set(T.TARGET_TASKS)
    assert small.dev == []  # no dev split unless the recipe asks for one


def test_dev_split_is_disjoint_and_leaves_test_unchanged(small):
    from dataclasses import replace

    with_dev = T.make_splits(replace(SMALL, dev={"basic_arithmetic": 6, "chain_sum": 6, "gcd": 3}))
    assert with_dev.test == small.test  # drawn after test, so test does not move
    dev_q = {r["question"] for r in with_dev.dev}
    assert len(with_dev.dev) == 15 == len(dev_q)
    others = ({r["question"] for r in with_dev.test + with_dev.queries}
              | {r["messages"][0]["content"] for r in with_dev.pool})
    assert not dev_q & others
    assert {r["task"] for r in with_dev.dev} == {"basic_arithmetic", "chain_sum", "gcd"}


def test_corruption_counts_are_exact(small):
    counts = {}
    for r in small.pool:
        counts[r["corruption"]] = counts.get(r["corruption"], 0) + 1
    expected = T.allocate(400, {**SMALL.corruption, T.CLEAN: 1 - sum(SMALL.corruption.values())})
    assert counts == {k: v for k, v in expected.items() if v}
    assert counts[T.CLEAN] == 280 and counts["wrong_answer"] == 40


def test_corruption_labels_match_what_was_done(small):
    # Rebuild every pool row's clean item from the same stream and check the response against its label.
    seen = {r["question"] for r in small.queries + small.test}
    per_task = T.allocate(SMALL.pool_size, SMALL.pool_tasks)
    items = {}
    for task, n in per_task.items():
        for it in T.generate_items(task, count=n, seed=SMALL.seed, exclude=seen):
            items[it.question] = it
    clean_by_family = {}
    for it in items.values():
        clean_by_family.setdefault(T.family(it.task), set()).add(it.response)
    for row in small.pool:
        item = items[row["messages"][0]["content"]]
        assert item.task == row["task"]
        response, kind = row["messages"][1]["content"], row["corruption"]
        clean = item.response
        if kind == T.CLEAN:
            assert response == clean
        elif kind == "wrong_answer":
            wrong = int(T.extract_answer(response))
            assert 1 <= abs(wrong - int(item.answer)) <= 10
            assert response.rsplit(" #### ", 1)[0].endswith(f"={wrong}")
            assert T.score_response(item.task, response, item.answer) == 0.0
        elif kind == "truncated":
            assert clean.startswith(response) and "####" not in response and 0 < len(response) < len(clean)
        elif kind == "garbled":
            assert len(response) == len(clean) and response != clean
        elif kind == "off_task":
            others = set().union(*(v for f, v in clean_by_family.items() if f != T.family(item.task)))
            assert response in others
        elif kind == "too_short":
            assert 1 <= len(response) <= 3
        elif kind == "too_long":
            assert len(response) > 140 and T.score_response(item.task, response, item.answer) == 1.0
            assert len(row["messages"][0]["content"]) + len(response) + 6 <= 256
        else:
            raise AssertionError(kind)


def test_corrupt_response_kinds_on_one_item():
    item = T.TaskItem("chain_sum", "Sum: 12 + 7 - 3 =", "16", ("12+7=19", "19-3=16"), 0, 0)
    donor = T.TaskItem("gcd", "GCD of 4 and 2?", "2", ("gcd(4,2)=gcd(2,0)=2",), 0, 0)
    rng = random.Random(0)
    assert item.response == "12+7=19, 19-3=16 #### 16"
    wrong = T.corrupt_response(item, "wrong_answer", rng)
    assert wrong.startswith("12+7=19, 19-3=") and wrong != item.response
    assert T.corrupt_response(item, "off_task", rng, donor) == donor.response
    with pytest.raises(ValueError, match="family"):
        T.corrupt_response(item, "off_task", rng, item)
    with pytest.raises(ConfigError, match="unknown corruption kind"):
        T.corrupt_response(item, "shuffled", rng)


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="unknown task"):
        T.generate_items("sudoku", count=1, seed=0)
    with pytest.raises(ConfigError, match="unknown corruption kinds"):
        T.make_sft_pool({"chain_sum": 1.0}, size=10, corruption={"typo": 0.1}, seed=0)
    with pytest.raises(ConfigError, match="two families"):
        T.make_sft_pool({"chain_sum": 0.5, "basic_arithmetic": 0.5}, size=10, corruption={"off_task": 0.1}, seed=0)
    with pytest.raises(ConfigError, match="split"):
        T.stream_seed(0, "train", "gcd")
    with pytest.raises(ConfigError, match="pool_tasks"):
        T.DataRecipe(pool_tasks={"chain_sum": -1.0})


def test_allocate_sums_exactly():
    assert T.allocate(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert sum(T.allocate(3000, T.DataRecipe().corruption | {"clean": 0.7}).values()) == 3000


def test_shipped_demo_data_is_what_the_recipe_makes():
    splits = T.make_splits(T.DataRecipe())
    for name, rows in (("pool", splits.pool), ("queries", splits.queries), ("test", splits.test)):
        path = DEMO / f"{name}.parquet"
        assert path.stat().st_size < 1_000_000
        assert pq.read_table(path).to_pylist() == rows, name
