"""Procedural, verifiable reasoning tasks from `reasoning-gym`, worked responses, and documented corruption.

Used by the demo data (examples/make_demo_data.py), the tiny default model's training script and the refinement
benchmark. Each task draws items from a reasoning-gym dataset, shows them to the model as a short question, and
answers with a little work and a final line `#### <answer>` that `extract_answer` reads back. Correctness is the
dataset's own `score_answer` on the extracted answer (exact: reward 1.0).

Seeding: reasoning-gym item i of a dataset made with seed S uses `random.Random(S + i)`, so two datasets whose seeds
are close share items. Every (split, task) stream therefore starts at a seed 10^7 or more away from every other one
(`stream_seed`), and splits are also de-duplicated by question text (`exclude`).

Needs the optional extra `reasoning-gym` (pip install drift-stream[gym]); it is imported on first use.
"""

from __future__ import annotations

import ast
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from drift_stream.data import answers
from drift_stream.errors import ConfigError

ANSWER_MARKER = answers.HASHES

TARGET_TASKS = ("basic_arithmetic", "chain_sum")
NONTARGET_TASKS = ("gcd", "products", "leg_counting")

CLEAN = "clean"
CORRUPTION_KINDS = ("wrong_answer", "truncated", "garbled", "off_task", "too_short", "too_long")

# Streams of items must not overlap: item i of a stream uses seed base + i, and no split draws 10^7 items.
_TASK_STRIDE = 10_000_000
_SPLIT_STRIDE = 100_000_000
SPLITS = ("pool", "queries", "test", "donor", "dev")

_PRINTABLE = [chr(i) for i in range(33, 127)]
_TOO_SHORT = ("?", "ok", "...", "#", "no", "idk", "0", "-")


@dataclass(frozen=True)
class TaskSpec:
    """A reasoning-gym dataset, the config that keeps it small, and how its items are shown and worked."""

    name: str
    index: int  # position in the seed layout; never reuse one
    config: Mapping[str, Any] = field(default_factory=dict)
    family: str = ""  # off_task donors come from another family ("" = the task's own name)

    def __post_init__(self):
        if self.index < 0 or self.index >= _SPLIT_STRIDE // _TASK_STRIDE:
            raise ConfigError(f"task index must be in [0, 10), got {self.index} for {self.name!r}")


TASK_SPECS: dict[str, TaskSpec] = {
    # Parenthesised +, -, * over one-digit (possibly negative) numbers; answers by Python's eval, so precedence holds.
    "basic_arithmetic": TaskSpec("basic_arithmetic", 0, dict(
        min_terms=2, max_terms=3, min_digits=1, max_digits=1, operators=("+", "-", "*"),
        allow_parentheses=True, allow_negation=False), family="arithmetic"),
    "chain_sum": TaskSpec("chain_sum", 1, dict(min_terms=2, max_terms=4, min_digits=1, max_digits=1),
                          family="arithmetic"),
    "gcd": TaskSpec("gcd", 2, dict(min_numbers=2, max_numbers=2, min_value=2, max_value=60)),
    "products": TaskSpec("products", 3, dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)),
    "leg_counting": TaskSpec("leg_counting", 4, dict(min_animals=1, max_animals=2, min_instances=1, max_instances=5)),
}


@dataclass(frozen=True)
class TaskItem:
    """One generated item: what the model is asked, the reference answer, and a clean worked response."""

    task: str
    question: str
    answer: str
    steps: tuple[str, ...]  # "lhs=rhs" lines of work; the last rhs is the answer
    source_seed: int  # reasoning-gym seed of the dataset this came from
    source_index: int

    @property
    def response(self) -> str:
        return format_response(self.steps, self.answer)


def format_response(steps: Sequence[str], answer: str) -> str:
    """`a+b=c, c-d=e #### e`: the work, then the extractable final answer."""
    work = ", ".join(steps)
    return f"{work} {ANSWER_MARKER} {answer}" if work else f"{ANSWER_MARKER} {answer}"


