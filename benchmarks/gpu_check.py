"""GPU check of the gradient engine (< 2 minutes on one H200): correctness on CUDA, then throughput.

1. Projections built for a CUDA model equal the CPU ones bit for bit (they are drawn on the CPU by design).
2. Features on CUDA match CPU float64 ground truth: float64 on CUDA (tight), float32 (TF32 off), bf16 autocast
   (float32 accumulation), for Llama and GPT-2 (Conv1D), with left and right padding and multi-turn masks.
3. Throughput on CUDA of (a) plain forward+backward, (b) feature extraction, (c) frozen-weight floor, on a larger
   Llama (about 0.2B parameters), float32 and bf16, with peak GPU memory.

Without CUDA, runs the CPU part (float32 vs float64) and says what it skipped. Exit status 1 if a check fails.

    python benchmarks/gpu_check.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import frozen_step, make_batch, measure, plain_step  # noqa: E402

from drift_stream.formats import TokenizedExample, collate  # noqa: E402
from drift_stream.grads import FeatureConfig, GradientFeaturizer  # noqa: E402
from drift_stream.testing import make_tiny_model  # noqa: E402

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILURES.append(what)


def examples(vocab: int = 102) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate((9, 33, 17, 64, 5, 40)):
        ids = torch.randint(6, vocab, (n,), generator=gen).tolist()
        mask = [0] * n
        for start, stop in [(2, 6), (10, 20), (25, 30)][: 1 + i % 3]:
            for t in range(start, min(stop, n)):
                mask[t] = 1
        out.append(TokenizedExample(f"ex{i}", ids, mask))
    return out


def rel_err(x, ref) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max())


def correctness(device: torch.device) -> None:
    config = FeatureConfig(proj_dim_in=16, proj_dim_out=16, seed=5)
    for arch in ("llama", "gpt2"):
        ref_model = make_tiny_model(arch, hidden_size=64, intermediate_size=128, seed=2).double()
        ref_fz = GradientFeaturizer(ref_model, config)
        for side in ("right", "left"):
            batch = collate(examples(), pad_token_id=0, padding_side=side)
            ref = ref_fz.featurize(batch)
            cases = [("float32", torch.float32, None), ("bf16 autocast", torch.float32, "bfloat16")]
            if device.type == "cuda":
                cases.insert(0, ("float64", torch.float64, None))
            for label, dtype, autocast in cases:
                model = make_tiny_model(arch, hidden_size=64, intermediate_size=128, seed=2).to(device, dtype)
                fz = GradientFeaturizer(model, FeatureConfig(**{**config.to_dict(), "autocast_dtype": autocast,
                                                              "module_patterns": ()}))
                if label == cases[0][0]:
                    same = all(
                        torch.equal(fz._proj_t[t.name][0].cpu().double(), ref_fz._proj_t[t.name][0])
                        and torch.equal(fz._proj_t[t.name][1].cpu().double(), ref_fz._proj_t[t.name][1])
                        for t in fz.modules
                    )
                    check(same, f"{arch}: projections on {device.type} equal the CPU ones bit for bit")
                out = fz.featurize(batch)
                err = rel_err(out.features, ref.features)
                loss_err = float((out.loss.double() - ref.loss).abs().max())
                cos = torch.nn.functional.cosine_similarity(out.features.double(), ref.features, dim=1).min()
                tol = {"float64": 1e-10, "float32": 1e-4, "bf16 autocast": 5e-2}[label]
                check(out.bad == [None] * len(out.bad) and err < tol and float(cos) > 1 - tol,
                      f"{arch} {side}-padded {label} on {device.type}: max rel err {err:.2e}, min cosine "
                      f"{float(cos):.6f}, loss err {loss_err:.1e} (tol {tol:g})")


def peak_memory_gib(model, batch, featurizer) -> dict:
    """Peak CUDA memory (GiB) of one step of a / b / c."""
    params = list(model.parameters())
    mem = {}
    for key in ("a", "b", "c"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if key == "a":
            plain_step(model, batch)
        elif key == "b":
            featurizer.featurize(batch)
        else:
            for p in params:
                p.requires_grad_(False)
            frozen_step(model, batch)
            for p in params:
                p.requires_grad_(True)
        torch.cuda.synchronize()
        mem[key] = torch.cuda.max_memory_allocated() / 2**30
    return mem


def throughput(device: torch.device, quick: bool) -> None:
    if device.type != "cuda":
        print("\nthroughput on CUDA: SKIPPED (no CUDA device); use benchmarks/throughput.py on CPU")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    size = dict(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816)
    batch_size, seq_len = (8, 256) if quick else (16, 512)
    for dtype in (torch.float32, torch.bfloat16):
        model = make_tiny_model("llama", vocab_size=32000, max_positions=4096, **size).to(device, dtype).eval()
        n_params = sum(p.numel() for p in model.parameters())
        batch = make_batch(batch_size, seq_len, 32000, seq_len // 4, device)
        featurizer = GradientFeaturizer(model, FeatureConfig())
        mem = peak_memory_gib(model, batch, featurizer)
        secs = measure(model, batch, featurizer, repeats=5 if quick else 10)["wall"]
        tok = batch_size * seq_len
        print(f"\nLlama {n_params / 1e6:.0f}M params, {dtype}, batch {batch_size} x {seq_len}, "
              f"{len(featurizer.modules)} modules x 16x16 (D = {featurizer.dim}):")
        for key, label in (("a", "plain fwd+bwd"), ("b", "features"), ("c", "frozen floor")):
            print(f"  ({key}) {label:14s} {batch_size / secs[key]:9.1f} ex/s {tok / secs[key]:11.0f} tok/s "
                  f"({secs[key] * 1000:.1f} ms/batch, peak GPU memory {mem[key]:.2f} GiB)")
        print(f"  ratio b/a = {secs['a'] / secs['b']:.3f}   b/c = {secs['c'] / secs['b']:.3f}")
        del model, featurizer
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller throughput batch")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    else:
        device = torch.device("cpu")
        print(f"CUDA is not available (torch {torch.__version__}): the CUDA checks are SKIPPED; running the CPU "
              "float32 / bf16-autocast checks against float64 only.")
    print("\ncorrectness against CPU float64:")
    correctness(device)
    throughput(device, args.quick)
    print(f"\n{len(FAILURES)} failure(s); {time.perf_counter() - start:.0f} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
