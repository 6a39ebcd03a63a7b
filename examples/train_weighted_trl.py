"""Train on DRIFT weights with TRL: demo run -> refine --policy weights -> export --format trl -> WeightedSFTTrainer.

    python examples/train_weighted_trl.py --out drift-trl            # the demo (minutes), then 40 training steps
    python examples/train_weighted_trl.py --out /tmp/x --quick       # CI: 16 queries, 96 pool rows, 8 steps

Everything runs on CPU with the shipped tiny model (drift_stream/embedded/assets/tiny-reasoner); nothing is downloaded.
The four commands are the ones a user types; the training part is what a user copies into their own script.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def run(argv: list[str]) -> None:
    from drift_stream.cli.main import main

    print("$ drift-stream " + " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        sys.exit(f"drift-stream {argv[0]} failed with exit code {code}")


def prepare(out: Path, quick: bool) -> Path:
    """A scored demo run, refined to weights and exported for TRL. Returns the export directory."""
    from drift_stream.embedded.demo import demo_assets

    assets = demo_assets()
    common = ["--threads", "1", "-q"]
    if not quick:
        if not (out / "demo" / "run" / "manifest.json").exists():
            run(["demo", "--out", str(out / "demo"), *common])
        scored = out / "demo" / "run"
    else:  # the same steps on slices: a bank from 16 queries x 4 rollouts, 96 pool rows scored against it
        import pyarrow.parquet as pq

        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(assets.queries).slice(56, 16), out / "queries.parquet")  # both tasks
        pq.write_table(pq.read_table(assets.pool).slice(0, 96), out / "pool.parquet")
        if not (out / "bank" / "manifest.json").exists():
            run(["bank", "build", "--model", assets.model, "--queries", str(out / "queries.parquet"), "--out",
                 str(out / "bank"), "--rollouts", "4", "--max-new-tokens", "48", "--preconditioner", "identity",
                 *common])
        scored = out / "run"
        run(["score", "--data", str(out / "pool.parquet"), "--model", assets.model, "--bank", str(out / "bank"),
             "--max-tokens", "256", "--out", str(scored), *common])
    run(["refine", str(scored), "--policy", "weights", "--out", str(out / "weights"), *common])
    run(["export", str(out / "weights"), "--format", "trl", "--out", str(out / "trl"), *common])
    return out / "trl"


def train(exported: Path, out: Path, steps: int) -> list[float]:
    """WeightedSFTTrainer on the exported rows; returns the logged training loss of every step."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from drift_stream.embedded.demo import demo_assets
    from drift_stream.integrations.trl import WeightedSFTTrainer

    model_dir = demo_assets().model
    dataset = load_dataset("parquet", data_files=str(exported / "data" / "*.parquet"), split="train")
    weights = dataset["weight"]
    print(f"{len(dataset)} rows, weights mean {sum(weights) / len(weights):.3f}, min {min(weights):.3f}, "
          f"max {max(weights):.3f}")
    trainer = WeightedSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=dataset,  # prompt/completion + weight: loss on the answer, weighted per row
        args=SFTConfig(output_dir=str(out / "checkpoints"), max_steps=steps, per_device_train_batch_size=8,
                       gradient_accumulation_steps=2, learning_rate=2e-4, lr_scheduler_type="constant",
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                       max_length=256, seed=0, disable_tqdm=True),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for step, loss in enumerate(losses, 1):
        print(f"step {step:3d}  weighted loss {loss:.4f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="drift-trl", help="working directory")
    parser.add_argument("--quick", action="store_true", help="small slices and 8 steps (CI)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40, --quick 8)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # a 0.9M-parameter model: threads only add contention on a shared CPU
    out = Path(args.out)
    exported = prepare(out, args.quick)
    losses = train(exported, out, args.steps or (8 if args.quick else 40))
    if not all(math.isfinite(x) for x in losses):
        print("non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
