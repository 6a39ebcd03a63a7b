"""Turn weights in (a message's weight / loss_weight) and turn-level scores and refinement (issue 24, items 2-3)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.data.example_types import Example, RowError, TokenizedExample
from drift_stream.data.formats import load_adapter
from drift_stream.data.tokenization import ChatTokenizer, collate
from drift_stream.embedded.tiny_models import make_char_tokenizer, make_tiny_model, save_tiny_model
from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import ConfigError
from drift_stream.grads.features import GradientFeaturizer
from drift_stream.grads.projection import FeatureConfig
from drift_stream.grads.turn_features import featurize_turns
from drift_stream.io.columns import KEEP, SCORE, TURN_INPUT_WEIGHTS, TURN_KEEP, TURN_SCORES, TURN_WEIGHTS, WEIGHT
from drift_stream.model.loading import load_tokenizer
from drift_stream.refine.policies import RefineConfig, refine_run
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.build import build_scorer

ASSET_MODEL = Path(__file__).resolve().parents[1] / "drift_stream" / "embedded" / "assets" / "tiny-reasoner"
QUESTION = {"id": "q0", "question": "What is 2 + 5?", "answer": "7"}


def convo(*answers, weights=None, key="weight"):
    messages = []
    for i, answer in enumerate(answers):
        messages.append({"role": "user", "content": f"question {i}?"})
        turn = {"role": "assistant", "content": answer}
        if weights is not None and weights[i] is not None:
            turn[key] = weights[i]
        messages.append(turn)
    return {"messages": messages}


# ------------------------------------------------------------------------------------------------ turn weights in


def test_adapters_read_weight_and_loss_weight():
    adapter = load_adapter("messages")
    ex = adapter.to_example(convo("a", "b", "c", weights=[0, 1, None]))
    assert [m.get("weight") for m in ex.messages if m["role"] == "assistant"] == [0.0, 1.0, None]
    ex = adapter.to_example(convo("a", "b", weights=[0.5, 2], key="loss_weight"))
    assert [m.get("weight") for m in ex.messages if m["role"] == "assistant"] == [0.5, 2.0]
    user_weighted = convo("a")
    user_weighted["messages"][0]["weight"] = 0  # context already: not carried
    assert "weight" not in adapter.to_example(user_weighted).messages[0]
    both = convo("a", weights=[0])
    both["messages"][1]["loss_weight"] = 1.0
    for row, reason in ((convo("a", weights=[-1]), "invalid_weight:messages.weight"),
                        (convo("a", weights=["1"]), "invalid_weight:messages.weight"),
                        (convo("a", weights=[float("nan")]), "invalid_weight:messages.weight"),
                        (convo("a", weights=[True]), "invalid_weight:messages.weight"),
                        (both, "invalid_weight:messages.loss_weight"),
                        (convo("a", "b", weights=[0, 0.0]), "no_weighted_turn")):
        with pytest.raises(RowError) as err:
            adapter.to_example(row)
        assert err.value.reason == reason


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_weight_zero_turn_is_out_of_the_loss_mask_only(template):
    tokenizer = make_char_tokenizer(chat_template=False) if template == "plain" else load_tokenizer(str(ASSET_MODEL))
    chat = ChatTokenizer(tokenizer)
    adapter = load_adapter("messages")
    plain = chat.encode(adapter.to_example(convo("first answer", "second", "third one")))
    weighted = chat.encode(adapter.to_example(convo("first answer", "second", "third one", weights=[1, 0, 0.5])))
    assert weighted.input_ids == plain.input_ids  # the template never sees the weight
    assert weighted.turn_index == plain.turn_index and plain.turn_weights == (1.0, 1.0, 1.0)
    assert weighted.turn_weights == (1.0, 0.0, 0.5)
    assert [int(k >= 0) for k in plain.turn_index[1:]] == plain.loss_mask[1:]
    assert sorted(set(plain.turn_index)) == [-1, 0, 1, 2]
    assert weighted.loss_mask == [m if k != 1 else 0 for m, k in zip(plain.loss_mask, plain.turn_index)]
    masks = plain.turn_masks()
    assert [sum(m) for m in masks] == [sum(1 for k in plain.turn_index[1:] if k == t) for t in range(3)]
    assert np.array_equal(np.sum(masks, axis=0), plain.loss_mask)
    text = chat.encode(Example(id="t", text="just text"))
    assert text.turn_index is None and text.num_turns == 1 and text.turn_masks() == [text.loss_mask]


def test_truncation_cuts_turn_index_with_the_ids():
    chat = ChatTokenizer(make_char_tokenizer(chat_template=False), max_tokens=30, overlong="truncate")
    out = chat.encode(load_adapter("messages").to_example(convo("a" * 8, "b" * 20)))
    assert len(out.turn_index) == len(out.input_ids) == 30 and out.turn_weights == (1.0, 1.0)


# ------------------------------------------------------------------------------------------------ exact features


def explicit_turn_features(model, featurizer, example: TokenizedExample, mask: list[int]):
    """One float64 backward of the example's loss masked to `mask`: P_out G_m P_in^T of every tracked module."""
    ids = torch.tensor([example.input_ids])
    weights = torch.tensor(mask[1:], dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    ((nll * weights).sum() / weights.sum()).backward()
    names = dict(model.named_modules())
    parts = []
    for t in featurizer.modules:
        grad = names[t.name].weight.grad
        grad = grad.T if t.kind == "conv1d" else grad
        p_in, p_out = featurizer.projection_matrices(t.name)
        parts.append((p_out.double() @ grad @ p_in.double().T).reshape(-1))
    model.zero_grad(set_to_none=True)
    return torch.cat(parts)


def turn_examples(seed=0, vocab=102):
    """Rows of 1-3 assistant turns (token spans), the second row's middle turn weighted 0 (out of loss_mask)."""
    gen = torch.Generator().manual_seed(seed)
    spans = [[(3, 6)], [(2, 5), (7, 10), (12, 16)], [(2, 4), (8, 13)]]
    out = []
    for i, (n, row_spans) in enumerate(zip((9, 19, 15), spans)):
        ids = torch.randint(6, vocab, (n,), generator=gen).tolist()
        turn = [-1] * n
        for k, (a, b) in enumerate(row_spans):
            turn[a:b] = [k] * (b - a)
        weights = tuple(0.0 if (i, k) == (1, 1) else 1.0 for k in range(len(row_spans)))
        mask = [int(t >= 0 and weights[t] != 0) for t in turn]
        out.append(TokenizedExample(f"ex{i}", ids, mask, turn_index=turn, turn_weights=weights))
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_turn_features_equal_explicit_gradients_with_the_loss_masked_to_the_turn(arch, padding_side):
    model = make_tiny_model(arch, seed=1).to(torch.float64).eval()
    featurizer = GradientFeaturizer(model, FeatureConfig(proj_dim_in=8, proj_dim_out=4, seed=3))
    examples = turn_examples()
    batch = collate(examples, pad_token_id=0, padding_side=padding_side)
    length = batch["input_ids"].shape[1]
    index = torch.full((len(examples), length), -1, dtype=torch.long)
    for r, ex in enumerate(examples):
        at = slice(0, len(ex.input_ids)) if padding_side == "right" else slice(length - len(ex.input_ids), length)
        index[r, at] = torch.tensor(ex.turn_index)
    row, turns = featurize_turns(featurizer, batch, index, 3)
    plain = featurizer.featurize(batch)
    assert torch.equal(row.features, plain.features) and torch.equal(row.loss, plain.loss)  # bit-identical
    for r, ex in enumerate(examples):
        for k, mask in enumerate(ex.turn_masks()):
            if not any(mask):  # the weight-0 turn: no loss tokens, zero feature
                assert turns[k].bad[r] == "no_loss_tokens" and not turns[k].features[r].any()
                continue
            ref = explicit_turn_features(model, featurizer, ex, mask)
            assert ref.abs().max() > 1e-3
            # float64 throughout: only summation order differs (hooked sums vs autograd's weight gradient)
            torch.testing.assert_close(turns[k].features[r], ref, rtol=1e-9, atol=1e-12)
            assert turns[k].bad[r] is None and int(turns[k].num_tokens[r]) == sum(mask)
        for k in range(ex.num_turns, 3):
            assert turns[k].bad[r] == "no_loss_tokens"


# ------------------------------------------------------------------------------------------------ scoring


def parity(completion, query):
    return float(sum(map(ord, completion)) % 2 == 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama and a one-query on-policy bank (as tests/test_drift_scorer.py); its correct and incorrect
    rollouts, which make clean and corrupted assistant turns."""
    root = tmp_path_factory.mktemp("turns")
    model_dir = save_tiny_model(root / "model", arch="llama", seed=2)
    config = BankConfig(features=FeatureConfig(proj_dim_in=8, proj_dim_out=8), preconditioner="identity",
                        rollouts=RolloutConfig(num_rollouts=8, max_new_tokens=16, seed=5, batch_size=16))
    build_bank(model_dir, [QUESTION], str(root / "bank"), config, verifier=FunctionVerifier(parity, "test:parity"),
               progress=False)
    rollouts = pq.read_table(root / "bank" / "rollouts.parquet").to_pylist()
    good = [r["completion"] for r in rollouts if r["reward"] == 1 and r["completion"].strip()]
    bad = [r["completion"] for r in rollouts if r["reward"] == 0 and r["completion"].strip()]
    assert len(good) >= 2 and bad
    return root, model_dir, str(root / "bank"), good, bad


def conversations(good, bad):
    """Three-turn conversations on the bank's question: two correct rollouts and one incorrect, at every place."""
    rows = []
    for i, (wrong, pair) in enumerate(itertools.product(bad, itertools.combinations(good, 2))):
        answers = list(pair)
        answers.insert(i % 3, wrong)
        messages = []
        for answer in answers:
            messages += [{"role": "user", "content": QUESTION["question"]}, {"role": "assistant", "content": answer}]
        rows.append({"id": f"c{i}", "messages": messages, "corrupted": i % 3})
    return rows


def test_row_outputs_are_unchanged_by_turn_granularity(setup):
    _, model_dir, bank, good, bad = setup
    table = pa.Table.from_pylist(conversations(good, bad) + [convo("x y", "z", weights=[0, 0])])
    for scorer in ("drift", "loss", "random"):
        kwargs = {"bank": bank} if scorer == "drift" else {}
        rows = build_scorer(scorer, model=model_dir, batch_size=4, **kwargs)(table)
        turns = build_scorer(scorer, model=model_dir, batch_size=4, granularity="turn", **kwargs)(table)
        assert turns.drop_columns([TURN_SCORES, TURN_INPUT_WEIGHTS]).equals(rows), scorer
        assert turns.column(TURN_SCORES).type == pa.list_(pa.float32())
        assert turns.column("drift_reject_reason").to_pylist()[-1] == "no_weighted_turn"
        assert turns.column(TURN_SCORES).to_pylist()[-1] is None
        assert all(len(s) == 3 for s in turns.column(TURN_SCORES).to_pylist()[:-1])
    with pytest.raises(ConfigError, match="granularity"):
        build_scorer("ifd", model=model_dir, granularity="turn")


def test_corrupted_turn_scores_lowest_and_refine_keeps_the_clean_turns(setup, tmp_path):
    _, model_dir, bank, good, bad = setup
    rows = conversations(good, bad)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "convos.parquet")
    scorer = build_scorer("drift", model=model_dir, bank=bank, batch_size=4, granularity="turn")
    run_score(RunConfig(data=(str(tmp_path / "convos.parquet"),), out=str(tmp_path / "run")), scorer, progress=False)
    scored = pq.read_table(tmp_path / "run" / "data").to_pylist()
    assert len(scored) == len(rows) >= 12
    for row in scored:
        assert int(np.argmin(row[TURN_SCORES])) == row["corrupted"], row[TURN_SCORES]
    # positive: every corrupted turn is dropped, every clean turn kept, so every conversation stays
    refine_run(str(tmp_path / "run"), "positive", str(tmp_path / "pos"), granularity="turn", progress=False)
    kept = pq.read_table(tmp_path / "pos" / "data").to_pylist()
    assert len(kept) == len(rows) and all(r[KEEP] for r in kept)
    for row in kept:
        assert row[TURN_KEEP] == [k != row["corrupted"] for k in range(3)]
    # top:2/3 of the turns: exactly the clean ones
    manifest = refine_run(str(tmp_path / "run"), "top:0.6666666666666666", str(tmp_path / "top"), granularity="turn",
                          progress=False)
    top = pq.read_table(tmp_path / "top" / "data").to_pylist()
    assert sum(sum(r[TURN_KEEP]) for r in top) == 2 * len(rows) == manifest["rows_kept"]
    assert all(r[TURN_KEEP] == [k != r["corrupted"] for k in range(3)] for r in top)
    assert manifest["config"]["granularity"] == "turn"
    # weights over turns: mean 1 over the scored turns, the corrupted turn the lightest of its row
    refine_run(str(tmp_path / "run"), "weights", str(tmp_path / "w"), granularity="turn", progress=False)
    weighted = pq.read_table(tmp_path / "w" / "data").to_pylist()
    all_weights = np.array([w for r in weighted for w in r[TURN_WEIGHTS]], dtype=np.float64)
    assert all_weights.mean() == pytest.approx(1.0, rel=1e-6)
    for r in weighted:
        assert int(np.argmin(r[TURN_WEIGHTS])) == r["corrupted"]
        assert r[WEIGHT] == pytest.approx(np.mean(r[TURN_WEIGHTS]), rel=1e-6)
    # a row refine of the same run records what it did before (no granularity key)
    row_manifest = refine_run(str(tmp_path / "run"), "positive", str(tmp_path / "rows"), progress=False)
    assert "granularity" not in row_manifest["config"]
    assert TURN_KEEP not in pq.read_table(tmp_path / "rows" / "data").column_names
    with pytest.raises(ConfigError, match="repeat"):
        RefineConfig("repeat", granularity="turn")
    run_score(RunConfig(data=(str(tmp_path / "convos.parquet"),), out=str(tmp_path / "row-run")),
              build_scorer("random", model=model_dir), progress=False)
    with pytest.raises(ConfigError, match="--granularity turn"):
        refine_run(str(tmp_path / "row-run"), "positive", str(tmp_path / "x"), granularity="turn", progress=False)


def test_weight_zero_turn_leaves_the_row_score_exactly_as_its_masked_loss(setup):
    """A deliberately wrong weight-0 turn: the row scores exactly as the same conversation whose turn's loss is
    masked by construction, and differently from the row that trains on it."""
    _, model_dir, bank, good, bad = setup
    adapter = load_adapter("messages")
    weighted_row = convo(bad[0], good[0], weights=[0, None])
    weighted_row["messages"] = [dict(m, content=QUESTION["question"]) if m["role"] == "user" else m
                                for m in weighted_row["messages"]]
    open_row = json.loads(json.dumps(weighted_row))
    del open_row["messages"][1]["weight"]
    for scorer_name in ("drift", "loss"):
        kwargs = {"bank": bank} if scorer_name == "drift" else {}
        scorer = build_scorer(scorer_name, model=model_dir, granularity="turn", **kwargs)
        unweighted = scorer.chat.encode(adapter.to_example(open_row))
        by_hand = TokenizedExample("h", unweighted.input_ids,
                                   [m if k != 0 else 0 for m, k in zip(unweighted.loss_mask, unweighted.turn_index)])
        expected = scorer._score_examples([by_hand])
        got = scorer(pa.Table.from_pylist([weighted_row])).to_pylist()[0]
        open_score = scorer(pa.Table.from_pylist([open_row])).to_pylist()[0]
        assert got[SCORE] == np.float32(expected.score[0])  # exact
        assert got["drift_num_tokens"] == sum(by_hand.loss_mask) < open_score["drift_num_tokens"]
        assert got[SCORE] != open_score[SCORE]
        assert got[TURN_SCORES][0] is None and got[TURN_INPUT_WEIGHTS] == [0.0, 1.0]
        # turn 1's own score: its loss alone (a pseudo-row), up to float32 summation order
        assert got[TURN_SCORES][1] == pytest.approx(float(expected.score[0]), rel=1e-5, abs=1e-7)
        # turn scores of the open row: each a pseudo-row with the loss masked to that turn
        pseudo = [TokenizedExample(f"t{k}", unweighted.input_ids, mask)
                  for k, mask in enumerate(unweighted.turn_masks())]
        alone = np.concatenate([scorer._score_examples([p]).score for p in pseudo])
        np.testing.assert_allclose(open_score[TURN_SCORES], alone, rtol=1e-5, atol=1e-7)