def extract_answer(text: str | None) -> str | None:
    """The rest of the line after the last `####`, stripped; None when there is none (or it is empty).

    The one extractor (answers.py) restricted to the `####` form this pool writes."""
    return answers.extract_answer(text, forms=("hashes",))


def _rg():
    try:
        import reasoning_gym
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise ImportError("drift_stream.embedded.tasks needs reasoning-gym: pip install 'drift-stream[gym]'") from exc
    return reasoning_gym


def _spec(task: str) -> TaskSpec:
    if task not in TASK_SPECS:
        raise ConfigError(f"unknown task {task!r}: known tasks are {sorted(TASK_SPECS)}")
    return TASK_SPECS[task]


def family(task: str) -> str:
    """The task's family: off_task corruption answers a question with another family's response."""
    return _spec(task).family or task


def stream_seed(seed: int, split: str, task: str) -> int:
    """The reasoning-gym seed of (split, task): 10^7 apart per task, 10^8 per split, 10^9 per user seed."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {SPLITS}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return seed * 10 * _SPLIT_STRIDE + SPLITS.index(split) * _SPLIT_STRIDE + _spec(task).index * _TASK_STRIDE


# ---- questions and worked responses, one pair per task ----------------------------------------------------------


def _fmt_expr(expr: str) -> str:
    return expr.replace(" ", "")


def _arith_steps(expression: str) -> tuple[list[str], int]:
    """Evaluate +, -, * in Python's order, one binary operation per step: ['4*-2=-8', '-3+-8=-11']."""
    steps: list[str] = []
    symbols = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}

    def walk(node) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in symbols:
            left, right = walk(node.left), walk(node.right)
            op = symbols[type(node.op)]
            value = left + right if op == "+" else left - right if op == "-" else left * right
            steps.append(f"{left}{op}{right}={value}")
            return value
        raise ValueError(f"unsupported expression {expression!r}")

    value = walk(ast.parse(expression, mode="eval").body)
    return steps, value


def _work(task: str, entry: Mapping[str, Any]) -> tuple[str, list[str], int]:
    """(question, steps, answer value) for a reasoning-gym entry."""
    meta = entry["metadata"]
    if task in ("basic_arithmetic", "chain_sum"):
        expression = meta["expression"]
        steps, value = _arith_steps(expression)
        if not steps:  # a lone number, e.g. "( ( -8 ) )"
            steps = [f"{_fmt_expr(expression)}={value}"]
        if task == "basic_arithmetic":
            question = f"Calculate {expression}."
        else:
            question = f"Sum: {expression} ="
        return question, steps, value
    if task == "gcd":
        a, b = meta["numbers"]
        question = f"GCD of {a} and {b}?"
        x, y = max(a, b), min(a, b)
        chain = []
        while y:  # Euclid, as one chained step: gcd(44,38)=gcd(38,6)=gcd(6,2)=gcd(2,0)=2
            chain.append(f"gcd({x},{y})")
            x, y = y, x % y
        chain.append(f"gcd({x},0)")
        return question, ["=".join(chain) + f"={x}"], x
    if task == "products":
        a, b = (int(t) for t in meta["expression"].split("*"))
        question = f"Multiply {a} * {b}."
        if b >= 10 and b % 10:
            tens, ones = b - b % 10, b % 10
            steps = [f"{a}*{tens}={a * tens}", f"{a}*{ones}={a * ones}", f"{a * tens}+{a * ones}={a * b}"]
        else:
            steps = [f"{a}*{b}={a * b}"]
        return question, steps, a * b
    if task == "leg_counting":
        animals = meta["animals"]
        from reasoning_gym.arithmetic.leg_counting import ANIMALS

        parts = ", ".join(f"{n} {name}{'s' if n > 1 else ''}" for name, n in animals.items())
        question = f"How many legs: {parts}?"
        steps, counts = [], []
        for name, n in animals.items():
            legs = ANIMALS[name]
            steps.append(f"{n}*{legs}={n * legs}")
            counts.append(n * legs)
        total = sum(counts)
        if len(counts) > 1:
            steps.append("+".join(str(c) for c in counts) + f"={total}")
        return question, steps, total
    raise ConfigError(f"no worked form for task {task!r}")


