"""train_sft vs WeightedSFTTrainer: seconds per optimiser step on the benchmark's continued-SFT shape (the shipped
tiny model, batch 32, 1,024 demo pool rows, log-normal weights of mean 1), same optimiser (AdamW, betas 0.9/0.95),
schedule (warmup 5, cosine to 0.1 lr) and clipping. Both timings include tokenizing the rows. One thread, two
repetitions; quote the ratio of the best times, measured in one run.

    python benchmarks/sft_speed.py [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drift_stream.embedded.demo import demo_assets
    from drift_stream.embedded.training import train_sft
    from drift_stream.integrations.trl import SFTConfig, WeightedSFTTrainer

    torch.set_num_threads(1)
    assets = demo_assets()
    rows = pq.read_table(assets.pool).slice(0, args.rows).to_pylist()
    w = np.exp(np.random.default_rng(0).normal(size=len(rows)) * 0.5)
    w = (w / w.mean()).tolist()
    tok = AutoTokenizer.from_pretrained(assets.model)
    best: dict[str, float] = {}
    for rep in range(2):
        model = AutoModelForCausalLM.from_pretrained(assets.model)
        t0 = time.perf_counter()
        train_sft(model, tok, rows, weights=w, steps=args.steps, batch_size=32, lr=1e-4, seed=0, warmup_steps=5,
                  log_every=0)
        times = {"train_sft": (time.perf_counter() - t0) / args.steps}

        model = AutoModelForCausalLM.from_pretrained(assets.model)
        t0 = time.perf_counter()
        data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "weight": x}
                                  for r, x in zip(rows, w)])
        config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=32,
                           learning_rate=1e-4, adam_beta2=0.95, warmup_steps=5,
                           lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                           max_grad_norm=1.0, logging_steps=10, report_to=[], save_strategy="no", use_cpu=True,
                           bf16=False, disable_tqdm=True, max_length=256, seed=0)
        WeightedSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok).train()
        times["WeightedSFTTrainer"] = (time.perf_counter() - t0) / args.steps
        for name, t in times.items():
            best[name] = min(best.get(name, float("inf")), t)
            print(f"rep {rep}  {name:20s} {t:.3f} s/step", flush=True)
    print(f"best: train_sft {best['train_sft']:.3f} s/step, WeightedSFTTrainer {best['WeightedSFTTrainer']:.3f} "
          f"s/step, ratio {best['WeightedSFTTrainer'] / best['train_sft']:.2f}")


if __name__ == "__main__":
    main()
