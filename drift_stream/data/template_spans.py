"""Where each assistant turn lies in one rendered conversation (character spans), for loss masks.

The rule (ChatTokenizer uses it for every chat template): the loss span of assistant turn i starts where the
generation prompt ends (what `encode_prompt(messages[:i])` ends with: the assistant header plus any prefill such as
Qwen3.6's and DeepSeek-R1's "<think>\\n"), and ends after the first end-of-turn token that follows the turn's last
piece of text (its answer, or its last tool call's name). So a rollout (prompt + completion) and the same
conversation given as a pool row put the same tokens in the loss.

Found in one forward pass over the text (cost linear in its length and the number of turns):
- user and tool turns move a cursor past their content (system turns are skipped: templates move them, Mistral into
  the last user turn, Gemma into the first);
- (a template without a generation prompt, e.g. Mistral's: the turn starts after the special token that closes the
  previous message, so what the model must write itself, such as [TOOL_CALLS], is in the loss);
- for an assistant turn, its answer (or first tool-call name) is found after the cursor; the header is the last
  occurrence, before it, of the generation prompt `gen_suffix` or of its longest prefix ending at a cut point (an
  earlier turn of Qwen3.6 renders "<|im_start|>assistant\\n" without the "<think>\\n" prefill);
- reasoning (inline <think>...</think> or `reasoning_content`) counts as kept when it is found after the header with
  no end-of-turn token in between; otherwise the template dropped it (Qwen3 and R1 drop it from earlier turns).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from drift_stream.data.example_types import RowError

# End-of-turn tokens of common chat formats (ChatML, Llama 3, Phi-3, GPT-OSS, Gemma, DeepSeek, Mistral/Llama 2).
END_OF_TURN_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>",
)


@dataclass(frozen=True)
class TurnSpans:
    spans: list[tuple[int, int]]  # one [start, end) character span per assistant turn, in order
    reasoning_dropped: int  # assistant turns whose reasoning the rendered text does not contain


def split_reasoning(message: Mapping[str, Any]) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: `reasoning_content`, else inline <think>...</think>."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:
        head, answer = content.split("</think>", 1)
        return head.split("<think>")[-1], answer
    return "", content


def tool_call_names(message: Mapping[str, Any]) -> list[str]:
    names = []
    for call in message.get("tool_calls") or ():
        fn = call.get("function", call) if isinstance(call, Mapping) else {}
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names


def cut_points(gen_suffix: str, special_texts: Sequence[str], user_header: str = "") -> list[int]:
    """Lengths k at which gen_suffix[:k] may end a header: after a special token, after a newline, or the whole;
    not where gen_suffix[:k] also occurs in a user turn's header (Qwen's bare "<|im_start|>")."""
    cuts = {len(gen_suffix)}
    for i, ch in enumerate(gen_suffix):
        if ch == "\n":
            cuts.add(i + 1)
    for special in special_texts:
        start = gen_suffix.find(special)
        while start >= 0:
            cuts.add(start + len(special))
            start = gen_suffix.find(special, start + 1)
    kept = sorted((k for k in cuts if k > 0 and (k == len(gen_suffix) or gen_suffix[:k] not in user_header)),
                  reverse=True)
    return kept


def locate_assistant_turns(
    text: str, messages: Sequence[Mapping[str, Any]], gen_suffix: str, cuts: Sequence[int], stop_texts: Sequence[str],
    special_ends: Sequence[int] = (),
) -> TurnSpans:
    """Character spans of the assistant turns of `messages` in `text` (their rendering). Raises RowError naming the
    turn when one cannot be located. Without a generation prompt (Mistral) a turn starts after the first special
    token that follows the previous message's text (`special_ends`: sorted character ends of the special tokens,
    e.g. "[/INST]"): what the model is given before it writes the turn; else at its text."""
    spans: list[tuple[int, int]] = []
    dropped = 0
    cursor = 0
    turn = -1
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            continue
        if role != "assistant":
            needle = (message.get("content") or "").strip()
            found = text.find(needle, cursor) if needle else -1
            if found >= 0:
                cursor = found + len(needle)
            continue
        turn += 1
        reasoning, answer = (part.strip() for part in split_reasoning(message))
        names = tool_call_names(message)
        first = answer or (names[0] if names else "")
        if not first:
            raise RowError(f"template_span:assistant turn {turn} (message {index}) has no text and no tool call")
        start, at = None, text.find(first, cursor)
        if at < 0:
            raise RowError(f"template_span:assistant turn {turn} (message {index}): its text is not in the "
                           "rendered conversation")
        for _ in range(16):  # an occurrence inside the header itself ("ant" in "assistant") is skipped
            start = _header_end(text, cursor, at, gen_suffix, cuts, special_ends)
            if start is not None or at < 0:
                break
            at = text.find(first, at + 1)
        if start is None:
            raise RowError(f"template_span:assistant turn {turn} (message {index}): no assistant header "
                           f"{gen_suffix!r} before it in the rendered conversation")
        pos = start
        if reasoning:
            r = text.find(reasoning, start)
            if r >= 0 and _first_stop(text, start, stop_texts, limit=r) is None:
                pos = r + len(reasoning)
            else:
                dropped += 1
        for needle in ([answer] if answer else []) + names:
            found = text.find(needle, pos)
            if found < 0:
                raise RowError(f"template_span:assistant turn {turn} (message {index}): {needle[:40]!r} is not in "
                               "the rendered conversation after its header")
            pos = found + len(needle)
        # the end-of-turn token must come before the next message's text (R1 writes none after a single tool call)
        limit = _next_text(text, messages, index + 1, pos)
        stop = _first_stop(text, pos, stop_texts, limit=limit)
        end = pos if stop is None else stop[1]
        spans.append((start, end))
        cursor = end
    return TurnSpans(spans=spans, reasoning_dropped=dropped)


def _next_text(text: str, messages: Sequence[Mapping[str, Any]], start: int, pos: int) -> int | None:
    """Where the next user/tool/assistant message's text begins (after pos), or None."""
    for message in messages[start:]:
        if message.get("role") == "system":
            continue
        needle = split_reasoning(message)[1].strip() if message.get("role") == "assistant" else \
            (message.get("content") or "").strip()
        found = text.find(needle, pos) if needle else -1
        return found if found >= 0 else None
    return None


