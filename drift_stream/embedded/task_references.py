"""Reference solutions of task items in more than one author's style (the off-policy targets of `less` / `if`).

The pool's rows, and therefore the base model's training data, use one template family (`tasks.format_response`:
`4*-2=-8, -3+-8=-11 #### -11`). A validation set written by other authors solves the same item correctly but in
its own words and layout. Styles (REFERENCE_STYLES):

  pool    the pool's own template: what the model was trained on (proximity gap below zero in the benchmark)
  prose   a second, independent family: one English sentence per step on its own line, operations named in words,
          a closing `Therefore the answer is $\\boxed{-11}$.` line (MATH-style), no `####` marker
  answer  the bare answer, as reasoning-gym ships it

Every step of a `prose` solution is the same arithmetic as the pool's worked steps, so both are correct; only
the phrasing and layout differ. `prose_answer` reads the final answer back (tests check it against the item).
"""

from __future__ import annotations

import re
from typing import Protocol

from drift_stream.errors import ConfigError


class TaskItem(Protocol):
    """What a reference reads of an item (tasks.TaskItem has these; declared here so the import goes one way)."""

    task: str
    answer: str
    response: str
    steps: tuple[str, ...]

REFERENCE_STYLES = ("pool", "prose", "answer")
_STEP = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def reference_solution(item: "TaskItem", style: str) -> str:
    """The item's correct solution in `style` (one of REFERENCE_STYLES); ConfigError for an unknown style."""
    if style == "pool":
        return item.response
    if style == "answer":
        return item.answer
    if style == "prose":
        return prose_response(item)
    raise ConfigError(f"unknown reference style {style!r}: use one of {REFERENCE_STYLES}")


def prose_answer(text: str | None) -> str | None:
    """The answer inside the last `\\boxed{...}` of a prose solution, stripped; None when there is none."""
    found = _BOXED.findall(text or "")
    return found[-1].strip() or None if found else None


def _binary_sentence(step: str) -> str | None:
    """`4*-2=-8` -> `multiply 4 by -2, which gives -8`; None for a step that is not one binary operation."""
    m = _STEP.match(step)
    if m is None:
        return None
    left, op, right, value = m.groups()
    if op == "+":
        return f"add {left} and {right} to get {value}"
    if op == "-":
        return f"subtract {right} from {left}, which leaves {value}"
    return f"multiply {left} by {right}, which gives {value}"


def _lines(sentences: list[str]) -> list[str]:
    """`First, ...` / `Next, ...` / `Then, ...` / `Finally, ...`: one sentence per line."""
    out = []
    for i, s in enumerate(sentences):
        word = "To solve it" if len(sentences) == 1 else "First" if i == 0 else "Finally" if i == len(sentences) - 1 else ("Next", "Then")[i % 2 - 1]
        out.append(f"{word}, {s}.")
    return out


def prose_response(item: "TaskItem") -> str:
    """The `prose` style: a sentence per step, one per line, then `Therefore the answer is $\\boxed{A}$.`"""
    task, steps = item.task, list(item.steps)
    if task in ("basic_arithmetic", "chain_sum", "products", "leg_counting"):
        # a lone number such as "((-8))=-8" has no binary step: _other_sentence words it
        body = _lines(_leg_sentences(steps) if task == "leg_counting" else [_other_sentence(s) for s in steps])
    elif task == "gcd":
        body = _gcd_lines(steps[0])
    else:
        raise ConfigError(f"no prose form for task {task!r}")
    return "\n".join(body + [f"Therefore the answer is $\\boxed{{{item.answer}}}$."])


def _other_sentence(step: str) -> str:
    sentence = _binary_sentence(step)
    if sentence is not None:
        return sentence
    lhs, _, value = step.rpartition("=")
    if "+" in lhs and all(p.lstrip("-").isdigit() for p in lhs.split("+")):
        return f"add up {', '.join(lhs.split('+'))} to get {value}"
    return f"the expression {lhs} simplifies to {value}"


def _leg_sentences(steps: list[str]) -> list[str]:
    """`5*10=50` -> `5 animals with 10 legs each have 50 legs`; the last `50+8=58` -> `in total ... 58`."""
    out = []
    for step in steps:
        lhs, _, value = step.rpartition("=")
        if "*" in lhs:
            count, legs = lhs.split("*")
            out.append(f"{count} animal{'s' if count != '1' else ''} with {legs} legs each have {value} legs")
        else:
            out.append(f"adding {' and '.join(lhs.split('+'))} gives {value} legs in total")
    return out


def _gcd_lines(chain: str) -> list[str]:
    """`gcd(44,38)=gcd(38,6)=gcd(6,2)=gcd(2,0)=2` -> Euclid's algorithm in words, one division per line."""
    pairs = [tuple(int(x) for x in p[4:-1].split(",")) for p in chain.split("=")[:-1]]
    lines = ["Use Euclid's algorithm: replace the pair by the smaller number and the remainder."]
    for a, b in pairs[:-1]:
        lines.append(f"{a} divided by {b} leaves remainder {a % b}.")
    last = pairs[-1][0]
    lines.append(f"The remainder is now 0, so the last divisor, {last}, is the greatest common divisor.")
    return lines
