"""Throughput of gradient-feature extraction against a plain forward+backward, on tiny Llama models (CPU or CUDA).

Prints, per model size, examples/s and tokens/s of
  (a) plain forward+backward of the summed per-example losses (weights trainable, no optimizer step),
  (b) feature extraction (GradientFeaturizer.featurize, 16 x 16 per module),
  (c) forward+backward with frozen weights and no hooks, LM head only at loss positions (gradients w.r.t. the input
      embeddings only: the floor),
with medians over interleaved repeats, the ratios b/a and b/c from the same run, and the process's peak RSS.
With --bergson-python, also runs EleutherAI bergson's collection (its own venv, offline, CPU) on the same model,
projection size and batch, and prints its throughput and our ratio to it.

    python benchmarks/throughput.py [--repeats 7] [--threads 1] [--bergson-python /work/venv-bergson/bin/python]

With --real, runs benchmarks/throughput_shapes.py instead: Llama/Qwen-shaped models with the Qwen vocabulary
(151,936), features vs plain forward+backward vs the floor, each with its own peak RSS (see that file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys

# Keep this folder off the front of sys.path: a script here named like a stdlib module would shadow it.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.append(sys.path.pop(0))
import tempfile
import time
from functools import partial

import torch

from drift_stream.embedded.tiny_models import make_tiny_model
from drift_stream.grads.features import GradientFeaturizer
from drift_stream.grads.projection import FeatureConfig

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from throughput_shapes import floor_step  # noqa: E402

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
    """(c) the frozen floor, computed the cheap way: frozen weights, no hooks, LM head and cross-entropy at the loss
    positions only, gradients w.r.t. the input embeddings only (throughput_shapes.floor_step)."""
    floor_step(model, batch)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch, featurizer, repeats: int, warmup: int = 2, extra: dict | None = None) -> dict:
    """Median seconds per batch of a / b / c, interleaved so that machine noise hits all three alike.

    Returns {"wall": {a, b, c}, "cpu": {a, b, c}}: wall-clock and this process's CPU time (user + sys). On a
    shared CPU machine with one torch thread the CPU time is the steadier measure of cost: it does not count
    the time other processes hold the core. On CUDA only wall time means anything.
    """
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
    for key, other in (extra or {}).items():  # more featurizers, e.g. last_n_blocks
        runs[key] = partial(other.featurize, batch)
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for key in order:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[key]()
            _sync(device)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {"wall": {k: statistics.median(v) for k, v in wall.items()},
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(name, n_params, secs, batch_size, seq_len, clocks=("wall", "cpu")) -> dict:
    row = {"model": name, "params": n_params}
    for clock in clocks:
        t = secs[clock]
        print(f"  [{clock} time]")
        for key, label in (("a", "plain fwd+bwd"), ("b", "features"), ("c", "frozen floor")):
            row[f"{clock}_{key}_examples_per_s"] = batch_size / t[key]
            row[f"{clock}_{key}_tokens_per_s"] = batch_size * seq_len / t[key]
            print(f"  ({key}) {label:14s} {batch_size / t[key]:9.1f} ex/s {batch_size * seq_len / t[key]:11.0f} tok/s"
                  f"  ({t[key] * 1000:.1f} ms/batch)")
        row[f"{clock}_b_over_a"] = t["a"] / t["b"]  # throughput ratios
        row[f"{clock}_b_over_c"] = t["c"] / t["b"]
        print(f"  ratio b/a = {row[f'{clock}_b_over_a']:.3f}   b/c = {row[f'{clock}_b_over_c']:.3f}")
    print(f"  peak RSS so far {peak_rss_mb():.0f} MB")
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
                proj_dim: int, threads: int) -> tuple[float, float, float]:
    """(wall s, CPU s, loop s/batch) of one `bergson build` (offline, CPU) over a saved dataset.

    The last is bergson's own progress-bar rate over its collection loop (NaN if it cannot be read)."""
    bergson = os.path.join(os.path.dirname(python), "bergson")
    cmd = [bergson, "build", out_dir, "--model", model_dir, "--dataset", data_dir,
           "--projection_dim", str(proj_dim), "--token_batch_size", str(batch_size * seq_len),
           "--max_batch_size", str(batch_size), "--overwrite", "true"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"bergson failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rates = re.findall(r"Collecting gradients: 100%[^\r\n]*?([\d.]+)(it/s|s/it)\]", proc.stderr)
    loop = float("nan")
    if rates:
        value, unit = float(rates[-1][0]), rates[-1][1]
        loop = 1.0 / value if unit == "it/s" else value
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), loop