# ---- generation -------------------------------------------------------------------------------------------------


def generate_items(
    task: str, *, count: int, seed: int, split: str = "pool", exclude: Iterable[str] = ()
) -> list[TaskItem]:
    """`count` distinct items of `task` from the (seed, split) stream, skipping questions in `exclude`.

    Deterministic: the same arguments give the same items. Raises ConfigError if the task's question space runs out.
    """
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    spec = _spec(task)
    base = stream_seed(seed, split, task)
    limit = max(1000, 50 * count)
    dataset = _rg().create_dataset(task, seed=base, size=limit, **dict(spec.config))
    excluded = set(exclude)
    items: list[TaskItem] = []
    for index in range(limit):
        if len(items) == count:
            break
        entry = dataset[index]
        question, steps, value = _work(task, entry)
        if str(value) != entry["answer"]:
            raise RuntimeError(f"{task} item {index}: worked answer {value} != reasoning-gym answer {entry['answer']}")
        if question in excluded:
            continue
        excluded.add(question)
        items.append(TaskItem(task, question, entry["answer"], tuple(steps), base, index))
    if len(items) < count:
        raise ConfigError(f"{task}: only {len(items)} distinct questions in {limit} draws, asked for {count}")
    return items


def score_response(task: str, response: str | None, answer: str) -> float:
    """The task's own reasoning-gym `score_answer` on the answer extracted from `response` (0.0 if none)."""
    extracted = extract_answer(response)
    if extracted is None:
        return 0.0
    return float(_score_fn(task)(extracted, {"answer": answer}))


_SCORE_FNS: dict[str, Callable] = {}


def _score_fn(task: str) -> Callable:
    if task not in _SCORE_FNS:
        _spec(task)
        _SCORE_FNS[task] = _rg().get_score_answer_fn(task)
    return _SCORE_FNS[task]


# ---- corruption -------------------------------------------------------------------------------------------------


def corrupt_response(item: TaskItem, kind: str, rng: random.Random, donor: TaskItem | None = None) -> str:
    """A corrupted response for `item` (docs/demo_data.md describes each kind).

    wrong_answer: the last step and the final answer are off by 1-10. truncated: cut before the answer line.
    garbled: ~30% of characters replaced at random. off_task: a clean response to `donor` (another task's item).
    too_short: a 1-3 character reply. too_long: the work repeated to 150-200 characters (capped so the row fits
    240 character tokens), then the correct answer.
    """
    clean = item.response
    if kind == "wrong_answer":
        delta = rng.choice([d for d in range(-10, 11) if d != 0])
        wrong = str(int(item.answer) + delta)
        last = item.steps[-1].rsplit("=", 1)[0] + "=" + wrong
        return format_response(item.steps[:-1] + (last,), wrong)
    if kind == "truncated":
        work_len = clean.index(ANSWER_MARKER)
        return clean[: rng.randint(1, max(1, work_len - 1))].rstrip() or clean[0]
    if kind == "garbled":
        chars = list(clean)
        positions = [i for i in range(len(chars)) if rng.random() < 0.3] or [rng.randrange(len(chars))]
        for i in positions:
            chars[i] = rng.choice([c for c in _PRINTABLE if c != chars[i]])
        return "".join(chars)
    if kind == "off_task":
        if donor is None or family(donor.task) == family(item.task):
            raise ValueError("off_task needs a donor item from another task family")
        return donor.response
    if kind == "too_short":
        return rng.choice(_TOO_SHORT)
    if kind == "too_long":
        # 150-200 characters, but the whole row stays within 240 character tokens (the model's context is 256)
        target = min(rng.randint(150, 200), 240 - len(item.question) - len(item.answer) - 6 - len(ANSWER_MARKER) - 2)
        steps = list(item.steps)
        while len(", ".join(steps)) < target:
            steps.extend(item.steps)
        return format_response(steps, item.answer)
    raise ConfigError(f"unknown corruption kind {kind!r}: use one of {CORRUPTION_KINDS}")


