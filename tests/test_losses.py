"""The one per-example loss (drift_stream.model.losses) against the model's full logits, in float64.

Covers models that do something after the LM head (Gemma2/Gemma3 final-logit soft-capping, Cohere's logit_scale,
Granite's logits_scaling), tied embeddings, left/right padding, chunk boundaries, rows without loss tokens,
gradients (frozen head: features; trainable head: training) and the full-logits fallback for an unknown head.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf

from drift_stream.data.example_types import TokenizedExample
from drift_stream.data.tokenization import collate
from drift_stream.embedded.tiny_models import make_tiny_model
from drift_stream.grads.features import GradientFeaturizer
from drift_stream.grads.projection import FeatureConfig
from drift_stream.model.losses import example_losses, prepare_batch, resolve_head

VOCAB = 102
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=128, pad_token_id=0, eos_token_id=5, bos_token_id=5)


def make_model(arch: str, dtype=torch.float64, seed: int = 1):
    """Tiny random models; the post-head transforms use values that change the logits a lot (|z| ~ 0.2-2)."""
    torch.manual_seed(seed)
    if arch == "gemma2":  # soft-capping at 0.3: tanh(z / 0.3) is far from linear at |z| ~ 0.25
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=8, final_logit_softcapping=0.3, **_COMMON))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, final_logit_softcapping=0.3, **_COMMON))
    elif arch == "cohere":  # logits * 3
        model = tf.CohereForCausalLM(tf.CohereConfig(logit_scale=3.0, **_COMMON))
    elif arch == "granite":  # logits / 0.25
        model = tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=0.25, **_COMMON))
    elif arch == "llama_tied":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=True, **_COMMON))
    else:
        model = make_tiny_model(arch, seed=seed)
    return model.to(dtype).eval()


ARCHS = ["llama", "gpt2", "gemma2", "gemma3", "cohere", "granite", "llama_tied"]
# Gemma2's own eager attention turns left-padded float64 rows into NaN (two float64-min masks add up to -inf, a
# fully masked padding row then has NaN values that real positions multiply by 0): its full logits are NaN too.
SIDES = {arch: ("right",) if arch == "gemma2" else ("right", "left") for arch in ARCHS}


def make_examples(lengths=(9, 17, 13, 6, 21, 11), seed=0) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(6, VOCAB, (n,), generator=gen).tolist()
        mask = [0] * n
        for start, stop in [(2, 4), (6, 9), (12, 15)][: 1 + i % 3]:
            for t in range(start, min(stop, n)):
                mask[t] = 1
        examples.append(TokenizedExample(id=f"ex{i}", input_ids=ids, loss_mask=mask))
    return examples


def full_logits_loss(model, example: TokenizedExample):
    """Explicit reference: the model's own full [T, V] logits on the unpadded row, mean NLL over masked targets."""
    ids = torch.tensor([example.input_ids])
    mask = torch.tensor(example.loss_mask[1:], dtype=torch.float64)
    logits = model(input_ids=ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return (nll * mask).sum() / mask.sum(), nll * mask


EPS64 = torch.finfo(torch.float64).eps  # 2.2e-16
EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7


def gamma(n: int, eps: float = EPS64) -> float:
    """Higham's gamma_n = n u / (1 - n u), u = eps / 2: the worst relative error of a sum or dot product of n terms,
    whatever the order of its additions (blocking, vector width, BLAS kernel: what differs by CPU)."""
    u = eps / 2
    return n * u / (1 - n * u)


def head_scale(model, batch) -> tuple[float, float]:
    """(S, Z): S = max_{t,v} sum_j |h_tj W_vj| * (logit_scale / logits_scaling), the size of the terms of any logit
    before soft-capping, and Z = max |logit| after it; from the head's own input on `batch` (float64)."""
    head, seen = model.get_output_embeddings(), {}
    hook = head.register_forward_hook(lambda module, args, out: seen.setdefault("h", args[0].detach()))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    finally:
        hook.remove()
    spec = resolve_head(model)
    factor = (spec.scale or 1.0) / (spec.divide or 1.0)
    size = (seen["h"].abs() @ head.weight.detach().abs().T).amax().item() * abs(factor)
    return size, logits[torch.isfinite(logits)].abs().max().item()


def head_nll_bound(model, batch) -> float:
    """How far two float64 evaluations of one token's NLL from the same hidden state h may differ (the split head
    here, the model's full logits in the reference), whatever either's order of additions.

    Per evaluation: each logit u = h . W_v (D terms) is off by gamma_D * S; scale / divide and cap * tanh(. / cap) do
    not amplify an error (|tanh'| <= 1) and add a few roundings of |z| <= Z; logsumexp over V logits after the max
    (V exps, a V-term sum, a log) and the mean over T tokens add gamma_{V+T+8} of |NLL| + 1, with |NLL| <= 2 Z +
    log V. NLL = logsumexp - z_target counts the logit error twice. Two evaluations: twice that. Here (D 32, V 102,
    T 21) about 3e-13, where 1e-15 is seen: a planted error of 1e-6 in one logit is 1e6 times over it.
    """
    size, z_max = head_scale(model, batch)
    dim, vocab, width = model.get_output_embeddings().weight.shape[1], VOCAB, batch["input_ids"].shape[1]
    nll_max = 2 * z_max + torch.log(torch.tensor(float(vocab))).item()
    one = 2 * (gamma(dim) * size + gamma(4) * z_max) + gamma(vocab + width + 8) * (nll_max + 1)
    return 2 * one


def float32_forward(model) -> bool:
    """Gemma2's forward is float32 in places even for a float64 model: transformers' eager attention (which Gemma2
    needs for its attention soft-capping) runs its softmax in float32, and its RMSNorms compute in float32."""
    return isinstance(model, tf.Gemma2ForCausalLM)


def row_vs_batch_bound(model, batch) -> float:
    """How far the model's own NLL of a row alone may differ from the same row inside a padded batch.

    float64 throughout: only the order of float64 additions differs, head_nll_bound covers it. Gemma2 (see
    float32_forward): the padded batch sums each attention softmax over another width than the row alone (another
    vector width and tail: what differs by CPU), so the float32 parts are rounded differently and the hidden state
    h agrees only to float32: per layer, one softmax (exp, a sum of <= T terms, a divide) and four RMSNorms (a cast,
    a mean of D squares, rsqrt, two products) each rounding at most gamma_{T+3} + 4 gamma_{D+5} relative in float32,
    L layers and the final norm in a residual stack: |dh| <= (L + 1) (gamma_{T+3} + 4 gamma_{D+5}) |h|, so every logit
    moves by that times S and the NLL by twice that, per evaluation. Here about 2e-5 (worst case), where 1e-8 is seen.
    """
    if not float32_forward(model):
        return head_nll_bound(model, batch)
    size, _ = head_scale(model, batch)
    layers, dim, width = model.config.num_hidden_layers, model.config.hidden_size, batch["input_ids"].shape[1]
    rel_h = (layers + 1) * (gamma(width + 3, EPS32) + 4 * gamma(dim + 5, EPS32))
    return 2 * (2 * rel_h * size) + head_nll_bound(model, batch)


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_equal_full_logits_float64(arch):
    model = make_model(arch)
    head = resolve_head(model)
    assert head is not None  # the split path is the one under test, not the fallback
    if arch in ("gemma2", "gemma3"):
        assert head.softcap == 0.3
    if arch == "cohere":
        assert head.scale == 3.0
    if arch == "granite":
        assert head.divide == 0.25
    if arch in ("gpt2", "gemma2", "llama_tied", "cohere"):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    examples = make_examples()
    refs = [full_logits_loss(model, ex) for ex in examples]
    for side in SIDES[arch]:
        batch = collate(examples, 0, side)
        # Two references: the model's full logits on the same padded batch (the same h: only the head's float64
        # rounding differs, head_nll_bound), and on each row alone (padding and positions; row_vs_batch_bound)
        batched = batched_full_logits_losses(model, batch)
        same_h, alone = head_nll_bound(model, batch), row_vs_batch_bound(model, batch)
        for chunk in (None, 1, 5):  # chunk boundaries inside and across rows
            with torch.no_grad():
                out = example_losses(model, batch, chunk_tokens=chunk, return_token_nll=True)
            assert out.loss.dtype == torch.float64
            torch.testing.assert_close(out.loss, batched, rtol=0, atol=same_h)
            for i, ex in enumerate(examples):
                torch.testing.assert_close(out.loss[i], refs[i][0], rtol=0, atol=alone)
                assert int(out.num_tokens[i]) == sum(ex.loss_mask)
                n = len(ex.input_ids)
                row = out.token_nll[i, 1:n] if side == "right" else out.token_nll[i, -n + 1:]
                torch.testing.assert_close(row, refs[i][1], rtol=0, atol=alone)


def test_rows_without_loss_tokens_are_nan_and_others_unaffected():
    model = make_model("llama")
    examples = make_examples()
    examples[2] = TokenizedExample("none", examples[2].input_ids, [0] * len(examples[2].input_ids))
    with torch.no_grad():
        out = example_losses(model, collate(examples, 0))
        alone = example_losses(model, collate(examples[:2], 0))
    assert bool(torch.isnan(out.loss[2])) and int(out.num_tokens[2]) == 0
    assert bool(torch.isfinite(out.loss[[0, 1, 3, 4, 5]]).all())
    torch.testing.assert_close(out.loss[:2], alone.loss, rtol=1e-12, atol=1e-12)
    none = [TokenizedExample(f"n{i}", ex.input_ids, [0] * len(ex.input_ids)) for i, ex in enumerate(examples[:3])]
    assert bool(torch.isnan(example_losses(model, collate(none, 0)).loss).all())  # no loss token anywhere
    assert GradientFeaturizer(model).featurize(collate(none, 0)).bad == ["no_loss_tokens"] * 3
    with pytest.raises(ValueError, match="loss_mask is 1 on a padding position"):
        bad = collate(examples[:2], 0)
        bad["loss_mask"][0, -1] = 1
        bad["attention_mask"][0, -1] = 0
        prepare_batch(bad, "cpu")


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "llama"])
def test_training_gradients_equal_full_logits(arch):
    """Head requires grad (training, tied or not): per-chunk recompute gives the exact parameter gradients."""
    model = make_model(arch)
    examples = make_examples()
    weights = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5, 0.25], dtype=torch.float64)
    batch = collate(examples, 0, SIDES[arch][-1])
    out = example_losses(model, batch, chunk_tokens=4)
    (weights * out.loss).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (weights * batched_full_logits_losses(model, batch)).sum().backward()  # same padded batch: see there
    head_name = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    assert model.get_output_embeddings().weight.grad.abs().max() > 1e-6  # the head's gradient is checked too
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert head_name in ours
    model.zero_grad(set_to_none=True)


