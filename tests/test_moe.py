"""Fused mixture-of-experts weights (transformers 5): coverage, and tracked expert features against float64 autograd.

Tiny random Qwen3-MoE, Mixtral and GPT-OSS models are built from their configs (real transformers classes, nothing
downloaded). Qwen3-MoE and Mixtral store W_e as [out, in] (gate_up [E, 2I, H]); GPT-OSS stores it transposed
([E, H, 2I]) with biases and an interleaved gate/up activation.
"""

from __future__ import annotations

import pytest
import torch

from drift_stream.data.example_types import TokenizedExample
from drift_stream.data.tokenization import collate
from drift_stream.embedded.tiny_models import make_tiny_model
from drift_stream.errors import ConfigError
from drift_stream.grads.coverage import coverage_warning, parameter_coverage
from drift_stream.grads.features import GradientFeaturizer
from drift_stream.grads.projection import FeatureConfig

torch.set_num_threads(1)

VOCAB = 102

H, HEAD_DIM, HEADS, KV_HEADS, LAYERS, EXPERTS, TOP_K, I_EXPERT = 32, 8, 4, 2, 2, 4, 2, 16
MOE_ARCHS = ["qwen3_moe", "mixtral", "gpt_oss"]


def make_moe(arch: str, dtype=torch.float64, experts_implementation: str = "eager", seed: int = 1):
    import transformers as tf

    common = {"vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "num_experts_per_tok": TOP_K,
              "max_position_embeddings": 256, "pad_token_id": 0, "tie_word_embeddings": False}
    if arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(num_experts=EXPERTS, moe_intermediate_size=I_EXPERT, intermediate_size=64,
                                   decoder_sparse_step=1, mlp_only_layers=[], **common)
        cls = tf.Qwen3MoeForCausalLM
    elif arch == "mixtral":
        config = tf.MixtralConfig(num_local_experts=EXPERTS, intermediate_size=I_EXPERT, **common)
        cls = tf.MixtralForCausalLM
    elif arch == "gpt_oss":
        # rope_parameters: YaRN with factor 1 over the tiny context (the default factor 32 warns at 256 positions)
        config = tf.GptOssConfig(num_local_experts=EXPERTS, intermediate_size=I_EXPERT, sliding_window=8,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 1.0,
                                                  "original_max_position_embeddings": 256, "beta_fast": 32.0,
                                                  "beta_slow": 1.0, "truncate": False},
                                 **common)
        cls = tf.GptOssForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    if arch == "gpt_oss":  # transformers initialises the biases to 0: make them matter in the forward
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "sinks")):
                    p.normal_(0.0, 0.1)
    model.set_experts_implementation(experts_implementation)
    return model.to(dtype).eval()