def _header_end(text: str, lo: int, hi: int, gen_suffix: str, cuts: Sequence[int],
                special_ends: Sequence[int]) -> int | None:
    if not gen_suffix:  # no generation prompt (Mistral): after the first special token after the previous text
        k = bisect.bisect_left(special_ends, lo + 1)
        return special_ends[k] if k < len(special_ends) and special_ends[k] <= hi else hi
    if hi < 0:
        return None
    for k in cuts:
        found = text.rfind(gen_suffix[:k], lo, hi)
        if found >= 0:
            # the longest cut of gen_suffix matching here must also end by hi, else hi lies inside the header
            longest = next(c for c in cuts if text.startswith(gen_suffix[:c], found))
            return found + longest if found + longest <= hi else None
    return None


def _first_stop(text: str, pos: int, stop_texts: Sequence[str], limit: int | None = None):
    """(start, end) of the first stop text at or after pos (and before limit), else None."""
    best = None
    for stop in stop_texts:
        found = text.find(stop, pos, len(text) if limit is None else limit)
        if found >= 0 and (best is None or found < best[0]):
            best = (found, found + len(stop))
    return best


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range overlaps a span (a token straddling a span's edge counts, as in
    HF's `return_assistant_tokens_mask`); spans sorted and disjoint. Cost O(tokens + spans)."""
    return [int(k >= 0) for k in token_turns(offsets, spans)]


def token_turns(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the index of the span its character range overlaps (or, empty, lies inside), -1 for none;
    spans sorted and disjoint. Cost O(tokens + spans)."""
    turns = [-1] * len(offsets)
    j = 0
    for i, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j == len(spans):
            break
        lo, hi = spans[j]
        if (e > lo and s < hi) or (s == e and lo <= s < hi):
            turns[i] = j
    return turns