def batched_full_logits_losses(model, batch):
    """Reference on a padded batch: the model's own [B, T, V] logits, mean NLL over masked targets per row [B].

    Used where Gemma's RMSNorm (float32 even in a float64 model) makes per-row references differ from any batched
    computation by float32 summation order (~1e-7 relative on gradients).
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    mask = batch["loss_mask"][:, 1:].double()
    return (nll * mask).sum(1) / mask.sum(1)


def explicit_features(model, featurizer, batch, row: int):
    """P_out G P_in^T from one backward of row `row`'s full-logits loss (float64)."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    batched_full_logits_losses(model, batch)[row].backward()
    names = dict(model.named_modules())
    parts = []
    for t in featurizer.modules:
        p_in, p_out = featurizer.projection_matrices(t.name)
        parts.append((p_out.double() @ names[t.name].weight.grad @ p_in.double().T).reshape(-1))
    model.zero_grad(set_to_none=True)
    return torch.cat(parts)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "cohere", "granite", "llama_tied"])
def test_features_equal_full_logits_gradients(arch):
    """Frozen head (the featurizer): d NLL / d h from each chunk, then the hooks; equal to full-logits backward."""
    model = make_model(arch)
    featurizer = GradientFeaturizer(model, FeatureConfig(proj_dim_in=4, proj_dim_out=4, seed=2))
    examples = make_examples()
    batch = collate(examples, 0, SIDES[arch][-1])
    out = featurizer.featurize(batch)
    assert out.bad == [None] * len(examples)
    for i in range(len(examples)):
        ref = explicit_features(model, featurizer, batch, i)
        assert ref.abs().max() > 1e-4
        torch.testing.assert_close(out.features[i], ref, rtol=1e-9, atol=1e-12)
    # the same padded batch, so the same h: only the head's float64 rounding differs (the row alone: the test above)
    torch.testing.assert_close(out.loss, batched_full_logits_losses(model, batch).detach(), rtol=0,
                               atol=head_nll_bound(model, batch))


