"""GPU check of the gradient engine (< 2 minutes on one H200): correctness on CUDA, then throughput.

1. Projections built for a CUDA model equal the CPU ones bit for bit (they are drawn on the CPU by design).
2. Features on CUDA match CPU float64 ground truth: float64 on CUDA (tight), float32 (TF32 off), bf16 autocast
   (float32 accumulation), for Llama and GPT-2 (Conv1D), with left and right padding and multi-turn masks.
3. Throughput on CUDA of (a) plain forward+backward, (b) feature extraction, (c) frozen-weight floor, on a larger
   Llama (about 0.2B parameters), float32 and bf16, with peak GPU memory.
4. Real shape: a Qwen2.5-0.5B-shaped random model (24 layers, hidden 896, vocabulary 151,936, tied embeddings):
   projections on CUDA equal the CPU ones bit for bit; bf16 features against float32 ones (relative error per row);
   tokens/s and peak GPU memory of features vs the frozen floor (LM head at loss positions only) and a plain
   forward+backward, 25% of tokens in the loss. Without CUDA, a 2-layer version of the shape runs on the CPU
   (projections, bf16 vs float32) so that the section is exercised.

Without CUDA, runs the CPU part (float32 vs float64) and says what it skipped. Exit status 1 if a check fails.

    python benchmarks/gpu_check.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

# Keep this folder off the front of sys.path: a script here named like a stdlib module would shadow it.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.append(sys.path.pop(0))
import time

import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from throughput import frozen_step, make_batch, measure, plain_step  # noqa: E402
from throughput_shapes import floor_step  # noqa: E402

from drift_stream.data.example_types import TokenizedExample  # noqa: E402
from drift_stream.data.tokenization import collate
from drift_stream.embedded.tiny_models import make_tiny_model  # noqa: E402
from drift_stream.grads.features import GradientFeaturizer
from drift_stream.grads.projection import FeatureConfig  # noqa: E402

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


def qwen05b_shaped(num_layers: int = 24):
    """A random model with Qwen2.5-0.5B's shapes (no weights are downloaded: the config is written out here)."""
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=num_layers,
                            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                            rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(config).eval()


def _timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory GiB on CUDA else NaN) of fn() after one warm-up."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def real_shape(device: torch.device, quick: bool) -> None:
    """Section 4 (see the module docstring)."""
    cuda = device.type == "cuda"
    layers = 24 if cuda else 2
    batch_size, seq_len = ((4, 1024) if quick else (8, 2048)) if cuda else (2, 128)
    print(f"\nreal shape: Qwen2.5-0.5B-shaped, {layers} layers, vocab 151,936, batch {batch_size} x {seq_len}, 25% of "
          f"tokens in the loss, on {device.type}" + ("" if cuda else " (CPU stand-in: 2 layers, short rows)"))
    config = FeatureConfig(proj_dim_in=16, proj_dim_out=16, seed=5)
    cpu_model = qwen05b_shaped(layers)
    cpu_fz = GradientFeaturizer(cpu_model, config)
    batch = make_batch(batch_size, seq_len, 151_936, seq_len - seq_len // 4, device)
    f32 = cpu_model.to(device, torch.float32)
    fz32 = GradientFeaturizer(f32, config)
    same = all(torch.equal(fz32._proj_t[t.name][0].cpu(), cpu_fz._proj_t[t.name][0].cpu())
               and torch.equal(fz32._proj_t[t.name][1].cpu(), cpu_fz._proj_t[t.name][1].cpu()) for t in fz32.modules)
    check(same, f"projections of the {len(fz32.modules)} modules on {device.type} equal the CPU-built ones bit for bit")
    ref = fz32.featurize(batch)
    bf16 = qwen05b_shaped(layers).to(device, torch.bfloat16)
    out = GradientFeaturizer(bf16, config).featurize(batch)
    rel = (out.features - ref.features).norm(dim=1) / ref.features.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(out.features.double(), ref.features.double(), dim=1)
    # bf16 (u = 2**-9) through `layers` blocks forward and backward: ~u * sqrt(10 * layers) expected, ~1% at 2 blocks
    # (measured 1.5% per row on the CPU at this width; the tiny-model unit test's bound is 2%) and ~3-5% at 24.
    bound = 0.04 if layers <= 2 else 0.1
    check(out.bad == [None] * batch_size and float(rel.max()) < bound,
          f"bf16 features vs float32: max relative error per row {float(rel.max()):.2e} (bound {bound:g}), min "
          f"cosine {float(cos.min()):.5f}, loss rel err {float(((out.loss - ref.loss).abs() / ref.loss).max()):.1e}")
    if not cuda:
        print("  tokens/s and peak GPU memory: SKIPPED (no CUDA device); benchmarks/throughput.py --real measures "
              "the CPU figures")
        return
    del f32, fz32
    torch.cuda.empty_cache()
    featurizer = GradientFeaturizer(bf16, config)
    params = list(bf16.parameters())
    tokens = batch_size * seq_len
    rows = {}
    for key, fn in (("features", lambda: featurizer.featurize(batch)), ("floor", lambda: floor_step(bf16, batch)),
                    ("plain", lambda: plain_step(bf16, batch))):
        for p in params:
            p.requires_grad_(key == "plain")
        try:
            rows[key] = _timed(fn, device, 3 if quick else 5)
        except torch.cuda.OutOfMemoryError:
            rows[key] = (float("nan"), float("nan"))
            print(f"  ({key}) out of GPU memory")
        bf16.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    for key, (secs, peak) in rows.items():
        print(f"  {key:9s} {tokens / secs:11.0f} tok/s ({secs * 1000:.1f} ms/batch), peak GPU memory {peak:.2f} GiB")
    (fs, fm), (cs, cm) = rows["features"], rows["floor"]
    print(f"  features / floor: {cs / fs:.3f}x the throughput, {fm / cm:.3f}x the peak memory")


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
    real_shape(device, args.quick)
    print(f"\n{len(FAILURES)} failure(s); {time.perf_counter() - start:.0f} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
