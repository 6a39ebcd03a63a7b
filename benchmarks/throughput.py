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