class _ScaledLlama(tf.LlamaForCausalLM):
    """A head transform the loss module does not know: logits * 2 + 0.5 inside forward."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0 + 0.5
        return out


def test_unknown_head_transform_falls_back_to_full_logits(caplog):
    torch.manual_seed(0)
    model = _ScaledLlama(tf.LlamaConfig(**_COMMON)).double().eval()
    examples = make_examples()
    with caplog.at_level(logging.WARNING, logger="drift_stream.model.losses"):
        assert resolve_head(model) is None
    assert "_ScaledLlama: using full [B, T, V] logits" in caplog.text
    with torch.no_grad():
        out = example_losses(model, collate(examples, 0, "left"), chunk_tokens=3)
    for i, ex in enumerate(examples):
        torch.testing.assert_close(out.loss[i], full_logits_loss(model, ex)[0], rtol=1e-12, atol=1e-12)


def test_every_caller_gives_the_same_loss():
    """The scorers' loss, the featurizer (loss_only and featurize) and the trainers' weighted loss are one function."""
    from drift_stream.model.losses import weighted_example_loss

    model = make_model("gemma2", torch.float32)
    examples = make_examples()
    batch = collate(examples, 0, "right")
    with torch.no_grad():
        out = example_losses(model, batch)
    seq, num = out.loss, out.num_tokens
    featurizer = GradientFeaturizer(model)
    only, num_only = featurizer.loss_only(batch)
    feat = featurizer.featurize(batch).loss
    # one-hot weights pick out each row's loss: w = e_i, denominator 1 -> l_i
    train = torch.stack([weighted_example_loss(model, batch, torch.eye(len(examples))[i], denominator=1).detach()
                         for i in range(len(examples))])
    assert seq.dtype == torch.float32 and torch.equal(num, num_only)
    torch.testing.assert_close(only, seq, rtol=0, atol=0)
    torch.testing.assert_close(feat, seq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(train, seq, rtol=1e-6, atol=1e-6)


def test_completion_logprobs_equal_generate_step_logits():
    """Rollout log-probs from the one loss equal those of generate()'s own step logits (left-padded prompts)."""
    from drift_stream.model.losses import completion_logprobs

    model = make_model("llama")
    prompts = [[7, 8, 9, 10, 11], [12, 13, 14]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompts])).long()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    completions = out.sequences[:, width:].tolist()
    logp = torch.stack([torch.log_softmax(s.double(), -1) for s in out.logits], 1)  # [B, N, V]
    expected = logp.gather(-1, out.sequences[:, width:, None])[..., 0].mean(1)
    got = completion_logprobs(model, prompts, completions, pad_token_id=0, chunk_tokens=4)
    # generate()'s KV-cache steps differ from a full forward by ~1e-8 in float64 (Llama's rotary tables are
    # float32); against the full forward of prompt + completion the match is exact.
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ref, _ = full_logits_loss(model, TokenizedExample("r", p + c, [0] * len(p) + [1] * len(c)))
        torch.testing.assert_close(got[row], -ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite", "llama_tied"])
def test_fused_head_gradient_equals_autograd_through_the_head(arch):
    """The in-place softmax gradient (nn.Linear heads) equals autograd through the head's own forward, float64."""
    from drift_stream.model.losses import _frozen_head_nll

    model = make_model(arch)
    head = resolve_head(model)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 32, generator=gen, dtype=torch.float64) * 3  # large enough to saturate the cap
    targets = torch.randint(0, VOCAB, (7,), generator=gen)
    weights = torch.rand(7, generator=gen, dtype=torch.float64)
    results = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_(True)
        nll = _frozen_head_nll(head, h, targets, torch.float64, chunk=3, fused=fused)
        (grad,) = torch.autograd.grad((weights * nll).sum(), h)
        results.append((nll.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
    assert results[0][1].abs().max() > 1e-3
