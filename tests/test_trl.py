"""WeightedSFTTrainer against real TRL on a tiny model (CPU): plain-SFTTrainer equality, zero weights, explicit loss,
gradient accumulation, the masks TRL builds, refusals. SGD, not Adam, wherever parameters are compared: Adam divides
the gradient by its own scale, so a wrongly scaled loss would still give the same Adam step."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from drift_stream.embedded.tiny_models import (  # noqa: E402
    CHAT_TEMPLATE,
    make_char_tokenizer,
    make_tiny_model,
)
from drift_stream.errors import ConfigError, InputError  # noqa: E402
from drift_stream.integrations.trl import WeightedSFTTrainer  # noqa: E402

# The shipped template plus TRL's {% generation %} markers around what the assistant says (assistant_only_loss); the
# newline is an expression because the template engine trims the first newline after a block tag.
GENERATION_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEIGHTS = [1.5, 0.0, 0.5, 2.0, 1.0, 0.0, 0.25, 1.75, 1.0, 0.5, 3.0, 0.0]


def _rows(n, *, equal_length=False, layout="prompt_completion"):
    rows = []
    for i in range(n):
        q, a = f"Sum {i % 7} + {i % 3}?", f"{i % 7}+{i % 3}={i % 7 + i % 3}"
        if not equal_length:
            a = a + " ok" * (i % 4)  # 0-3 extra words: rows differ in loss tokens
        if layout == "prompt_completion":
            rows.append({"prompt": [{"role": "user", "content": q}],
                         "completion": [{"role": "assistant", "content": a}]})
        else:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def _dataset(rows, weights=None):
    if weights is not None:
        rows = [dict(r, weight=w) for r, w in zip(rows, weights)]
    return Dataset.from_list(rows)


def _tok(generation=False):
    tok = make_char_tokenizer()
    tok.chat_template = GENERATION_TEMPLATE if generation else CHAT_TEMPLATE
    return tok


def _config(tmp_path, *, batch=4, accum=1, steps=3, lr=0.5, **kw):
    return SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accum, max_steps=steps, learning_rate=lr, optim="sgd",
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=3, data_seed=3,
                     dataloader_num_workers=0, disable_tqdm=True, max_length=None, **kw)


def _train(cls, tmp_path, dataset, tok=None, **kw):
    trainer_kw = {k: kw.pop(k) for k in ("weighting",) if k in kw}
    model = make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, seed=0)
    trainer = cls(model=model, args=_config(tmp_path, **kw), train_dataset=dataset,
                  processing_class=tok or _tok(), **trainer_kw)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_params_close(a, b, rtol=1e-5, atol=1e-7):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_trained(before_seed0, after):  # the comparison is not between two untouched models
    moved = max(float((after[n] - before_seed0[n]).abs().max()) for n in after)
    assert moved > 1e-3, moved


def _init_params():
    model = make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, seed=0)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["prompt_completion", "messages"])
def test_all_ones_token_weighting_equals_plain_sft_trainer(tmp_path, layout):
    # prompt/completion: TRL's completion_only_loss mask; messages: assistant_only_loss with {% generation %}
    rows = _rows(12, layout=layout)
    extra = {"assistant_only_loss": True} if layout == "messages" else {}
    tok = _tok(generation=layout == "messages")
    plain_losses, plain = _train(SFTTrainer, tmp_path / "a", _dataset(rows), tok, **extra)
    ours_losses, ours = _train(WeightedSFTTrainer, tmp_path / "b", _dataset(rows, [1.0] * 12), tok,
                               weighting="token", **extra)
    assert ours_losses == pytest.approx(plain_losses, rel=1e-5)
    _assert_params_close(ours, plain)
    _assert_trained(_init_params(), ours)


def test_all_ones_example_weighting_equals_plain_sft_trainer_on_equal_length_rows(tmp_path):
    # per-example mean == token mean exactly when every row has the same number of loss tokens
    rows = _rows(12, equal_length=True)
    rows = [r for r in rows if len(r["completion"][0]["content"]) == 5]  # "a+b=c": 5 characters
    assert len(rows) >= 8
    plain_losses, plain = _train(SFTTrainer, tmp_path / "a", _dataset(rows))
    ours_losses, ours = _train(WeightedSFTTrainer, tmp_path / "b", _dataset(rows, [1.0] * len(rows)))
    assert ours_losses == pytest.approx(plain_losses, rel=1e-5)
    _assert_params_close(ours, plain)


def test_zero_weight_rows_equal_removing_them(tmp_path):
    rows = _rows(12)
    kept = [(r, w) for r, w in zip(rows, WEIGHTS) if w > 0]
    la, a = _train(WeightedSFTTrainer, tmp_path / "a", _dataset(rows, WEIGHTS))
    lb, b = _train(WeightedSFTTrainer, tmp_path / "b", _dataset([r for r, _ in kept], [w for _, w in kept]))
    assert la == lb
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the weights matter: all-ones training on the same kept rows differs
    lc, _ = _train(WeightedSFTTrainer, tmp_path / "c", _dataset([r for r, _ in kept], [1.0] * len(kept)))
    assert lc != la


def _explicit_loss(model, tok, rows, weights, weighting):
    """One unpadded float64 forward per row; the completion tokens by their own tokenization."""
    num, den = 0.0, 0
    for row, w in zip(rows, weights):
        prompt = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
        assert full[: len(prompt)] == prompt
        ids = torch.tensor([full])
        logits = model(input_ids=ids).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[len(prompt) - 1:]
        if weighting == "example":
            num, den = num + w * nll.mean(), den + 1
        else:
            num, den = num + w * nll.sum(), den + len(nll)
    return num / den


@pytest.mark.parametrize("weighting", ["example", "token"])
def test_weighted_loss_and_gradient_equal_explicit_computation(tmp_path, weighting):
    rows = _rows(8)
    weights = [0.5, 2.0, 1.0, 0.25, 1.5, 3.0, 0.75, 1.0]
    tok = _tok()
    model = make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, seed=1)
    trainer = WeightedSFTTrainer(model=model, args=_config(tmp_path, batch=8, shuffle_dataset=False),
                                 train_dataset=_dataset(rows, weights), processing_class=tok, weighting=weighting)
    batch = next(iter(trainer.get_train_dataloader()))
    order = [rows.index(r) for r in _rows_of_batch(tok, batch, rows)]  # the sampler shuffles
    assert sorted(order) == list(range(8))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    expected = _explicit_loss(model, tok, rows, weights, weighting)
    exp_grads = torch.autograd.grad(expected, [p for p in model.parameters()])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def _rows_of_batch(tok, batch, rows):
    texts = [tok.decode([t for t in ids.tolist() if t != tok.pad_token_id]) for ids in batch["input_ids"]]
    by_text = {tok.decode(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True,
                                                  return_dict=False)): r for r in rows}
    return [by_text[t] for t in texts]


@pytest.mark.parametrize("weighting", ["example", "token"])
def test_accumulation_1_vs_4_give_one_big_batch(tmp_path, weighting):
    rows, weights = _rows(12), WEIGHTS
    la, a = _train(WeightedSFTTrainer, tmp_path / "a", _dataset(rows, weights), batch=8, accum=1,
                   weighting=weighting)
    lb, b = _train(WeightedSFTTrainer, tmp_path / "b", _dataset(rows, weights), batch=2, accum=4,
                   weighting=weighting)
    assert lb == pytest.approx(la, rel=1e-5)
    _assert_params_close(a, b)
    _assert_trained(_init_params(), a)


def test_refusals(tmp_path):
    rows = _rows(4)
    model = make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, seed=0)
    with pytest.raises(ConfigError, match="packing"):
        WeightedSFTTrainer(model=model, args=_packing_config(tmp_path), train_dataset=_dataset(rows, [1.0] * 4),
                           processing_class=_tok())
    with pytest.raises(InputError, match="no 'weight' column"):
        WeightedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(rows), processing_class=_tok())
    with pytest.raises(InputError, match="row 2 .* finite and >= 0"):
        WeightedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(rows, [1, 1, -1.0, 1]),
                           processing_class=_tok())
    with pytest.raises(InputError, match="row 1 .* must be a number"):
        WeightedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(rows, [1.0, None, 1, 1]),
                           processing_class=_tok())
    with pytest.raises(InputError, match="nothing to train on"):
        WeightedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(rows, [0.0] * 4),
                           processing_class=_tok())
    with pytest.raises(ConfigError, match="weighting"):
        WeightedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(rows, [1.0] * 4),
                           processing_class=_tok(), weighting="sequence")


def _packing_config(tmp_path):
    cfg = _config(tmp_path)
    cfg.packing = True
    cfg.max_length = 64
    return cfg


def test_train_sft_and_weighted_trainer_share_one_loss(tmp_path):
    """The benchmark's SFT (`train_sft`) and the TRL trainer: same tokens, same mask, same loss, same gradients."""
    from drift_stream.data.tokenization import collate
    from drift_stream.embedded import training as TR
    from drift_stream.model.losses import weighted_example_loss

    rows = _rows(6, layout="messages")
    rows[2]["messages"] = rows[2]["messages"] + [{"role": "user", "content": "Twice?"},
                                                 {"role": "assistant", "content": "#### 4"}]  # two assistant turns
    weights = [0.5, 2.0, 1.0, 0.0, 1.5, 3.0]
    model = make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, seed=2)
    trainer = WeightedSFTTrainer(model=model, args=_config(tmp_path, batch=8, assistant_only_loss=True,
                                                           shuffle_dataset=False),
                                 train_dataset=_dataset(rows, weights), processing_class=_tok(generation=True))
    batch = next(iter(trainer.get_train_dataloader()))
    kept = [i for i, w in enumerate(weights) if w > 0]
    examples = TR.encode_rows(make_char_tokenizer(), [rows[i] for i in kept])  # drift's own template render + mask
    by_ids = {tuple(e.input_ids): (e, weights[i]) for e, i in zip(examples, kept)}
    order = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        n = int((ids != 0).sum())
        ex, w = by_ids[tuple(ids[:n].tolist())]  # TRL tokenized exactly drift's tokens
        assert [int(x != -100) for x in labels[:n]] == list(ex.loss_mask)  # and masked exactly drift's targets
        order.append((ex, w))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ours = collate([ex for ex, _ in order], pad_token_id=0)
    ref = weighted_example_loss(model, ours, [w for _, w in order], denominator=len(order))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-8)
    # train_sft's first step reports the same loss (before its AdamW update), over the same rows
    result = TR.train_sft(model, make_char_tokenizer(), [rows[i] for i in kept], weights=[weights[i] for i in kept],
                          steps=1, batch_size=len(kept), lr=1e-3, seed=0)
    assert result.losses[0] == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.slow