def row_id(prefix: str, *parts: str) -> str:
    """A stable id: prefix + 12 hex characters of a content hash."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def allocate(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Split `total` by `shares` (largest remainders; deterministic in key order)."""
    if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
        raise ConfigError(f"shares must be >= 0 with a positive sum, got {dict(shares)}")
    norm = sum(shares.values())
    raw = {k: total * v / norm for k, v in shares.items()}
    counts = {k: int(v) for k, v in raw.items()}
    order = sorted(shares, key=lambda k: (-(raw[k] - counts[k]), list(shares).index(k)))
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def make_sft_pool(
    task_shares: Mapping[str, float],
    *,
    size: int,
    corruption: Mapping[str, float],
    seed: int,
    exclude: Iterable[str] = (),
) -> list[dict]:
    """An SFT pool in `messages` form: rows {id, messages, task, corruption}, in a seeded random order.

    `corruption` maps kinds to the fraction of rows they take (e.g. {"wrong_answer": 0.1, ...}); the rest is `clean`.
    Exactly round(size * fraction) rows of each kind (largest remainders), chosen at random across tasks.
    Questions in `exclude` (e.g. the validation and test questions) never appear.
    """
    unknown = set(corruption) - set(CORRUPTION_KINDS)
    if unknown:
        raise ConfigError(f"unknown corruption kinds {sorted(unknown)}: use {CORRUPTION_KINDS}")
    total_rate = sum(corruption.values())
    if total_rate > 1 or any(v < 0 for v in corruption.values()):
        raise ConfigError(f"corruption fractions must be >= 0 and sum to <= 1, got {dict(corruption)}")
    if corruption.get("off_task") and len({family(t) for t in task_shares}) < 2:
        raise ConfigError("off_task corruption needs tasks from at least two families")
    exclude = set(exclude)
    per_task = allocate(size, task_shares)
    items = [it for task, n in per_task.items() for it in generate_items(task, count=n, seed=seed, exclude=exclude)]
    kinds = allocate(size, {**corruption, CLEAN: 1.0 - total_rate}) if size else {}
    rng = random.Random(seed * 7919 + 17)
    labels = [kind for kind, n in kinds.items() for _ in range(n)]
    rng.shuffle(labels)
    by_task: dict[str, list[TaskItem]] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    rows = []
    for item, label in zip(items, labels):
        if label == CLEAN:
            response = item.response
        else:
            donor = None
            if label == "off_task":
                other = rng.choice(sorted(t for t in by_task if family(t) != family(item.task)))
                donor = rng.choice(by_task[other])
            response = corrupt_response(item, label, rng, donor)
        messages = [{"role": "user", "content": item.question}, {"role": "assistant", "content": response}]
        rows.append({
            "id": row_id("pool", item.task, str(item.source_seed), str(item.source_index)),
            "messages": messages,
            "task": item.task,
            "corruption": label,
        })
    rng.shuffle(rows)
    return rows


def make_queries(
    task_counts: Mapping[str, int], *, seed: int, split: str, exclude: Iterable[str] = (),
    reference_styles: Sequence[str] = (),
) -> list[dict]:
    """Question/answer rows {id, question, answer, task} (the `qa` form), distinct and outside `exclude`.

    Each style in `reference_styles` (task_references.REFERENCE_STYLES) adds a column `reference_<style>`: the
    item's correct worked solution as that style's author writes it (off-policy targets for less / if)."""
    from drift_stream.embedded.task_references import (
        REFERENCE_STYLES,
        reference_solution,
    )

    unknown = sorted(set(reference_styles) - set(REFERENCE_STYLES))
    if unknown:
        raise ConfigError(f"unknown reference styles {unknown}: use {REFERENCE_STYLES}")
    exclude = set(exclude)
    rows = []
    for task, n in task_counts.items():
        for item in generate_items(task, count=n, seed=seed, split=split, exclude=exclude):
            exclude.add(item.question)
            rows.append({
                "id": row_id(split, item.task, str(item.source_seed), str(item.source_index)),
                "question": item.question,
                "answer": item.answer,
                "task": item.task,
                **{f"reference_{style}": reference_solution(item, style) for style in reference_styles},
            })
    return rows


