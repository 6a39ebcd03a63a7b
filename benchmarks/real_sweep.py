"""Pass-rate sweep of a real pretrained model over reasoning-gym tasks and prompt formats (issue 25, step 1).

For each (task, prompt format) cell: N items, one greedy completion and K samples at temperature T, scored by the
reasoning-gym dataset's own `score_answer` on the answer a verifier would read (the `<answer>` tag, else the last
`Answer: x`, else the whole completion stripped: the same rule as drift-stream's `reasoning_gym` verifier).
Reports per cell: greedy pass rate, sampled pass rate, the share of items whose K samples disagree (mixed: neither all
right nor all wrong; only those give DRIFT a contrast), the share of generations cut at max_new_tokens, seconds.

    python benchmarks/real_sweep.py                       # the full sweep (about 30 min on one CPU thread)
    python benchmarks/real_sweep.py --tasks chain_sum --formats zs --n 8    # a timing probe

Writes benchmarks/results/real/sweep.json (after every cell, so a killed run keeps what it measured) and sweep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

# Easy configs: SmolLM2-135M-Instruct is weak (two-number addition up to 60 at T=0.7: pass 0.07 in issue 25).
TASKS: dict[str, tuple[str, dict]] = {
    "add1": ("chain_sum", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)),
    "add2": ("chain_sum", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)),
    "arith1": (
        "basic_arithmetic",
        dict(
            min_terms=2,
            max_terms=2,
            min_digits=1,
            max_digits=1,
            operators=("+", "-", "*"),
            allow_parentheses=False,
            allow_negation=False,
        ),
    ),
    "legs": ("leg_counting", dict(min_animals=1, max_animals=2, min_instances=1, max_instances=3)),
    "letters": ("letter_counting", dict(min_words=3, max_words=6)),
    "bits": ("count_bits", dict(min_n=1, max_n=255)),
    "equations": (
        "simple_equations",
        dict(min_terms=2, max_terms=2, min_value=1, max_value=10, operators=("+", "-"), operators_weights=(0.5, 0.5)),
    ),
    # first configs, kept for their cells: most answers are "1" / "2", so a constant answer scores 0.75 / 0.58
    "letters_1to3w": ("letter_counting", dict(min_words=1, max_words=3)),
    "bits_le15": ("count_bits", dict(min_n=1, max_n=15)),
    "gcd": ("gcd", dict(min_numbers=2, max_numbers=2, min_value=1, max_value=20)),
    "backward": ("spell_backward", dict(min_word_len=3, max_word_len=5)),
}

INSTRUCTION = "End your reply with a last line of the form 'Answer: <value>'."
N_SHOTS = 3


def build_messages(fmt: str, question: str, shots: list[dict]) -> list[dict]:
    """Chat messages for one prompt format.

    zs        default system prompt (the template inserts it), the question and the answer-line instruction
    zs_nosys  the same with an empty system message
    fs        default system prompt; 3 solved examples ("Question: ...\\nAnswer: ...") in the user turn, then the question
    fs_nosys  the same with an empty system message
    fs_turns  default system prompt; the 3 examples as earlier user/assistant turns (assistant: "Answer: x")
    """
    q = question.strip()
    if fmt in ("zs", "zs_nosys"):
        msgs = [{"role": "user", "content": f"{q}\n{INSTRUCTION}"}]
    elif fmt in ("fs", "fs_nosys"):
        ex = "\n\n".join(f"Question: {s['question'].strip()}\nAnswer: {s['answer']}" for s in shots)
        msgs = [
            {
                "role": "user",
                "content": f"Answer the last question like the examples. {INSTRUCTION}\n\n{ex}\n\nQuestion: {q}",
            }
        ]
    elif fmt == "fs_turns":
        msgs = []
        for s in shots:
            msgs.append({"role": "user", "content": f"{s['question'].strip()}\n{INSTRUCTION}"})
            msgs.append({"role": "assistant", "content": f"Answer: {s['answer']}"})
        msgs.append({"role": "user", "content": f"{q}\n{INSTRUCTION}"})
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if fmt.endswith("_nosys"):
        msgs = [{"role": "system", "content": ""}] + msgs
    return msgs


FORMATS = ("zs", "zs_nosys", "fs", "fs_nosys", "fs_turns")

_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*([^\n]*)", re.IGNORECASE)


def verifier_answer(text: str) -> str:
    """The answer the `reasoning_gym` verifier reads: <answer> tag, else the last `Answer: x`, else the whole text."""
    found = _TAG.findall(text)
    if found:
        return found[-1].strip()
    found = _IS.findall(text)
    if found:
        return found[-1].strip().rstrip(".").strip().strip("*`").strip()
    return text.strip()


_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]+")


def lenient_answer(text: str) -> str:
    """The verifier's answer when the text marks one; else its last number, else its last word (ability, not format)."""
    if _TAG.search(text) or _IS.search(text):
        return verifier_answer(text)
    found = _NUM.findall(text) or _WORD.findall(text)
    return found[-1] if found else text.strip()