def test_example_quick_runs(tmp_path):
    """examples/train_weighted_trl.py --quick: bank -> score -> refine weights -> export trl -> 8 weighted steps."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_weighted_trl.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "ex"), "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 8, proc.stdout[-2000:]
    assert "96 rows, weights mean 1.000" in proc.stdout


DDP_WEIGHTS = [1.5, 0.5, 2.0, 1.0, 0.25, 1.75, 1.0, 0.5, 3.0, 0.75, 1.25, 0.5, 2.5, 1.0, 0.3, 0.7]


@pytest.mark.slow
def test_data_parallel_equals_one_process(tmp_path):
    """2 gloo ranks x per-device batch 4 == one process x batch 8: N is summed over ranks (token weighting would
    differ if each rank divided by its own tokens)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).resolve().parent / "trl_ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "--master_addr=127.0.0.1", str(worker), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for weighting in ("example", "token"):
        _, single = _train(WeightedSFTTrainer, tmp_path / f"single-{weighting}", _dataset(_rows(16), DDP_WEIGHTS),
                           batch=8, steps=2, weighting=weighting)
        ddp = torch.load(tmp_path / f"{weighting}.pt")
        _assert_params_close(ddp, single)
        _assert_trained(_init_params(), single)


def test_streamed_dataset_skips_zero_weights_and_checks_weights(tmp_path):
    rows = _rows(12)
    kept = [(r, w) for r, w in zip(rows, WEIGHTS) if w > 0]
    stream = _dataset(rows, WEIGHTS).to_iterable_dataset()
    la, a = _train(WeightedSFTTrainer, tmp_path / "a", stream, steps=2)
    lb, b = _train(WeightedSFTTrainer, tmp_path / "b",
                   _dataset([r for r, _ in kept], [w for _, w in kept]).to_iterable_dataset(), steps=2)
    assert la == lb
    _assert_params_close(a, b, rtol=0, atol=0)
    bad = _dataset(rows, [1.0] * 5 + [float("nan")] + [1.0] * 6).to_iterable_dataset()
    with pytest.raises(InputError, match="finite and >= 0"):
        _train(WeightedSFTTrainer, tmp_path / "c", bad, steps=2)


