"""Conversation shapes and an independent mask oracle for tests/test_templates.py (and its results table).

The oracle does not use drift_stream.data.template_spans. For assistant turn i of a conversation rendered as R:
- start: the end of the rendered generation prompt of messages[:i] (a quadratic prefix render) when it is a prefix
  of R; else the same without the system message (Mistral moves it into the last user turn); else the longest common
  prefix of the two (the template renders the turn differently once it is not last: Qwen3.6 and R1 drop the
  "<think>\\n" prefill from earlier turns);
- end: the end of the first end-of-turn token of the family (END_OF_TURN below) after the turn's last text;
- a token is expected in the loss when its character range overlaps [start, end).
`hf_generation_mask` adds HF's own `return_assistant_tokens_mask` (for the {% generation %} training templates),
adjusted by two documented rules: tokens of the generation prompt are prompt, not target (a rollout's prompt holds
them), and the template's text after the end-of-turn token (Qwen's "\\n", Phi's EOS) is not target.
"""

from __future__ import annotations

import copy

END_OF_TURN = {
    "qwen2_5": ("<|im_end|>",), "qwen3": ("<|im_end|>",), "qwen3_6": ("<|im_end|>",), "llama3_1": ("<|eot_id|>",),
    "mistral_v3": ("</s>",), "r1_distill": ("<｜end▁of▁sentence｜>",), "phi3_5": ("<|end|>",),
    "gemma3": ("<end_of_turn>",), "gptoss": ("<|return|>", "<|end|>", "<|call|>"),
}

_CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def _u(text):
    return {"role": "user", "content": text}


def _a(text, **extra):
    return {"role": "assistant", "content": text, **extra}


SHAPES = {
    "system+3 turns": [{"role": "system", "content": "You are terse."}, _u("What is 2+3?"), _a("It is 5."),
                       _u("Times 4?"), _a("That makes 20."), _u("Minus 1?"), _a("Nineteen.")],
    "no system": [_u("Name a colour."), _a("Blue."), _u("Another?"), _a("Green.")],
    "empty system": [{"role": "system", "content": ""}, _u("Name a fruit."), _a("Apple."), _u("Another?"),
                     _a("Pear.")],
    "one turn": [_u("Say hi."), _a("Hi there!")],
    "reasoning last": [_u("What is 6*7?"), _a("42."), _u("And 6*8?"),
                       _a("<think>\nSix eights: add 6 to 42.\n</think>\n\nForty-eight.")],
    "reasoning every": [_u("What is 6*7?"), _a("Forty-two.", reasoning_content="Six sevens are forty-two."),
                        _u("And 6*8?"), _a("<think>\nAdd six to the last.\n</think>\n\nForty-eight.")],
    "content starts \\n": [_u("List two."), _a("\nOne\nTwo"), _u("More?"), _a("\n\nThree")],
    "unicode": [_u("Grüße! Was ist 数学? ∑"), _a("Mathematik 👋 — ça va ∑ x²"), _u("Ελληνικά;"), _a("Ναι, ευχαριστώ.")],
    "texts inside headers": [_u("user"), _a("assistant"), _u("a"), _a("a")],
    "tool call+result": [_u("Weather in Paris?"), _a(None, tool_calls=[_CALL]),
                         {"role": "tool", "content": "18 C and sunny", "tool_call_id": "call00001", "name": "get_weather"},
                         _a("It is 18 C and sunny in Paris.")],
}


def render(tok, messages, generation_prompt):
    return tok.apply_chat_template(copy.deepcopy(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _last_text(message):
    content = message.get("content") or ""
    answer = content.split("</think>")[-1].strip()
    if answer:
        return answer
    return message["tool_calls"][-1]["function"]["name"]


def turn_bounds(tok, messages, family):
    """[(start, end)] character bounds of each assistant turn in render(messages), by the prefix-render rule."""
    text = render(tok, messages, False)
    no_system = [m for m in messages if m["role"] != "system"]
    bounds = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tok, messages[:i], True)
        if not text.startswith(prompt):
            j = no_system.index(m)
            alt = render(tok, no_system[:j], True)
            if text.startswith(alt):
                prompt = alt
            else:
                common = 0
                while common < min(len(prompt), len(text)) and prompt[common] == text[common]:
                    common += 1
                prompt = prompt[:common]
        start = len(prompt)
        last = _last_text(m)
        at = text.index(last, start) + len(last)
        following = [x for x in messages[i + 1:] if x["role"] != "system"]
        limit = text.find(_last_text(following[0]) if following[0]["role"] == "assistant" else
                          following[0]["content"].strip(), at) if following else len(text)
        limit = len(text) if limit < 0 else limit
        ends = [text.index(e, at) + len(e) for e in END_OF_TURN[family] if e in text[at:limit]]
        bounds.append((start, min(ends, default=at)))
    return text, bounds


def expected_mask(tok, messages, family):
    """(input_ids, mask) by the prefix-render rule."""
    text, bounds = turn_bounds(tok, messages, family)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(e > lo and s < hi for lo, hi in bounds)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def hf_generation_mask(tok, messages, family):
    """HF's assistant-token mask of a {% generation %} template, less generation-prompt tokens and tokens after the
    end of turn (see the module docstring)."""
    out = tok.apply_chat_template(copy.deepcopy(messages), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, add_generation_prompt=False)
    text, bounds = turn_bounds(tok, messages, family)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == list(out["input_ids"])
    mask = list(out["assistant_masks"])
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if mask[t]:
            turn = next((i for i, (_, hi) in enumerate(bounds) if s < hi), None)
            if turn is None or e <= bounds[turn][0]:
                mask[t] = 0
    return list(out["input_ids"]), mask
