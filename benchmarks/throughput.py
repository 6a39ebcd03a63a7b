"""Throughput of gradient-feature extraction against a plain forward+backward, on tiny Llama models (CPU or CUDA).

Prints, per model size, examples/s and tokens/s of
  (a) plain forward+backward of the summed per-example losses (weights trainable, no optimizer step),
  (b) feature extraction (GradientFeaturizer.featurize, 16 x 16 per module),
  (c) forward+backward with frozen weights and no hooks (gradients w.r.t. the input embeddings only: the floor),
with medians over interleaved repeats, the ratios b/a and b/c from the same run, and the process's peak RSS.
With --bergson-python, also runs EleutherAI bergson's collection (its own venv, offline, CPU) on the same model,
projection size and batch, and prints its throughput and our ratio to it.

    python benchmarks/throughput.py [--repeats 7] [--threads 1] [--bergson-python /work/venv-bergson/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from drift_stream.grads import FeatureConfig, GradientFeaturizer
from drift_stream.testing import make_tiny_model

# name -> make_tiny_model kwargs (vocab 102: the project's character tokenizer)
SIZES = {
    "llama-0.5M": dict(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256),
    "llama-3.4M": dict(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=768),
}


def make_batch(batch_size: int, seq_len: int, vocab: int, prompt_len: int, device, seed: int = 0) -> dict:
    """Random tokens; loss on every token after a prompt of `prompt_len` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (batch_size, seq_len), generator=gen)
    loss_mask = torch.zeros(batch_size, seq_len)
    loss_mask[:, prompt_len:] = 1.0
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "loss_mask": loss_mask.to(device)}


