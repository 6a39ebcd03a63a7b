"""THE answer extractor: the final answer a completion (or a reference) marks, as text.

Forms, tried in this order; within a form the last occurrence wins:
  answer_tag   <answer>x</answer>
  boxed        \\boxed{x} / \\fbox{x} (braces balanced)
  hashes       #### x            (the rest of the line after the last `####`)
  answer_is    Answer: x / The final answer is x.
Verifiers read every form; the benchmark's task pool (tasks.py) writes and reads `#### x` only, so its extractor is
`extract_answer(text, forms=("hashes",))`: the same code, restricted.
"""

from __future__ import annotations

import re

FORMS = ("answer_tag", "boxed", "hashes", "answer_is")
HASHES = "####"
_ANSWER_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*([^\n]*)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i].strip()
    return None


def _after_last_hashes(text: str) -> str | None:
    if HASHES not in text:
        return None
    return text.rsplit(HASHES, 1)[1].split("\n", 1)[0].strip()


def extract_answer(text: str | None, forms: tuple[str, ...] = FORMS) -> str | None:
    """The marked answer of `text` by the first of `forms` present (see the module docstring), stripped.

    None when `text` is empty or marks no answer in those forms; an empty marked answer (`#### ` alone) is None too.
    Raises ValueError for an unknown form name.
    """
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ValueError(f"unknown answer forms {unknown}: use some of {FORMS}")
    if not text:
        return None
    for form in forms:
        if form == "answer_tag":
            found = _ANSWER_TAG_RE.findall(text)
            answer = found[-1].strip() if found else None
        elif form == "boxed":
            answer = last_boxed(text)
        elif form == "hashes":
            answer = _after_last_hashes(text)
        else:
            found = _ANSWER_IS_RE.findall(text)
            answer = found[-1].strip().rstrip(".").strip() if found else None
        if answer is not None:
            return answer or None
    return None