def score(ds, entry, text: str, lenient: bool = False) -> bool:
    try:
        answer = lenient_answer(text) if lenient else verifier_answer(text)
        return float(ds.score_answer(answer, entry)) >= 0.999
    except Exception:  # noqa: BLE001 - a scorer crashing on odd text is a wrong answer
        return False


@torch.no_grad()
def generate(
    model, tok, prompts: list[str], *, n_return: int, sample: bool, temperature: float, max_new: int, batch_seqs: int
) -> list[tuple[str, bool]]:
    """(text, truncated) per prompt x n_return (prompt-major), batched with left padding."""
    eos = model.generation_config.eos_token_id
    out: list[tuple[str, bool]] = []
    per = max(1, batch_seqs // n_return)
    for i in range(0, len(prompts), per):
        enc = tok(prompts[i : i + per], return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new,
            num_return_sequences=n_return,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
            **kw,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        for row in new:
            ids = row.tolist()
            finished = eos in ids
            if finished:
                ids = ids[: ids.index(eos)]
            out.append((tok.decode(ids, skip_special_tokens=True), not finished))
    return out


def run_cell(model, tok, task_key: str, fmt: str, args) -> dict:
    import reasoning_gym

    name, cfg = TASKS[task_key]
    ds = reasoning_gym.create_dataset(name, seed=args.seed, size=args.n, **cfg)
    shots_ds = reasoning_gym.create_dataset(name, seed=args.seed + 1000, size=N_SHOTS, **cfg)
    shots = [shots_ds[i] for i in range(N_SHOTS)]
    entries = [ds[i] for i in range(args.n)]
    prompts = [
        tok.apply_chat_template(build_messages(fmt, e["question"], shots), tokenize=False, add_generation_prompt=True)
        for e in entries
    ]
    t0 = time.time()
    greedy = generate(
        model,
        tok,
        prompts,
        n_return=1,
        sample=False,
        temperature=1.0,
        max_new=args.max_new_tokens,
        batch_seqs=args.batch,
    )
    t_greedy = time.time() - t0
    sampled = (
        generate(
            model,
            tok,
            prompts,
            n_return=args.k,
            sample=True,
            temperature=args.temperature,
            max_new=args.max_new_tokens,
            batch_seqs=args.batch,
        )
        if args.k > 0
        else []
    )
    secs = time.time() - t0
    g_ok = [score(ds, e, t) for e, (t, _) in zip(entries, greedy)]
    per_item, per_item_len = [], []
    for j, e in enumerate(entries):
        texts = [t for t, _ in sampled[j * args.k : (j + 1) * args.k]]
        per_item.append([score(ds, e, t) for t in texts])
        per_item_len.append([score(ds, e, t, lenient=True) for t in texts])
    s_len = [o for oks in per_item_len for o in oks]
    n = len(entries)
    majority = max(sum(1 for e in entries if e["answer"] == a) for a in {e["answer"] for e in entries}) / n
    g_answers = [verifier_answer(t)[:40] for t, _ in greedy]
    s_all = [o for oks in per_item for o in oks]
    mixed = sum(1 for oks in per_item if oks and 0 < sum(oks) < len(oks))
    all_wrong = sum(1 for oks in per_item if oks and sum(oks) == 0)
    all_right = sum(1 for oks in per_item if oks and all(oks))
    cell = {
        "task": task_key,
        "dataset": name,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "format": fmt,
        "n": n,
        "k": args.k,
        "temperature": args.temperature,
        "prompt_tokens_mean": round(sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) / n, 1),
        "greedy_pass": round(sum(g_ok) / n, 4),
        "greedy_pass_lenient": round(sum(score(ds, e, t, lenient=True) for e, (t, _) in zip(entries, greedy)) / n, 4),
        "majority_baseline": round(majority, 4),
        "greedy_distinct_answers": len(set(g_answers)),
        "greedy_truncated": round(sum(tr for _, tr in greedy) / n, 4),
        "sample_pass": round(sum(s_all) / len(s_all), 4) if s_all else None,
        "sample_pass_lenient": round(sum(s_len) / len(s_len), 4) if s_len else None,
        "mixed_share_lenient": round(sum(1 for oks in per_item_len if oks and 0 < sum(oks) < len(oks)) / n, 4)
        if sampled
        else None,
        "sample_truncated": round(sum(tr for _, tr in sampled) / len(sampled), 4) if sampled else None,
        "mixed_share": round(mixed / n, 4) if sampled else None,
        "all_wrong_share": round(all_wrong / n, 4) if sampled else None,
        "all_right_share": round(all_right / n, 4) if sampled else None,
        "seconds": round(secs, 1),
        "seconds_greedy": round(t_greedy, 1),
        "greedy_answers": g_answers,
        "references": [e["answer"] for e in entries],
        "examples": [
            {
                "question": entries[j]["question"][:200],
                "answer": entries[j]["answer"],
                "greedy": greedy[j][0][:300],
                "greedy_ok": g_ok[j],
                "sample": sampled[j * args.k][0][:300] if sampled else None,
            }
            for j in range(min(2, n))
        ],
    }
    return cell


def write_md(path: Path, res: dict) -> None:
    cells = res["cells"]
    lines = [
        f"# Pass-rate sweep: {res['model']} ({res['model_desc']})",
        "",
        "Command(s), in order (later ones `--append` the cells they add): "
        + "; ".join(f"`{c}`" for c in res.get("commands", [res["command"]]))
        + "  ",
        f"Wall time (sum over the commands): {res['wall_seconds'] / 60:.1f} min on {res['threads']} CPU thread(s) (shared 2-core machine); "
        f"N = {res['args']['n']} items per cell, K = {res['args']['k']} samples at temperature "
        f"{res['args']['temperature']} (top-p 1.0), max_new_tokens = {res['args']['max_new_tokens']}, seed "
        f"{res['args']['seed']}.",
        "",
        "Scoring: reasoning-gym's own `score_answer` on the answer the `reasoning_gym` verifier reads (`<answer>` tag, "
        "else the last `Answer: x`, else the whole completion). `mixed` = share of items whose K samples are neither all "
        "right nor all wrong (the only ones that give DRIFT a contrast); `majority` = the pass rate of a constant "
        "answer (the commonest reference); `distinct` = distinct greedy answers over the N items; `greedy lenient` also accepts an unmarked "
        "answer (the last number, else the last word, of the completion): ability apart from the answer format (`sample lenient` / `mixed lenient`: the same for the samples; "
        "'-' where a cell predates that column); `trunc` = share of generations with no "
        "`<|im_end|>` within max_new_tokens.",
        "",
        "| task | format | prompt tok | majority | greedy pass | distinct | greedy lenient | sample pass | sample lenient | mixed | mixed lenient | all wrong | all right | trunc (greedy / sample) | s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        f = lambda v: "-" if v is None else f"{v:.2f}"
        lines.append(
            f"| {c['task']} | {c['format']} | {c['prompt_tokens_mean']:.0f} | {f(c.get('majority_baseline'))} | "
            f"{f(c['greedy_pass'])} | {c.get('greedy_distinct_answers', '-')} | "
            f"{f(c['greedy_pass_lenient'])} | {f(c['sample_pass'])} | "
            f"{f(c.get('sample_pass_lenient'))} | {f(c['mixed_share'])} | {f(c.get('mixed_share_lenient'))} | {f(c['all_wrong_share'])} | {f(c['all_right_share'])} | "
            f"{f(c['greedy_truncated'])} / {f(c['sample_truncated'])} | {c['seconds']:.0f} |"
        )
    lines += ["", "Task configs (reasoning-gym dataset and arguments):", ""]
    for key, (name, cfg) in TASKS.items():
        if any(c["task"] == key for c in cells):
            lines.append(f"- `{key}`: `{name}` {cfg}")
    if res.get("recommendation"):
        lines += ["", "## Recommendation", "", res["recommendation"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--formats", default="zs,fs,fs_nosys")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64, help="sequences per generate() call")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real"))
    ap.add_argument("--name", default="sweep", help="output file stem")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the cells already in the output JSON (same n/k/T/max_new_tokens), run only the missing ones",
    )
    ap.add_argument("--recommendation-file", default=None, help="markdown text appended as the recommendation")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from drift_stream.embedded.real_models import REAL_MODELS, prepare_model

    hf_logging.set_verbosity_error()
    path = prepare_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {
        "model": args.model,
        "model_desc": REAL_MODELS[args.model].description,
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else argv)),
        "args": vars(args),
        "threads": args.threads,
        "torch": torch.__version__,
        "cells": [],
        "wall_seconds": 0.0,
    }
    json_path = out_dir / f"{args.name}.json"
    done: set[tuple[str, str]] = set()
    prior_wall = 0.0
    if args.append and json_path.exists():
        old = json.loads(json_path.read_text())
        same = ("n", "k", "temperature", "max_new_tokens", "seed", "model")
        if any(old["args"].get(key) != getattr(args, key) for key in same):
            raise SystemExit(
                f"--append: {json_path} was made with other settings ({ {k: old['args'].get(k) for k in same} })"
            )
        res["cells"] = old["cells"]
        res["commands"] = old.get("commands", [old["command"]]) + [res["command"]]
        prior_wall = float(old["wall_seconds"])
        done = {(c["task"], c["format"]) for c in old["cells"]}
    else:
        res["commands"] = [res["command"]]
    t0 = time.time()
    for task in args.tasks.split(","):
        for fmt in args.formats.split(","):
            if (task, fmt) in done:
                continue
            torch.manual_seed(args.seed)
            cell = run_cell(model, tok, task, fmt, args)
            res["cells"].append(cell)
            res["wall_seconds"] = round(prior_wall + time.time() - t0, 1)
            print(
                f"{task:10s} {fmt:9s} greedy {cell['greedy_pass']:.2f} sample {cell['sample_pass'] or 0:.2f} "
                f"mixed {cell['mixed_share'] or 0:.2f} trunc {cell['greedy_truncated']:.2f}/"
                f"{cell['sample_truncated'] or 0:.2f} {cell['seconds']:.0f}s  | {cell['examples'][0]['greedy'][:70]!r}",
                flush=True,
            )
            if args.recommendation_file:
                res["recommendation"] = Path(args.recommendation_file).read_text().strip()
            json_path.write_text(json.dumps(res, indent=1) + "\n")
            write_md(out_dir / f"{args.name}.md", res)
    print(f"wall {res['wall_seconds']:.0f}s -> {out_dir / args.name}.json / .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
