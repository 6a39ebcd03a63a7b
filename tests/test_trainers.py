"""The weighted SFT loop, greedy accuracy, and the shipped tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drift_stream.data.tokenization import collate
from drift_stream.embedded import training as TR
from drift_stream.embedded.tiny_models import make_char_tokenizer, make_tiny_model
from drift_stream.errors import ConfigError

ASSET = Path(TR.__file__).parent / "assets" / "tiny-reasoner"


def _rows(n):
    return [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"Sum: {i} + {i % 3} ="},
                                     {"role": "assistant", "content": f"{i}+{i % 3}={i + i % 3} #### {i + i % 3}"}]}
        for i in range(n)
    ]


def _model(seed=0):
    return make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           seed=seed)


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


def test_encode_rows_masks_assistant_tokens_only(tok):
    (ex,) = TR.encode_rows(tok, _rows(2)[1:])
    target = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert tok.decode(target) == "1+1=2 #### 2<|end|>"


def test_weighted_loss_is_explicit_mean_of_weighted_row_losses(tok):
    torch.manual_seed(0)
    rows, weights = _rows(4), [0.5, 2.0, 1.0, 0.25]
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    result = TR.train_sft(model, tok, rows, weights=weights, steps=1, batch_size=4, lr=1e-3, seed=0)
    # explicit: one unpadded forward per row, loss = sum_i w_i * mean-token-NLL_i / B (order does not matter)
    model.load_state_dict(init)
    model.train()
    examples = TR.encode_rows(tok, rows)
    losses = []
    for ex in examples:
        batch = collate([ex], pad_token_id=0)
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, 1:], reduction="none")
        mask = batch["loss_mask"][0, 1:].double()
        losses.append(float((nll * mask).sum().detach() / mask.sum()))
    expected = sum(w * l for w, l in zip(weights, losses)) / 4
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    assert result.rows_used == 4


def test_zero_weight_rows_equal_training_without_them(tok):
    rows = _rows(10)
    weights = [1.0, 0.0, 1.5, 0.0, 1.0, 0.5, 0.0, 1.0, 2.0, 1.0]
    kept = [r for r, w in zip(rows, weights) if w > 0]
    a, b = _model(), _model()
    ra = TR.train_sft(a, tok, rows, weights=weights, steps=6, batch_size=3, lr=3e-3, seed=4, warmup_steps=2)
    rb = TR.train_sft(b, tok, kept, weights=[w for w in weights if w > 0], steps=6, batch_size=3, lr=3e-3, seed=4,
                      warmup_steps=2)
    assert ra.losses == rb.losses and ra.rows_used == rb.rows_used == 7
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    # the `weight` column is read when no weights are passed, and it changes training
    c = _model()
    rc = TR.train_sft(c, tok, [dict(r, weight=w) for r, w in zip(rows, weights)], steps=6, batch_size=3, lr=3e-3,
                      seed=4, warmup_steps=2)
    assert rc.losses == ra.losses
    d = _model()
    rd = TR.train_sft(d, tok, rows, steps=6, batch_size=3, lr=3e-3, seed=4, warmup_steps=2)
    assert rd.losses != ra.losses


def test_micro_batches_do_not_change_training(tok):
    rows = _rows(8) + [{"messages": [{"role": "user", "content": "Sum: 1 + 1 ="},
                                     {"role": "assistant", "content": "1+1=2, " * 20 + "#### 2"}]}]
    examples = TR.encode_rows(tok, rows)
    parts = TR._micro_batches(list(range(9)), examples, max_batch_tokens=100)
    assert sorted(i for p in parts for i in p) == list(range(9)) and parts[-1] == [8]  # the long row goes alone
    assert all(len(p) == 1 or max(len(examples[i].input_ids) for i in p) * len(p) <= 100 for p in parts)
    a, b = _model(), _model()
    la = TR.train_sft(a, tok, rows, steps=3, batch_size=9, lr=1e-3, seed=0, max_batch_tokens=1).losses
    lb = TR.train_sft(b, tok, rows, steps=3, batch_size=9, lr=1e-3, seed=0, max_batch_tokens=10_000).losses
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-6, atol=0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)  # an Adam step moves ~1e-3: a lost row shows


def test_training_is_deterministic_under_seed(tok):
    a, b, c = _model(), _model(), _model()
    la = TR.train_sft(a, tok, _rows(8), steps=4, batch_size=4, lr=1e-3, seed=1).losses
    lb = TR.train_sft(b, tok, _rows(8), steps=4, batch_size=4, lr=1e-3, seed=1).losses
    lc = TR.train_sft(c, tok, _rows(8), steps=4, batch_size=4, lr=1e-3, seed=2).losses
    assert la == lb and la != lc


def test_bad_weights_and_config_are_refused(tok):
    with pytest.raises(ConfigError, match="finite and >= 0"):
        TR.train_sft(_model(), tok, _rows(2), weights=[1.0, -1.0], steps=1, batch_size=2, lr=1e-3)
    with pytest.raises(ConfigError, match="weight 0"):
        TR.train_sft(_model(), tok, _rows(2), weights=[0.0, 0.0], steps=1, batch_size=2, lr=1e-3)
    with pytest.raises(ConfigError, match="2 rows"):
        TR.train_sft(_model(), tok, _rows(2), weights=[1.0], steps=1, batch_size=2, lr=1e-3)
    with pytest.raises(ConfigError, match="batch_size"):
        TR.SFTConfig(steps=1, batch_size=0, lr=1e-3)
    with pytest.raises(ConfigError, match="warmup_steps"):
        TR.SFTConfig(steps=2, batch_size=1, lr=1e-3, warmup_steps=3)


def test_lr_schedule_by_hand():
    cfg = TR.SFTConfig(steps=12, batch_size=1, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [cfg.lr_at(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cfg.lr_at(7) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert cfg.lr_at(12) == pytest.approx(0.1)


def test_greedy_accuracy_on_a_memorised_model(tok):
    # Teach a tiny model two answers, then grade one right and one wrong reference answer.
    rows = [
        {"messages": [{"role": "user", "content": "Sum: 1 + 2 ="}, {"role": "assistant", "content": "1+2=3 #### 3"}]},
        {"messages": [{"role": "user", "content": "GCD of 4 and 6?"},
                      {"role": "assistant", "content": "gcd(6,4)=gcd(4,2)=gcd(2,0)=2 #### 2"}]},
    ]
    model = _model(seed=1)
    TR.train_sft(model, tok, rows, steps=150, batch_size=2, lr=1e-2, seed=0, warmup_steps=10)
    queries = [
        {"id": "a", "question": "Sum: 1 + 2 =", "answer": "3", "task": "chain_sum"},
        {"id": "b", "question": "GCD of 4 and 6?", "answer": "4", "task": "gcd"},  # the model says 2
        {"id": "c", "question": "Sum: 1 + 2 =", "answer": "3", "task": "other"},  # no task verifier: exact match
    ]
    assert TR.generate_greedy(model, tok, [q["question"] for q in queries], batch_size=2) == [
        "1+2=3 #### 3", "gcd(6,4)=gcd(4,2)=gcd(2,0)=2 #### 2", "1+2=3 #### 3"]
    result = TR.greedy_accuracy(model, tok, queries, batch_size=2)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.per_task == {"chain_sum": 1.0, "gcd": 0.0, "other": 1.0}
    assert [r["correct"] for r in result.records] == [True, False, True]
    flipped = TR.greedy_accuracy(model, tok, queries, score_fn=lambda resp, q: float(q["id"] == "b"))
    assert flipped.accuracy == pytest.approx(1 / 3)


def test_shipped_model_loads_as_llama_and_is_small():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(f.stat().st_size for f in ASSET.iterdir())
    assert size < 8_000_000
    model = AutoModelForCausalLM.from_pretrained(ASSET, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(ASSET, trust_remote_code=False)
    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert tok.eos_token == "<|end|>" and tok.chat_template
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


@pytest.mark.slow
def test_shipped_model_has_its_recorded_partial_accuracy():
    pytest.importorskip("reasoning_gym")
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((ASSET / "training_summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    tok = AutoTokenizer.from_pretrained(ASSET)
    queries = pq.read_table(ASSET.parent / "demo" / "queries.parquet").to_pylist()
    threads = torch.get_num_threads()
    torch.set_num_threads(summary["threads"])  # the thread count it was evaluated with
    try:
        result = TR.greedy_accuracy(model, tok, queries)
    finally:
        torch.set_num_threads(threads)
    for task, recorded in summary["queries_accuracy"].items():
        # Same machine: identical. Another CPU may flip a near-tied greedy token: allow one query per task.
        assert abs(result.per_task[task] - recorded) * result.counts[task] <= 1, (task, result.per_task, recorded)
        assert 0.3 <= recorded <= 0.7, (task, recorded)