# --- every layout `drift-stream export --format trl` writes trains (issue 22, finding 5) --------------------------

_LAYOUT_WEIGHTS = [0.5, 2.0, 1.0, 0.25, 1.5, 3.0]


def _layout_rows(layout):
    rows = _rows(6, layout="messages")
    if layout == "text":
        return [{"text": r["messages"][0]["content"] + " " + r["messages"][1]["content"]} for r in rows]
    if layout == "prompt_completion":
        return [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    if layout == "plain":
        return [{"prompt": r["messages"][0]["content"] + "\n", "completion": r["messages"][1]["content"]}
                for r in rows]
    return rows


def _explicit_tokens(tok, row, layout, assistant_only):
    """(ids, mask) built piece by piece with the character tokenizer (one token per character, no merges): mask 1
    on the tokens the layout trains, position 0 never (nothing predicts it)."""
    eos = tok.eos_token
    if layout == "text":
        pieces = [(row["text"] + eos, 1)]  # TRL appends EOS to text rows
    elif layout == "plain":
        pieces = [(row["prompt"], 0), (row["completion"] + eos, 1)]
    elif layout == "prompt_completion":  # CHAT_TEMPLATE; the completion is everything after the generation prompt
        pieces = [(f"<|user|>{row['prompt'][0]['content']}<|end|>\n<|assistant|>", 0),
                  (f"{row['completion'][0]['content']}<|end|>\n", 1)]
    else:  # GENERATION_TEMPLATE with assistant_only_loss: the {% generation %} block; else every token
        user, answer = row["messages"]
        pieces = [(f"<|user|>{user['content']}<|end|>\n<|assistant|>", 0), (f"{answer['content']}<|end|>", 1),
                  ("\n", 0)]
        if not assistant_only:
            pieces = [(text, 1) for text, _ in pieces]
    ids, mask = [], []
    for text, loss in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [loss] * len(piece)
    mask[0] = 0
    return ids, mask


def _explicit_weighted_loss(model, tok, rows, weights, layout, assistant_only):
    """sum_i w_i * mean_t nll_it / N with one unpadded float64 forward per row."""
    total = 0.0
    for row, w in zip(rows, weights):
        ids, mask = _explicit_tokens(tok, row, layout, assistant_only)
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        m = torch.tensor(mask[1:], dtype=torch.float64)
        total = total + w * (nll * m).sum() / m.sum()
    return total / len(rows)


@pytest.mark.parametrize("layout,assistant_only", [("text", False), ("messages", False), ("messages", True),
                                                   ("prompt_completion", False), ("plain", False)])
def test_every_export_layout_trains_one_step_with_the_explicit_loss(tmp_path, layout, assistant_only):
    """text rows and messages without assistant_only_loss leave labels[0] unmasked (the crash of finding 5); the
    logged loss and the SGD step equal the explicit weighted loss and its gradient."""
    rows = _layout_rows(layout)
    tok = _tok(generation=layout == "messages")
    lr = 0.5
    extra = {"assistant_only_loss": True} if assistant_only else {}
    losses, after = _train(WeightedSFTTrainer, tmp_path, _dataset(rows, _LAYOUT_WEIGHTS), tok, batch=6, steps=1,
                           lr=lr, **extra)
    model = make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, seed=0)
    model.train()
    expected = _explicit_weighted_loss(model, tok, rows, _LAYOUT_WEIGHTS, layout, assistant_only)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    # float32 forward vs float64 here: relative error ~1e-6 on a loss of ~4.6
    assert losses == [pytest.approx(float(expected), rel=1e-5)]
    stepped = {n: (p - lr * g).detach().float() for (n, p), g in zip(model.named_parameters(), grads)}
    _assert_params_close(after, stepped)


