"""The real model's task set (issue 25): tasks, prompt format, verifier, and a pool with corruption in its chat format.

Chosen by the measured pass-rate sweep (benchmarks/results/real/sweep.md) of SmolLM2-135M-Instruct: the target is
reasoning-gym `basic_arithmetic` with two one-digit terms and + - * (greedy 0.62 by the last number, 58% of queries
mixed at K = 4, T = 0.7); the non-target tasks, whose accuracy must not fall, are one-digit `chain_sum` (two terms)
and `gcd` of two numbers <= 20. Nothing else the sweep tried is above zero for this model.

Prompt format: the model's own ChatML template with its default system prompt (the template inserts it), the
question, and one instruction line asking for a final line `Answer: <number>`; zero-shot (few-shot prompts collapse
this model to a constant answer). Verifier: the library's `numeric` (the marked `Answer: x`, else the last number of
the reply), so a correct answer in an unmarked reply still counts; `strict_correct` reads the marked answer only.

Each task has a small question space (360 / 200 / 364 distinct questions), so the splits are disjoint *by question*:
every distinct question is assigned to one split (train = warm-up + pool, queries, dev, test) by a seeded shuffle.
The pool and warm-up split share the train questions (the pool is what the base was trained on, DESIGN.md 7); held-out
evaluation never sees a train question.

Pool rows are `messages` rows in the model's chat format with a `kind` column: `clean` (a short worked response
ending in `Answer: x`, several phrasings) or a corruption: `wrong_answer` (the work and the final answer both wrong,
consistently), `copied` (another question's clean response), `truncated` (a clean response cut before its answer),
`off_task` (an unrelated assistant reply), `garbled` (characters scrambled). Corrupted rows are `corrupted_share` of
the pool, split evenly among the kinds.

Needs `reasoning-gym` (pip install drift-stream[gym]), imported on first use.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from drift_stream.errors import ConfigError

INSTRUCTION = "End your reply with a last line of the form 'Answer: <number>'."
VERIFIER = "numeric"  # the marked answer, else the last number (drift_stream/rollouts/verifiers.py)

TASKS: dict[str, tuple[str, dict]] = {
    "arith1": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                    "operators": ("+", "-", "*"), "allow_parentheses": False,
                                    "allow_negation": False}),
    "add1": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "gcd20": ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20}),
}
TARGET = ("arith1",)
NONTARGET = ("add1", "gcd20")
CLEAN = "clean"
CORRUPTION_KINDS = ("wrong_answer", "copied", "truncated", "off_task", "garbled")

_OFF_TASK = (
    "Sure! Here is a short poem about the sea:\nWaves roll in and out,\nthe tide keeps its own time.",
    "I'm sorry, but I can't help with that request.",
    "Great question! Many people enjoy hiking in the mountains during the summer months.",
    "The capital of France is Paris, a city famous for the Eiffel Tower.",
    "As an AI assistant, I don't have personal opinions, but I'm happy to chat about movies.",
    "Here are three tips for better sleep: keep a regular schedule, avoid screens, and exercise.",
    "Photosynthesis is the process plants use to turn sunlight into chemical energy.",
    "Thank you for reaching out! Let me know if there is anything else I can do for you.",
)


@dataclass(frozen=True)
class RealTaskRecipe:
    """Sizes of every split. Question shares: the fraction of each task's distinct questions given to each
    held-out split (the rest are train questions, shared by the warm-up split and the pool)."""

    seed: int = 0
    pool_size: int = 3000
    warmup_size: int = 400
    target_share: float = 0.5  # of the pool and warm-up rows: target-task rows (the rest split over non-targets)
    corrupted_share: float = 0.4
    queries: int = 64  # validation queries (target task)
    dev: Mapping[str, int] = field(default_factory=lambda: {"arith1": 40, "add1": 24, "gcd20": 24})
    test: Mapping[str, int] = field(default_factory=lambda: {"arith1": 76, "add1": 40, "gcd20": 40})

    def __post_init__(self):
        if not 0 <= self.corrupted_share < 1 or not 0 < self.target_share <= 1:
            raise ConfigError(f"corrupted_share must be in [0, 1) and target_share in (0, 1], got "
                              f"{self.corrupted_share} / {self.target_share}")
        if self.pool_size < 1 or self.warmup_size < 0 or self.queries < 1:
            raise ConfigError(f"pool_size and queries must be >= 1, warmup_size >= 0: got {self.pool_size}, "
                              f"{self.queries}, {self.warmup_size}")


@dataclass
class RealSplits:
    pool: list[dict]  # id, messages, task, kind, answer
    warmup: list[dict]  # clean messages rows on train questions
    queries: list[dict]  # qa rows: id, question, answer, task, reference_prose
    dev: list[dict]  # qa rows
    test: list[dict]  # qa rows
    questions: dict[str, dict[str, int]]  # task -> split -> distinct questions


# ---------------------------------------------------------------------------------------------------- items


def task_items(task: str) -> list[dict]:
    """Every distinct question of a task (reasoning-gym items, deduplicated by question, in a fixed order)."""
    import reasoning_gym

    if task not in TASKS:
        raise ConfigError(f"unknown real task {task!r}; known: {', '.join(TASKS)}")
    name, config = TASKS[task]
    dataset = reasoning_gym.create_dataset(name, seed=12345, size=6000, **config)
    seen: dict[str, dict] = {}
    for entry in dataset:
        q = entry["question"].strip()
        if q not in seen:
            seen[q] = {"question": q, "answer": str(entry["answer"]).strip(), "task": task,
                       "operands": _operands(task, entry)}
    return [seen[q] for q in sorted(seen)]


def _operands(task: str, entry: Mapping[str, Any]) -> tuple:
    meta = entry.get("metadata") or {}
    if task == "gcd20":
        return tuple(int(x) for x in meta["numbers"])
    expr = meta.get("expression") or entry["question"].split(":")[-1].rstrip("=").strip().rstrip(".")
    return tuple(expr.replace("Calculate", "").strip().rstrip(".").split())


def prompt_text(question: str) -> str:
    """The user turn: the question and the answer-line instruction (the template adds the system prompt)."""
    return f"{question.strip()}\n{INSTRUCTION}"


def _expr(item) -> str:
    return " ".join(item["operands"]) if item["task"] != "gcd20" else ", ".join(map(str, item["operands"]))


def clean_response(item: Mapping[str, Any], rng: random.Random, answer: str | None = None) -> str:
    """A short worked response ending in `Answer: x` (one of a few phrasings); `answer` overrides the result."""
    ans = item["answer"] if answer is None else answer
    if item["task"] == "gcd20":
        a, b = item["operands"]
        return rng.choice((
            f"The greatest common divisor of {a} and {b} is {ans}.\nAnswer: {ans}",
            f"{ans} is the largest number that divides both {a} and {b}.\nAnswer: {ans}",
            f"We need the largest number dividing {a} and {b}. That is {ans}.\nAnswer: {ans}",
        ))
    e = _expr(item)
    return rng.choice((
        f"{e} = {ans}\nAnswer: {ans}",
        f"Let's compute: {e} = {ans}.\nAnswer: {ans}",
        f"To calculate {e}, we work it out step by step: the result is {ans}.\nAnswer: {ans}",
        f"The result of {e} is {ans}.\nAnswer: {ans}",
    ))


def prose_reference(item: Mapping[str, Any]) -> str:
    """A reference solution written by another author (the off-policy baselines' targets): prose, no answer line."""
    ans = item["answer"]
    if item["task"] == "gcd20":
        a, b = item["operands"]
        return f"Listing the divisors of {a} and of {b} and keeping those they share, the biggest one is {ans}."
    return f"Working through the expression {_expr(item)} carefully, one arrives at the value {ans}."


def _wrong(ans: str, rng: random.Random) -> str:
    v = int(ans)
    return str(v + rng.choice((-3, -2, -1, 1, 2, 3)))


def _garble(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(max(4, len(chars) // 3)):
        i, j = rng.randrange(len(chars)), rng.randrange(len(chars))
        chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def corrupt_response(kind: str, item: Mapping[str, Any], donor: Mapping[str, Any], rng: random.Random) -> str:
    if kind == "wrong_answer":
        return clean_response(item, rng, answer=_wrong(item["answer"], rng))
    if kind == "copied":
        return clean_response(donor, rng)
    if kind == "truncated":
        text = clean_response(item, rng).split("\nAnswer:")[0]
        return text[: max(3, int(len(text) * rng.uniform(0.3, 0.7)))]
    if kind == "off_task":
        return rng.choice(_OFF_TASK)
    if kind == "garbled":
        return _garble(clean_response(item, rng), rng)
    raise ConfigError(f"unknown corruption kind {kind!r}: use one of {CORRUPTION_KINDS}")


def _row(rid: str, item, response: str, kind: str) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": prompt_text(item["question"])},
                                    {"role": "assistant", "content": response}],
            "task": item["task"], "kind": kind, "answer": item["answer"]}


def qa_row(rid: str, item) -> dict:
    """A validation / evaluation row for the `qa` adapter: the prompt (instruction included) and the answer."""
    return {"id": rid, "question": prompt_text(item["question"]), "answer": item["answer"], "task": item["task"],
            "reference_prose": prose_reference(item), "reference_pool": clean_response(item, random.Random(rid))}


def _counts(total: int, recipe: RealTaskRecipe) -> dict[str, int]:
    target = round(total * recipe.target_share)
    rest = total - target
    out = {TARGET[0]: target}
    for i, t in enumerate(NONTARGET):
        out[t] = rest // len(NONTARGET) + (1 if i < rest % len(NONTARGET) else 0)
    return out


def make_real_splits(recipe: RealTaskRecipe = RealTaskRecipe()) -> RealSplits:
    """Pool, warm-up, validation queries, dev and test, disjoint by question (see the module docstring)."""
    rng = random.Random(recipe.seed)
    held: dict[str, dict[str, list]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for task in TASKS:
        items = task_items(task)
        random.Random(f"{recipe.seed}:{task}").shuffle(items)
        wanted = {"queries": recipe.queries if task in TARGET else 0, "dev": recipe.dev.get(task, 0),
                  "test": recipe.test.get(task, 0)}
        if sum(wanted.values()) > len(items) // 2:
            raise ConfigError(f"{task} has {len(items)} distinct questions; held-out splits ask {wanted}: "
                              "keep them to half of it so the pool keeps train questions")
        parts, lo = {}, 0
        for name, n in wanted.items():
            parts[name], lo = items[lo: lo + n], lo + n
        parts["train"] = items[lo:]
        held[task] = parts
        sizes[task] = {k: len(v) for k, v in parts.items()}

    def draw(total: int, prefix: str, corrupted: float) -> list[dict]:
        rows = []
        for task, n in _counts(total, recipe).items():
            train = held[task]["train"]
            n_bad = round(n * corrupted)
            kinds = [CORRUPTION_KINDS[i % len(CORRUPTION_KINDS)] for i in range(n_bad)] + [CLEAN] * (n - n_bad)
            rng.shuffle(kinds)
            for i, kind in enumerate(kinds):
                item = train[(i * 7919 + rng.randrange(len(train))) % len(train)]
                donor = train[rng.randrange(len(train))]
                while donor["question"] == item["question"] and len(train) > 1:
                    donor = train[rng.randrange(len(train))]
                resp = clean_response(item, rng) if kind == CLEAN else corrupt_response(kind, item, donor, rng)
                rows.append(_row(f"{prefix}-{task}-{i:05d}", item, resp, kind))
        rng.shuffle(rows)
        return rows

    pool = draw(recipe.pool_size, "pool", recipe.corrupted_share)
    warmup = draw(recipe.warmup_size, "warm", 0.0)
    split = {name: [qa_row(f"{name}-{t}-{i:04d}", it) for t in TASKS for i, it in enumerate(held[t][name])]
             for name in ("queries", "dev", "test")}
    return RealSplits(pool=pool, warmup=warmup, queries=split["queries"], dev=split["dev"], test=split["test"],
                      questions=sizes)


# ---------------------------------------------------------------------------------------------------- scoring


def score_response(response: str, row: Mapping[str, Any]) -> float:
    """The `numeric` verifier's reward of a reply to a qa row (marked answer, else the last number)."""
    from drift_stream.rollouts.engine import Query
    from drift_stream.rollouts.verifiers import load_verifier

    query = Query(id=str(row.get("id", "q")), messages=({"role": "user", "content": str(row["question"])},),
                  answer=str(row["answer"]))
    return float(load_verifier(VERIFIER).score(response, query))


def strict_correct(response: str, row: Mapping[str, Any]) -> bool:
    """Whether the reply marks the right answer (`Answer: x`, the pool's format); no fallback to the last number."""
    from drift_stream.data.answers import extract_answer
    from drift_stream.rollouts.verifiers import parse_number

    got = extract_answer(response)
    value = parse_number(got) if got is not None else None
    return value is not None and value == parse_number(str(row["answer"]))


def kind_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["kind"]] = out.get(r["kind"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != CLEAN, kv[0])))
