"""Train the embedded default model (drift_stream/embedded/assets/tiny-reasoner/) from scratch on the demo pool.

    python examples/train_tiny_model.py                          # rewrites drift_stream/embedded/assets/tiny-reasoner/
    python examples/train_tiny_model.py --out /tmp/tiny --check drift_stream/embedded/assets/tiny-reasoner

A 4-layer Llama with the character tokenizer of drift_stream.embedded.tiny_models, trained with loss on assistant tokens only on
the shipped noisy pool (the model's own SFT data), stopped at partial competence. Prints greedy accuracy per task on
the validation queries and the test set and writes them to training_summary.json. Deterministic under the seed for a
fixed torch thread count (--threads, default 1). Needs reasoning-gym for the verifiers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "drift_stream" / "embedded" / "assets"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ASSETS / "demo", help="directory with pool/queries/test.parquet")
    parser.add_argument("--out", type=Path, default=ASSETS / "tiny-reasoner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: results do not depend on the core count)")
    parser.add_argument("--check", type=Path, default=None,
                        help="compare accuracies with this directory's training_summary.json (exit 1 if not)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import pyarrow.parquet as pq
    import torch
    import transformers

    from drift_stream.embedded.tiny_models import make_char_tokenizer
    from drift_stream.embedded.training import (
        TinyModelRecipe,
        greedy_accuracy,
        train_sft,
    )

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    recipe = TinyModelRecipe(seed=args.seed, init_seed=args.seed)
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, steps=args.steps, warmup_steps=min(recipe.warmup_steps, args.steps))
    pool = pq.read_table(args.data / "pool.parquet").to_pylist()
    queries = pq.read_table(args.data / "queries.parquet").to_pylist()
    test = pq.read_table(args.data / "test.parquet").to_pylist()
    tokenizer = make_char_tokenizer()
    model = recipe.build(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params} parameters; pool {len(pool)} rows; recipe {dataclasses.asdict(recipe)}", flush=True)

    start = time.perf_counter()
    result = train_sft(model, tokenizer, pool, **recipe.sft_kwargs())
    train_s = time.perf_counter() - start
    model.eval()
    val = greedy_accuracy(model, tokenizer, queries)
    held = greedy_accuracy(model, tokenizer, test)
    print(f"trained {recipe.steps} steps in {train_s:.0f} s; final loss {result.losses[-1]:.4f}")
    print("validation queries:", {k: round(v, 4) for k, v in val.per_task.items()}, f"overall {val.accuracy:.4f}")
    print("test set:          ", {k: round(v, 4) for k, v in held.per_task.items()}, f"overall {held.accuracy:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {
        "recipe": dataclasses.asdict(recipe),
        "parameters": params,
        "train_seconds": round(train_s, 1),
        "final_loss": result.losses[-1],
        "queries_accuracy": val.per_task,
        "test_accuracy": held.per_task,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved to {args.out}")
    if args.check is not None:
        ref = json.loads((args.check / "training_summary.json").read_text())
        same = ref["queries_accuracy"] == val.per_task and ref["test_accuracy"] == held.per_task
        print("accuracies identical to" if same else "accuracies DIFFER from", args.check)
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