def bergson_seconds_per_batch(python, inputs, workdir, batch_size, seq_len, proj_dim, threads, docs, repeats) -> dict:
    """Steady-state seconds per batch, {"wall": s, "cpu": s}: difference between two dataset sizes, so that
    start-up (imports, model and data loading) cancels out."""
    small, large = docs
    runs = {small: [], large: []}
    for r in range(repeats):
        for n in (small, large) if r % 2 == 0 else (large, small):
            out = os.path.join(workdir, f"bergson-run-{n}")
            runs[n].append(run_bergson(python, inputs["model"], inputs["data"][n], out, batch_size, seq_len,
                                       proj_dim, threads))
    extra_batches = (large - small) / batch_size
    out = {
        clock: (statistics.median(r[i] for r in runs[large]) - statistics.median(r[i] for r in runs[small]))
        / extra_batches
        for i, clock in enumerate(("wall", "cpu"))
    }
    out["loop"] = statistics.median(r[2] for r in runs[large])
    return out


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
    parser.add_argument("--bergson-batches", type=int, nargs=2, default=(2, 32),
                        help="dataset sizes in batches for the two timed bergson runs")
    parser.add_argument("--bergson-repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--real", action="store_true", help="real shapes at the Qwen vocabulary: every other "
                        "argument goes to benchmarks/throughput_shapes.py (see its --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--real" in argv:
        import throughput_shapes

        return throughput_shapes.main([a for a in argv if a != "--real"])
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from drift_stream.embedded.tiny_models import make_char_tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clocks = ("wall",) if device.type == "cuda" else ("wall", "cpu")
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
            last1 = GradientFeaturizer(model, FeatureConfig(proj_dim_in=args.proj_dim, proj_dim_out=args.proj_dim,
                                                            last_n_blocks=1))
            secs = measure(model, batch, featurizer, args.repeats, extra={"b_last1": last1})
            row = report(name, n_params, secs, args.batch_size, args.seq_len, clocks)
            for clock in clocks:
                t = secs[clock]["b_last1"]
                row[f"{clock}_b_last1_examples_per_s"] = args.batch_size / t
                print(f"  [{clock}] (b') features, last_n_blocks=1 ({len(last1.modules)} modules): "
                      f"{args.batch_size / t:.1f} ex/s, {secs[clock]['c'] / t:.2f}x the floor")
            if args.bergson_python:
                try:
                    per_batch = bergson_seconds_per_batch(
                        args.bergson_python, inputs, workdir, args.batch_size, args.seq_len, args.proj_dim,
                        args.threads, docs, args.bergson_repeats,
                    )
                except (RuntimeError, OSError) as exc:
                    row["bergson_error"] = str(exc)[-500:]
                    print(f"  bergson could not run: {exc}")
                else:
                    again = measure(model, batch, featurizer, args.repeats)  # ours again, right after bergson
                    for clock in clocks:
                        t, ours = secs[clock], (secs[clock]["b"] + again[clock]["b"]) / 2
                        berg = per_batch[clock]
                        row.update({f"{clock}_bergson_examples_per_s": args.batch_size / berg,
                                    f"{clock}_bergson_over_a": t["a"] / berg, f"{clock}_bergson_over_c": t["c"] / berg,
                                    f"{clock}_ours_over_bergson": berg / ours})
                        print(f"  [{clock} time] bergson build {args.batch_size / berg:9.1f} ex/s "
                              f"{args.batch_size * args.seq_len / berg:11.0f} tok/s ({berg * 1000:.1f} ms/batch, "
                              f"steady state)  bergson/a = {t['a'] / berg:.3f}  bergson/c = {t['c'] / berg:.3f}  "
                              f"ours/bergson = {berg / ours:.3f}")
                    loop, ours_wall = per_batch["loop"], (secs["wall"]["b"] + again["wall"]["b"]) / 2
                    row.update(bergson_loop_s_per_batch=loop, loop_ours_over_bergson=loop / ours_wall)
                    print(f"  [bergson's own progress bar, wall] {loop * 1000:.1f} ms/batch: bergson/a = "
                          f"{secs['wall']['a'] / loop:.3f}  bergson/c = {secs['wall']['c'] / loop:.3f}  "
                          f"ours/bergson = {loop / ours_wall:.3f}")
            row["peak_rss_mb"] = peak_rss_mb()
            results.append(row)
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