def clean_rows(
    task_counts: Mapping[str, int], *, seed: int, split: str = "pool", exclude: Iterable[str] = ()
) -> list[dict]:
    """Clean SFT rows {id, messages, task, corruption='clean'}: the uncorrupted form of `make_sft_pool`."""
    exclude = set(exclude)
    rows = []
    for task, n in task_counts.items():
        for item in generate_items(task, count=n, seed=seed, split=split, exclude=exclude):
            rows.append({
                "id": row_id(split, item.task, str(item.source_seed), str(item.source_index)),
                "messages": [{"role": "user", "content": item.question},
                             {"role": "assistant", "content": item.response}],
                "task": item.task,
                "corruption": CLEAN,
            })
    return rows


# ---- a whole data recipe: pool + validation queries + test ------------------------------------------------------


@dataclass(frozen=True)
class DataRecipe:
    """Sizes, task mix and corruption of a pool / queries / test triple. Defaults: the shipped demo data."""

    seed: int = 0
    pool_size: int = 3000
    pool_tasks: Mapping[str, float] = field(default_factory=lambda: {
        "basic_arithmetic": 0.35, "chain_sum": 0.35, "gcd": 0.1, "products": 0.1, "leg_counting": 0.1})
    corruption: Mapping[str, float] = field(default_factory=lambda: {
        "wrong_answer": 0.10, "truncated": 0.04, "garbled": 0.05, "off_task": 0.05, "too_short": 0.03,
        "too_long": 0.03})
    queries: Mapping[str, int] = field(default_factory=lambda: {"basic_arithmetic": 64, "chain_sum": 64})
    test: Mapping[str, int] = field(default_factory=lambda: {
        "basic_arithmetic": 100, "chain_sum": 100, "gcd": 34, "products": 33, "leg_counting": 33})
    # held-out queries for choosing a setting (e.g. a benchmark's best variant) without looking at test; none by default
    dev: Mapping[str, int] = field(default_factory=dict)
    # reference solutions added to test / dev / query rows as `reference_<style>` columns (none in the demo data)
    reference_styles: tuple[str, ...] = ()

    def __post_init__(self):
        for name, mapping in (("pool_tasks", self.pool_tasks), ("queries", self.queries), ("test", self.test),
                              ("dev", self.dev)):
            for task in mapping:
                _spec(task)
            if any(v < 0 for v in mapping.values()):
                raise ConfigError(f"{name} values must be >= 0, got {dict(mapping)}")
        if self.pool_size < 0 or self.seed < 0:
            raise ConfigError(f"pool_size and seed must be >= 0, got {self.pool_size}, {self.seed}")


@dataclass(frozen=True)
class Splits:
    pool: list  # {id, messages, task, corruption}
    queries: list  # {id, question, answer, task}
    test: list  # {id, question, answer, task}
    dev: list = field(default_factory=list)  # {id, question, answer, task}; empty unless the recipe asks for it


def make_splits(recipe: DataRecipe = DataRecipe()) -> Splits:
    """Test first, then dev, then validation queries, then the pool, each excluding every question drawn before it."""
    styles = tuple(recipe.reference_styles)
    test = make_queries(recipe.test, seed=recipe.seed, split="test", reference_styles=styles)
    seen = {row["question"] for row in test}
    dev = make_queries(recipe.dev, seed=recipe.seed, split="dev", exclude=seen, reference_styles=styles)
    seen |= {row["question"] for row in dev}
    queries = make_queries(recipe.queries, seed=recipe.seed, split="queries", exclude=seen, reference_styles=styles)
    seen |= {row["question"] for row in queries}
    pool = make_sft_pool(recipe.pool_tasks, size=recipe.pool_size, corruption=recipe.corruption,
                         seed=recipe.seed, exclude=seen)
    return Splits(pool=pool, queries=queries, test=test, dev=dev)
