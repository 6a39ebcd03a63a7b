"""Throughput and peak memory at real shapes: Llama/Qwen-shaped random models with the Qwen vocabulary (151,936).

Per shape and loss fraction, three measurements, each in its OWN subprocess so that its peak memory is its own:
  plain     plain forward + backward of the summed per-example losses, weights trainable, full [B, T, V] logits
            (what a training step costs without the optimizer);
  features  GradientFeaturizer.featurize (16 x 16 per module), i.e. drift_stream.model.losses at loss positions only;
  floor     the frozen floor computed the cheap way, written here in plain torch independently of the library:
            weights frozen, forward from input embeddings that require grad, hidden states gathered at the loss
            positions, lm_head and float32 cross-entropy there only, per-example means summed, one input-gradient
            backward. Nothing cheaper computes the same loss gradient.
Time: median over repeats (after one warm-up) of wall-clock and of the subprocess's CPU time (user + sys; on a
shared machine with one torch thread the CPU time is the steadier figure). Memory: the subprocess's peak resident
set size (getrusage ru_maxrss), total and above the peak reached once the model and batch were built.

    python benchmarks/throughput.py --real [--shapes qwen-h256-l2 llama-h512-l4] [--loss-fracs 0.25 0.75]
        [--bergson-python /tmp/bergson-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

# Keep this folder off the front of sys.path: a script here named like a stdlib module would shadow it.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.append(sys.path.pop(0))
import time

QWEN_VOCAB = 151_936
# name -> (arch, model kwargs, batch size, sequence length); Qwen2 ties its embeddings like Qwen2.5-0.5B does.
SHAPES = {
    "qwen-h256-l2": ("qwen2", dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                                   tie_word_embeddings=True), 2, 1024),
    "llama-h512-l4": ("llama", dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1376), 1, 2048),
}
KINDS = ("plain", "features", "floor")


def build(shape: str, loss_frac: float, dtype: str = "float32"):
    """(model, batch): random weights (seed 0), random tokens, the last `loss_frac` of each row in the loss."""
    import torch

    from drift_stream.embedded.tiny_models import make_tiny_model

    arch, kwargs, batch_size, seq_len = SHAPES[shape]
    kwargs = dict(kwargs)
    tie = kwargs.pop("tie_word_embeddings", False)
    model = make_tiny_model(arch, vocab_size=QWEN_VOCAB, max_positions=seq_len, seed=0, tie_word_embeddings=tie,
                            **kwargs)
    if tie:
        model.tie_weights()
    model = model.to(getattr(torch, dtype)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, QWEN_VOCAB, (batch_size, seq_len), generator=gen)
    mask = torch.zeros(batch_size, seq_len)
    mask[:, seq_len - int(round(loss_frac * seq_len)):] = 1.0
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}


def plain_step(model, batch):
    """Trainable weights, full logits: forward + backward of the summed per-example mean NLL; grads dropped."""
    import torch

    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"][:, 1:]
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    ((nll * mask).sum(1) / mask.sum(1)).sum().backward()
    model.zero_grad(set_to_none=True)


def floor_step(model, batch):
    """Frozen weights; LM head and float32 cross-entropy at loss positions only; gradient w.r.t. input embeddings."""
    import torch

    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"][:, 1:] > 0
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # [B, T, H]
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
    rows, cols = mask.nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(hidden[:, :-1][rows, cols]).float()  # [N, V]
    nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:][rows, cols], reduction="none")  # [N]
    per_row = torch.zeros(ids.shape[0], device=nll.device).index_add(0, rows, nll) / mask.sum(1)
    torch.autograd.grad(per_row.sum(), embeds)


def child(spec: dict) -> dict:
    """One measurement in this process: warm-up, `repeats` timed runs, peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    model, batch = build(spec["shape"], spec["loss_frac"], spec.get("dtype", "float32"))
    kind = spec["kind"]
    if kind == "features":
        from drift_stream.grads.features import GradientFeaturizer
        from drift_stream.grads.projection import FeatureConfig

        featurizer = GradientFeaturizer(model, FeatureConfig(proj_dim_in=spec["proj_dim"],
                                                             proj_dim_out=spec["proj_dim"]))

        def run():
            featurizer.featurize(batch)
    elif kind == "plain":
        for p in model.parameters():
            p.requires_grad_(True)

        def run():
            plain_step(model, batch)
    elif kind == "floor":
        for p in model.parameters():
            p.requires_grad_(False)

        def run():
            floor_step(model, batch)
    else:
        raise ValueError(kind)
    setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    for _ in range(spec["warmup"]):
        run()
    wall, cpu = [], []
    for _ in range(spec["repeats"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {**spec, "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_rss_mb": peak_mb,
            "setup_rss_mb": setup_mb, "peak_above_setup_mb": peak_mb - setup_mb,
            "params": sum(p.numel() for p in model.parameters())}


def run_child(spec: dict, timeout_s: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['kind']} on {spec['shape']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """One line per (shape, loss fraction): time and peak RSS of each kind, and the ratios the issue asks for."""
    lines = [
        "| shape | B x T | loss tokens | plain s | features s | floor s | features/floor time (CPU) | features/plain "
        "speed-up | peak RSS MB plain / features / floor | features/floor peak RSS (above setup) | bergson s "
        "(ours/bergson speed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["shape"], r["loss_frac"]) for r in results}, key=lambda k: (list(SHAPES).index(k[0]), k[1]))
    for shape, frac in keys:
        by = {r["kind"]: r for r in results if r["shape"] == shape and r["loss_frac"] == frac}
        _, _, b, t = SHAPES[shape]

        def get(kind, field, fmt="{:.2f}"):
            return fmt.format(by[kind][field]) if kind in by else "-"

        ratio = (f"{by['features']['cpu_s'] / by['floor']['cpu_s']:.3f}" if {"features", "floor"} <= set(by)
                 else "-")
        speedup = (f"{by['plain']['cpu_s'] / by['features']['cpu_s']:.2f}x" if {"features", "plain"} <= set(by)
                   else "-")
        mem = " / ".join(get(k, "peak_rss_mb", "{:.0f}") for k in KINDS)
        mem_ratio = "-"
        if {"features", "floor"} <= set(by):
            f, c = by["features"], by["floor"]
            mem_ratio = (f"{f['peak_rss_mb'] / c['peak_rss_mb']:.3f} "
                         f"({f['peak_above_setup_mb']:.0f} / {c['peak_above_setup_mb']:.0f} MB)")
        berg = "-"
        if {"features", "bergson"} <= set(by):
            berg = f"{by['bergson']['cpu_s']:.2f} ({by['bergson']['cpu_s'] / by['features']['cpu_s']:.2f}x)"
        lines.append(f"| {shape} | {b} x {t} | {frac:.0%} | {get('plain', 'cpu_s')} | {get('features', 'cpu_s')} | "
                     f"{get('floor', 'cpu_s')} | {ratio} | {speedup} | {mem} | {mem_ratio} | {berg} |")
    return "\n".join(lines)


def bergson_per_batch(python: str, shape: str, loss_frac: float, proj_dim: int, threads: int, workdir: str,
                      batches: tuple[int, int] = (1, 3)) -> dict:
    """EleutherAI bergson's `build` (its own venv, offline, CPU) on the same model, batch and loss tokens.

    The dataset is pre-tokenized (input_ids, and labels -100 outside the loss) so both tools see the same tokens.
    Steady-state CPU and wall seconds per batch: the difference between runs over batches[1] and batches[0] batches,
    so start-up (imports, model and data loading) cancels out. Peak RSS: that of the larger run's processes.
    """
    import datasets

    from drift_stream.embedded.tiny_models import make_char_tokenizer

    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from throughput import run_bergson

    model, batch = build(shape, loss_frac)
    _, _, batch_size, seq_len = SHAPES[shape]
    model_dir = os.path.join(workdir, f"{shape}-model")
    # bergson refuses a token batch longer than max_position_embeddings; RoPE has no position weights, so raising it
    # changes nothing else (the rows stay seq_len long).
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, batch_size * seq_len)
    model.save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)  # never used to tokenize: the rows come as input_ids
    ids, mask = batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist()
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    results = {}
    for n in batches:
        data_dir = os.path.join(workdir, f"{shape}-{loss_frac}-data{n}")
        docs = n * batch_size
        datasets.Dataset.from_dict({"input_ids": [ids] * docs, "labels": [labels] * docs}).save_to_disk(data_dir)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        wall, cpu, _ = run_bergson(python, model_dir, data_dir, os.path.join(workdir, f"out{n}"), batch_size,
                                   seq_len, proj_dim, threads)
        results[n] = (wall, cpu, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, before)
    small, large = batches
    extra = large - small
    return {"kind": "bergson", "shape": shape, "loss_frac": loss_frac, "threads": threads, "proj_dim": proj_dim,
            "cpu_s": (results[large][1] - results[small][1]) / extra,
            "wall_s": (results[large][0] - results[small][0]) / extra,
            "peak_rss_mb": results[large][2], "setup_rss_mb": float("nan"), "peak_above_setup_mb": float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--loss-fracs", nargs="+", type=float, default=[0.25, 0.75])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--plain-repeats", type=int, default=1,
                        help="timed runs of the plain step (the slow one: ~10x the others at 25%% loss tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--proj-dim", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--bergson-python", default=None, help="python of a venv with bergson installed: also run "
                        "`bergson build` on each shape (steady state from 1 and 3 batches)")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import torch

    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU, vocab {QWEN_VOCAB}, {args.proj_dim}x"
          f"{args.proj_dim} per module; each measurement in its own subprocess (median of {args.repeats} after "
          f"{args.warmup} warm-up, plain: {args.plain_repeats}; peak RSS = getrusage ru_maxrss of that subprocess). "
          "Shared machine: compare "
          "ratios within a run; times are CPU seconds of the subprocess.", flush=True)
    results = []
    for shape in args.shapes:
        for frac in args.loss_fracs:
            for kind in args.kinds:
                spec = dict(shape=shape, loss_frac=frac, kind=kind, warmup=args.warmup,
                            repeats=args.plain_repeats if kind == "plain" else args.repeats,
                            threads=args.threads, proj_dim=args.proj_dim)
                try:
                    row = run_child(spec, args.timeout_s)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"  {shape} {frac:.0%} {kind}: FAILED {exc}", flush=True)
                    continue
                results.append(row)
                print(f"  {shape} loss {frac:.0%} {kind:8s} cpu {row['cpu_s']:7.2f} s  wall {row['wall_s']:7.2f} s  "
                      f"peak RSS {row['peak_rss_mb']:6.0f} MB ({row['peak_above_setup_mb']:.0f} above setup)",
                      flush=True)
            if args.bergson_python:
                import tempfile

                try:
                    with tempfile.TemporaryDirectory(prefix="drift-bergson-") as workdir:
                        row = bergson_per_batch(args.bergson_python, shape, frac, args.proj_dim, args.threads,
                                                workdir)
                except (RuntimeError, OSError) as exc:
                    print(f"  {shape} {frac:.0%} bergson: FAILED {str(exc)[-800:]}", flush=True)
                else:
                    results.append(row)
                    print(f"  {shape} loss {frac:.0%} bergson  cpu {row['cpu_s']:7.2f} s  wall {row['wall_s']:7.2f} s"
                          f"  (steady state per batch; max RSS of this run's subprocesses so far, an upper bound: "
                          f"{row['peak_rss_mb']:.0f} MB)",
                          flush=True)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