def make_examples(lengths=(9, 17, 13, 6, 21, 11), seed=0) -> list[TokenizedExample]:
    """Mixed lengths; 1-3 separate target spans per row (as in test_grads.py)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(6, VOCAB, (n,), generator=gen).tolist()
        mask = [0] * n
        for start, stop in [(2, 4), (6, 9), (12, 15)][: 1 + i % 3]:
            for t in range(start, min(stop, n - 1 if i % 2 else n)):
                mask[t] = 1
        examples.append(TokenizedExample(id=f"ex{i}", input_ids=ids, loss_mask=mask))
    return examples


def experts_of(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def explicit_features(model, featurizer: GradientFeaturizer, example):
    """One backward per example on the unpadded sequence: P_out G P_in^T for every tracked entry (linears and
    per-expert weights), G the autograd gradient of that example's mean NLL."""
    ids = torch.tensor([example.input_ids])
    mask = torch.tensor(example.loss_mask[1:], dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    ((nll * mask).sum() / mask.sum()).backward()
    modules = dict(model.named_modules())
    parts, expert_parts = [], []
    for t in featurizer.modules:
        p_in, p_out = featurizer.projection_matrices(t.name)
        if t.kind == "expert":
            experts = modules[t.host]
            grad = getattr(experts, t.param).grad[t.expert]  # [out, in], or [in, out] when transposed (GPT-OSS)
            if experts.is_transposed:
                grad = grad.T
        else:
            grad = modules[t.name].weight.grad
        assert grad.shape == (t.out_features, t.in_features), t
        block = (p_out.double() @ grad @ p_in.double().T).reshape(-1)
        parts.append(block)
        if t.kind == "expert":
            expert_parts.append(block)
    model.zero_grad(set_to_none=True)
    return torch.cat(parts), torch.cat(expert_parts)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_features_equal_explicit_per_example_gradients(arch, implementation, padding_side):
    # The reference runs the model's own experts kernel (`implementation`); the featurizer runs its eager-form
    # forward (grads/experts.py) with hooks. grouped_mm has no float64 kernel on the CPU, so it is not a reference.
    model = make_moe(arch, experts_implementation=implementation)
    featurizer = GradientFeaturizer(model, FeatureConfig(proj_dim_in=8, proj_dim_out=4, seed=3, track_experts=True))
    expert_entries = [t for t in featurizer.modules if t.kind == "expert"]
    assert len(expert_entries) == LAYERS * 2 * EXPERTS
    examples = make_examples()
    out = featurizer.featurize(collate(examples, pad_token_id=0, padding_side=padding_side))
    assert out.features.dtype == torch.float64 and out.bad == [None] * len(examples)
    starts = {t.name: i * 32 for i, t in enumerate(featurizer.modules)}
    expert_cols = torch.cat([torch.arange(starts[t.name], starts[t.name] + 32) for t in expert_entries])
    routed = 0
    for i, example in enumerate(examples):
        ref, ref_experts = explicit_features(model, featurizer, example)
        assert ref_experts.abs().max() > 1e-3  # the check below is not vacuous
        routed += int((ref_experts.reshape(-1, 32).abs().amax(dim=1) > 0).sum())
        # float64: the batched hooked sums and the per-example backward add the same terms in different orders
        # (padding, token sums, index_add vs grouped sums), through exp/sigmoid/softmax; such sums differ by a few
        # hundred ulps (~1e-13 relative), and by up to 1e-11 across CPUs (STYLE.md): rtol 1e-9, atol 1e-11 x scale.
        scale = float(ref.abs().max())
        torch.testing.assert_close(out.features[i], ref, rtol=1e-9, atol=1e-11 * scale)
        torch.testing.assert_close(out.features[i, expert_cols], ref_experts, rtol=1e-9, atol=1e-11 * scale)
    # top-2 of 4 experts: each example reaches several experts, and not every (example, expert) pair
    assert len(examples) * LAYERS * 2 < routed < len(examples) * len(expert_entries)
    assert all("forward" not in m.__dict__ for m in experts_of(model))


def _param_counts(arch):
    """Explicit parameter counts of make_moe(arch) from its config sizes: (attention linear weights, expert
    weights, every parameter)."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    attn = LAYERS * (H * q + 2 * H * kv + q * H)
    experts = LAYERS * EXPERTS * (H * 2 * I_EXPERT + I_EXPERT * H)
    emb = 2 * VOCAB * H  # untied embedding and head
    norms = LAYERS * 2 * H + H
    router = LAYERS * EXPERTS * H
    extra = {
        "qwen3_moe": LAYERS * 2 * HEAD_DIM,  # q_norm, k_norm
        "mixtral": 0,
        # attention biases, sinks, router bias, expert biases
        "gpt_oss": LAYERS * ((q + 2 * kv + H) + HEADS + EXPERTS + EXPERTS * (2 * I_EXPERT + H)),
    }[arch]
    return attn, experts, attn + experts + emb + norms + router + extra


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_coverage_rises_with_track_experts(arch):
    model = make_moe(arch, torch.float32)
    attn, experts, total = _param_counts(arch)
    assert total == sum(p.numel() for p in model.parameters())
    off = GradientFeaturizer(model).coverage()
    on = GradientFeaturizer(model, FeatureConfig(track_experts=True)).coverage()
    assert (off["covered_parameters"], off["total_parameters"], off["counted"]) == (attn, total, "trainable")
    assert on["covered_parameters"] == attn + experts and on["total_parameters"] == total
    assert off["share"] == pytest.approx(attn / total, rel=1e-12)
    assert on["share"] == pytest.approx((attn + experts) / total, rel=1e-12)
    assert on["share"] > 2 * off["share"]
    fused = [s["name"] for s in off["skipped"] if s["reason"] == "fused_experts"]
    assert fused == [f"model.layers.{i}.mlp.experts.{w}" for i in range(LAYERS) for w in ("gate_up_proj", "down_proj")]
    assert off["skipped_by_reason"]["fused_experts"] == experts
    assert not any(s["reason"] == "fused_experts" for s in on["skipped"])
    message = coverage_warning(off)
    assert "model.layers.*.mlp.experts.gate_up_proj" in message and "model.layers.*.mlp.experts.down_proj" in message
    assert f"{100 * off['share']:.1f}%" in message and "track_experts" in message
    assert coverage_warning(on) is None
    if arch == "gpt_oss":  # expert biases stay skipped: counted as not covered
        q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        biases = LAYERS * ((q + 2 * kv + H) + EXPERTS + EXPERTS * (2 * I_EXPERT + H))
        assert on["skipped_by_reason"]["bias"] == biases


def test_coverage_of_dense_models():
    model = make_tiny_model("llama", seed=1)  # 2 blocks, hidden 32, MLP 64, vocab 102, untied head
    linears = 2 * (4 * 32 * 32 + 3 * 32 * 64)
    total = linears + 2 * 102 * 32 + 2 * 2 * 32 + 32
    cov = GradientFeaturizer(model).coverage()
    assert (cov["covered_parameters"], cov["total_parameters"]) == (linears, total)
    assert {s["name"]: s["reason"] for s in cov["skipped"]} == {"model.embed_tokens.weight": "embedding",
                                                               "lm_head.weight": "lm_head"}
    assert coverage_warning(cov) is None  # embeddings and head are left out by design: recorded, no warning
    last = GradientFeaturizer(model, FeatureConfig(last_n_blocks=1)).coverage()
    assert last["covered_parameters"] == linears // 2 and last["skipped_by_reason"]["not_selected"] == linears // 2
    tied = make_tiny_model("llama", seed=1, tie_word_embeddings=True)
    cov = GradientFeaturizer(tied).coverage()
    assert cov["total_parameters"] == total - 102 * 32  # the tied head is the embedding: counted once
    assert cov["skipped_by_reason"] == {"embedding": 102 * 32, "not_hooked": 2 * 2 * 32 + 32}


def test_coverage_counts_trainable_parameters_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model("llama", seed=1),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    cov = GradientFeaturizer(model).coverage()
    adapters = 2 * (2 * (4 * 32 + 32 * 4) + (4 * 64 + 32 * 4))  # (q, v: 32 -> 32; down: 64 -> 32) x 2 blocks
    assert (cov["counted"], cov["covered_parameters"], cov["total_parameters"]) == ("trainable", adapters, adapters)
    frozen = make_tiny_model("llama", seed=1).requires_grad_(False)
    assert parameter_coverage(frozen, {})["counted"] == "all"


def test_track_experts_config_keeps_old_fingerprints_and_selects_by_pattern():
    assert "track_experts" not in FeatureConfig().to_dict()  # banks built before the option keep their spec
    on = FeatureConfig(track_experts=True)
    assert FeatureConfig(**on.to_dict()) == on
    with pytest.raises(ConfigError, match="track_experts"):
        FeatureConfig(track_experts="yes")
    model = make_moe("qwen3_moe", torch.float32)
    plain, tracked = GradientFeaturizer(model), GradientFeaturizer(model, on)
    assert "track_experts" not in plain.spec()["config"] and tracked.spec()["config"]["track_experts"] is True
    assert tracked.dim == plain.dim + LAYERS * 2 * EXPERTS * 256
    down = GradientFeaturizer(model, FeatureConfig(track_experts=True, module_patterns=("*.experts.down_proj",)))
    assert [t.name for t in down.modules] == [f"model.layers.{i}.mlp.experts.down_proj.{e}"
                                              for i in range(LAYERS) for e in range(EXPERTS)]
    assert down.coverage()["covered_parameters"] == LAYERS * EXPERTS * I_EXPERT * H
    one = GradientFeaturizer(model, FeatureConfig(track_experts=True, module_patterns=("*.experts.gate_up_proj.0",)))
    cov = one.coverage()  # one expert of each fused gate_up weight: its slice covered, the rest listed as skipped
    assert cov["covered_parameters"] == LAYERS * 2 * I_EXPERT * H
    gate_up = [s for s in cov["skipped"] if s["name"].endswith("gate_up_proj")]
    assert [s["numel"] for s in gate_up] == [(EXPERTS - 1) * 2 * I_EXPERT * H] * LAYERS
    # only experts tracked: the autograd graph starts at the experts' own up projections
    features = down.featurize(collate(make_examples(), 0)).features
    assert features.abs().max() > 1e-4


def test_grouped_mm_model_float32_matches_eager_and_forward_is_restored():
    """The default experts kernel (grouped_mm) in float32: the same features as the eager model, forward restored
    after success and after an error."""
    examples = make_examples()
    batch = collate(examples, 0, "left")
    config = FeatureConfig(track_experts=True)
    grouped = make_moe("gpt_oss", torch.float32, experts_implementation="grouped_mm")
    eager = make_moe("gpt_oss", torch.float32, experts_implementation="eager")
    a, b = GradientFeaturizer(grouped, config), GradientFeaturizer(eager, config)
    fa, fb = a.featurize(batch), b.featurize(batch)
    assert fa.features.abs().max() > 1e-3
    # float32, same operations in the same order on both models (the featurizer's forward): equal to rounding
    torch.testing.assert_close(fa.features, fb.features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fa.loss, a.loss_only(batch)[0], rtol=1e-5, atol=1e-6)  # loss_only: grouped_mm kernel
    bad = collate(examples, 0)
    bad["input_ids"][0, 3] = VOCAB + 50
    with pytest.raises(IndexError):
        a.featurize(bad)
    assert all("forward" not in m.__dict__ for m in experts_of(grouped))
    assert all(p.requires_grad for p in grouped.parameters())
