"""Wall time of building a validation bank (default 64 queries x 8 rollouts) on a tiny model, by stage.

    python benchmarks/bank_build.py [--queries 64] [--rollouts 8] [--max-new-tokens 64] [--threads N]

Stages come from the bank manifest's `timings_s`: generation (HF generate), verification (numeric verifier),
gradients (features of every rollout + reference losses) and preconditioner (features of the fisher rows, block
Fisher fit, apply). Model: `drift_stream.embedded.tiny_models.save_tiny_model` (Llama, hidden 32, 2 layers), nothing downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    parser.add_argument("--feature-batch-size", type=int, default=16)
    parser.add_argument("--fisher-examples", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    from drift_stream.bank.build import build_bank
    from drift_stream.bank.config import BankConfig
    from drift_stream.embedded.tiny_models import save_tiny_model
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.rollouts.engine import RolloutConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    queries = [{"id": f"q{i:03d}", "question": f"Tom has {i} apples and buys {i % 7 + 2} more. How many now?",
                "answer": f"{i} + {i % 7 + 2} = {i + i % 7 + 2}\n#### {i + i % 7 + 2}"} for i in range(args.queries)]
    pool = [{"messages": [{"role": "user", "content": f"Add {i} and {i + 3}."},
                          {"role": "assistant", "content": f"{i} + {i + 3} = {2 * i + 3}"}]}
            for i in range(args.fisher_examples)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(Path(tmp) / "model", arch="llama", hidden_size=args.hidden_size,
                                    num_layers=args.layers, max_positions=512)
        config = BankConfig(
            rollouts=RolloutConfig(num_rollouts=args.rollouts, max_new_tokens=args.max_new_tokens, seed=0,
                                   batch_size=args.batch_size),
            features=FeatureConfig(), preconditioner="block", fisher_examples=args.fisher_examples,
            feature_batch_size=args.feature_batch_size,
        )
        start = time.perf_counter()
        bank = build_bank(model_dir, queries, Path(tmp) / "bank", config, verifier="numeric", fisher_data=pool,
                          device="cpu", progress=False)
        total = time.perf_counter() - start
        rollouts = bank.rollouts()
    tokens = sum(rollouts.column("num_completion_tokens").to_pylist())
    timings = bank.manifest["timings_s"]
    n = args.queries * args.rollouts
    print(f"bank build: {args.queries} queries x {args.rollouts} rollouts = {n} rollouts, {tokens} generated tokens, "
          f"max_new_tokens {args.max_new_tokens}, feature dim {bank.dim}, torch threads {torch.get_num_threads()}")
    for stage in ("generation", "verification", "gradients", "preconditioner"):
        print(f"  {stage:<15} {timings[stage]:8.2f} s  {100 * timings[stage] / total:5.1f}%")
    other = total - sum(timings.values())
    print(f"  {'other':<15} {other:8.2f} s  {100 * other / total:5.1f}%  (model load, fingerprint, writing)")
    print(f"  {'total':<15} {total:8.2f} s  ({n / total:.1f} rollouts/s, generation {tokens / timings['generation']:.0f} "
          f"tokens/s, gradients {n / timings['gradients']:.1f} rollouts/s)")


if __name__ == "__main__":
    main()