def test_loss_mask_never_marks_position_zero():
    from drift_stream.integrations.trl import loss_mask_from_labels

    labels = torch.tensor([[5, 6, 7, -100], [-100, 8, -100, 9]])
    assert loss_mask_from_labels(labels).tolist() == [[0, 1, 1, 0], [0, 1, 0, 1]]


def test_accumulation_without_loss_is_scaled_for_ga(tmp_path, monkeypatch):
    """transformers < 5.19 has no `loss_is_scaled_for_ga` and divides the loss by the accumulation steps unless the
    model accepts loss kwargs (the rule 5.19+ keeps for `loss_is_scaled_for_ga = None`). Under that rule, with a model
    that does not accept them, accumulation 1 vs 4 still give one big batch."""
    import drift_stream.integrations.trl as trl_mod

    class OldTrainer(WeightedSFTTrainer):
        loss_is_scaled_for_ga = None  # what a Trainer without the attribute does

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # Trainer divides by the accumulation steps

    monkeypatch.setattr(trl_mod, "TRAINER_READS_LOSS_SCALING", False)
    rows, weights = _rows(12), WEIGHTS
    _, a = _train(OldTrainer, tmp_path / "a", _dataset(rows, weights), batch=8, accum=1)
    _, b = _train(OldTrainer, tmp_path / "b", _dataset(rows, weights), batch=2, accum=4)
    _assert_params_close(a, b)
    _, ref = _train(WeightedSFTTrainer, tmp_path / "c", _dataset(rows, weights), batch=8, accum=1)
    _assert_params_close(a, ref)
