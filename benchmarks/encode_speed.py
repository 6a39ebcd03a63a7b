"""Encoding speed with loss masks against one render + tokenize, at 1, 4 and 16 assistant turns.

    python benchmarks/encode_speed.py [--families qwen3,llama3_1,r1_distill] [--rows 200] [--repeats 3]

For each family (real vocabularies and official templates, drift_stream.embedded.vocabs) and number of turns, the
same rows are encoded by `ChatTokenizer.encode` (render once, tokenize once with offsets, locate each assistant
turn) and by the baseline `tokenizer(apply_chat_template(messages, tokenize=False))`, alternating, best of
--repeats. Prints rows/s of both and their ratio (encode / baseline) from the same run.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

WORDS = ("the model adds seven to the sum of both numbers and then checks the result against the question again "
         "because a careful answer is better than a quick one so we write each step").split()


def make_rows(turns: int, rows: int, seed: int = 0) -> list[list[dict]]:
    """Conversations of `turns` user/assistant pairs, ~70 words per user turn and ~140 per assistant turn."""
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)) + "."

    out = []
    for _ in range(rows):
        messages = [{"role": "system", "content": "You are a careful assistant."}]
        for _ in range(turns):
            messages += [{"role": "user", "content": text(70)}, {"role": "assistant", "content": text(140)}]
        out.append(messages)
    return out


def bench(tok, rows, repeats: int) -> tuple[float, float, int]:
    from drift_stream.data.example_types import Example
    from drift_stream.data.tokenization import ChatTokenizer

    chat = ChatTokenizer(tok, max_tokens=1_000_000)
    examples = [Example(id=str(i), messages=tuple(m)) for i, m in enumerate(rows)]
    best_ours = best_base = float("inf")
    tokens = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in rows:
            tokens = len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
        best_base = min(best_base, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for ex in examples:
            chat.encode(ex)
        best_ours = min(best_ours, time.perf_counter() - t0)
    return len(rows) / best_ours, len(rows) / best_base, tokens


def main(argv=None) -> None:
    from drift_stream.embedded.vocabs import build_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default="qwen3,llama3_1,r1_distill")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab-cache", default=str(Path(tempfile.gettempdir()) / "drift-stream-vocabs-v1"))
    args = p.parse_args(argv)
    print("| family | assistant turns | tokens/row | encode rows/s | render+tokenize rows/s | ratio |")
    print("|---|---|---|---|---|---|")
    for family in args.families.split(","):
        tok = build_tokenizer(family, args.vocab_cache)
        for turns in (1, 4, 16):
            ours, base, tokens = bench(tok, make_rows(turns, args.rows), args.repeats)
            print(f"| {family} | {turns} | {tokens} | {ours:.1f} | {base:.1f} | {ours / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