def summed_loss(model, batch, inputs_embeds=None):
    """Sum over examples of the mean masked NLL (the same objective the featurizer differentiates)."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"][:, 1:]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(inputs_embeds=inputs_embeds) if inputs_embeds is not None else dict(input_ids=ids)
    logits = model(attention_mask=attn, position_ids=positions, use_cache=False, **kwargs).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view_as(mask)
    return ((nll * mask).sum(1) / mask.sum(1)).sum()


def plain_step(model, batch):
    """(a) forward + backward with trainable weights; grads dropped (no optimizer step)."""
    loss = summed_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)


def frozen_step(model, batch):
    """(c) forward + backward with frozen weights and no hooks: only input gradients are computed."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = summed_loss(model, batch, inputs_embeds=embeds)
    torch.autograd.grad(loss, embeds)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch, featurizer, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per batch of a / b / c, interleaved so that machine noise hits all three alike."""
    device = next(model.parameters()).device
    params = list(model.parameters())

    def run_a():
        for p in params:
            p.requires_grad_(True)
        plain_step(model, batch)

    def run_b():
        featurizer.featurize(batch)

    def run_c():
        for p in params:
            p.requires_grad_(False)
        frozen_step(model, batch)
        for p in params:
            p.requires_grad_(True)

    runs = {"a": run_a, "b": run_b, "c": run_c}
    times = {k: [] for k in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for key in order:
            _sync(device)
            start = time.perf_counter()
            runs[key]()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(name, n_params, secs, batch_size, seq_len) -> dict:
    row = {"model": name, "params": n_params}
    for key, label in (("a", "plain fwd+bwd"), ("b", "features"), ("c", "frozen floor")):
        row[f"{key}_examples_per_s"] = batch_size / secs[key]
        row[f"{key}_tokens_per_s"] = batch_size * seq_len / secs[key]
        print(f"  ({key}) {label:14s} {row[f'{key}_examples_per_s']:9.1f} ex/s {row[f'{key}_tokens_per_s']:11.0f} tok/s"
              f"  ({secs[key] * 1000:.1f} ms/batch)")
    row["b_over_a"] = secs["a"] / secs["b"]  # throughput ratio
    row["b_over_c"] = secs["c"] / secs["b"]
    print(f"  ratio b/a = {row['b_over_a']:.3f}   b/c = {row['b_over_c']:.3f}   peak RSS so far {peak_rss_mb():.0f} MB")
    return row


# ---------------------------------------------------------------------------------------------------- bergson
def write_bergson_inputs(workdir: str, name: str, model, tokenizer, seq_len: int, docs: list[int]) -> dict:
    """Save the model (HF directory) and datasets of `docs` texts of exactly `seq_len` tokens (save_to_disk)."""
    import random

    import datasets

    model_dir = os.path.join(workdir, name, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    chars = [chr(i) for i in range(33, 127)]  # one token per character with the project's char tokenizer
    paths = {}
    for n in docs:
        texts = ["".join(rng.choice(chars) for _ in range(seq_len)) for _ in range(n)]
        assert len(tokenizer(texts[0])["input_ids"]) == seq_len
        paths[n] = os.path.join(workdir, name, f"data{n}")
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(paths[n])
    return {"model": model_dir, "data": paths}


def run_bergson(python: str, model_dir: str, data_dir: str, out_dir: str, batch_size: int, seq_len: int,
                proj_dim: int, threads: int) -> float:
    """Wall seconds of one `bergson build` (offline, CPU) over a saved dataset."""
    bergson = os.path.join(os.path.dirname(python), "bergson")
    cmd = [bergson, "build", out_dir, "--model", model_dir, "--dataset", data_dir,
           "--projection_dim", str(proj_dim), "--token_batch_size", str(batch_size * seq_len),
           "--max_batch_size", str(batch_size), "--overwrite", "true"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bergson failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def bergson_seconds_per_batch(python, inputs, workdir, batch_size, seq_len, proj_dim, threads, docs, repeats) -> float:
    """Steady-state seconds per batch: difference of wall times at two dataset sizes (startup cancels out)."""
    small, large = docs
    walls = {small: [], large: []}
    for r in range(repeats):
        for n in (small, large) if r % 2 == 0 else (large, small):
            out = os.path.join(workdir, f"bergson-run-{n}")
            walls[n].append(run_bergson(python, inputs["model"], inputs["data"][n], out, batch_size, seq_len,
                                        proj_dim, threads))
    extra_batches = (large - small) / batch_size
    return (statistics.median(walls[large]) - statistics.median(walls[small])) / extra_batches


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--proj-dim", type=int, default=16, help="k_in = k_out per module")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine has 2 shared cores)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bergson-python", default=None, help="python of a venv with bergson installed")
    parser.add_argument("--bergson-batches", type=int, nargs=2, default=(4, 16),
                        help="dataset sizes in batches for the two timed bergson runs")
    parser.add_argument("--bergson-repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from drift_stream.testing import make_char_tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = make_char_tokenizer()
    config = FeatureConfig(proj_dim_in=args.proj_dim, proj_dim_out=args.proj_dim)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.proj_dim}x{args.proj_dim} per module, median of {args.repeats} interleaved "
          "repeats. Shared machine: figures are noisy, compare ratios within a run.")
    results = []
    with tempfile.TemporaryDirectory(prefix="drift-throughput-") as workdir:
        for name in args.sizes:
            # max_positions 2048 so that bergson's token batch (16 x 128) fits; RoPE has no position weights.
            built = make_tiny_model("llama", vocab_size=len(tokenizer), max_positions=max(2048, args.seq_len),
                                    seed=0, **SIZES[name])
            docs = [b * args.batch_size for b in args.bergson_batches]
            inputs = write_bergson_inputs(workdir, name, built, tokenizer, args.seq_len, docs) \
                if args.bergson_python else None
            model = AutoModelForCausalLM.from_pretrained(inputs["model"]) if inputs else built
            model = model.to(device).eval()
            n_params = sum(p.numel() for p in model.parameters())
            batch = make_batch(args.batch_size, args.seq_len, len(tokenizer), 1, device)
            featurizer = GradientFeaturizer(model, config)
            print(f"\n{name}: {n_params / 1e6:.2f}M params, {len(featurizer.modules)} modules, D = {featurizer.dim}")
            secs = measure(model, batch, featurizer, args.repeats)
            row = report(name, n_params, secs, args.batch_size, args.seq_len)
            if args.bergson_python:
                try:
                    per_batch = bergson_seconds_per_batch(
                        args.bergson_python, inputs, workdir, args.batch_size, args.seq_len, args.proj_dim,
                        args.threads, docs, args.bergson_repeats,
                    )
                    again = measure(model, batch, featurizer, args.repeats)  # ours again, right after bergson
                    ours = statistics.median([secs["b"], again["b"]])
                    row.update(bergson_examples_per_s=args.batch_size / per_batch,
                               bergson_tokens_per_s=args.batch_size * args.seq_len / per_batch,
                               bergson_over_a=secs["a"] / per_batch, bergson_over_c=secs["c"] / per_batch,
                               ours_over_bergson=per_batch / ours)
                    print(f"  bergson build  {row['bergson_examples_per_s']:9.1f} ex/s "
                          f"{row['bergson_tokens_per_s']:11.0f} tok/s  ({per_batch * 1000:.1f} ms/batch, steady state)")
                    print(f"  bergson/a = {row['bergson_over_a']:.3f}   bergson/c = {row['bergson_over_c']:.3f}   "
                          f"ours/bergson = {row['ours_over_bergson']:.3f}")
                except (RuntimeError, OSError) as exc:
                    row["bergson_error"] = str(exc)[-500:]
                    print(f"  bergson could not run: {exc}")
            row["peak_rss_mb"] = peak_rss_mb()
            results.append(row)
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
