"""Turn weights out (issue 24, items 2-3): a run scored with granularity turn and refined per turn, and input messages
carrying OpenAI's `weight` / LLaMA-Factory's `loss_weight`, exported to LLaMA-Factory v1, tokens, Fireworks and TRL.

Every expected weight is computed here from the refined columns and `ChatTokenizer.encode` (the scorer's own chat
tokenizer), never read back from the code under test."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.data.formats import load_adapter
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.engines.local import RunConfig, run_score
from drift_stream.grads.projection import FeatureConfig
from drift_stream.io.columns import ID, TURN_KEEP, TURN_WEIGHTS, WEIGHT
from drift_stream.refine.export import export_run
from drift_stream.refine.policies import refine_run
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.build import build_scorer

QUESTION = {"id": "q0", "question": "What is 2 + 5?", "answer": "7"}


def parity(completion, query):
    return float(sum(map(ord, completion)) % 2 == 0)


def _convo(row_id, answers, weights=None, key="weight"):
    messages = []
    for k, answer in enumerate(answers):
        turn = {"role": "assistant", "content": answer}
        if weights is not None and weights[k] is not None:
            turn[key] = weights[k]
        messages += [{"role": "user", "content": QUESTION["question"]}, turn]
    return {"id": row_id, "messages": messages}


@pytest.fixture(scope="module")
def turn_run(tmp_path_factory):
    """A tiny llama, a one-query on-policy bank (as tests/test_turns.py), and a drift run with granularity turn over
    three-turn conversations with one incorrect rollout each (`corrupted`: its turn) plus rows carrying input turn
    weights: a deliberately wrong weight-0 first turn, a weight-0 last turn, and float loss_weights."""
    root = tmp_path_factory.mktemp("export-turns")
    model_dir = save_tiny_model(root / "model", arch="llama", seed=2)
    config = BankConfig(features=FeatureConfig(proj_dim_in=8, proj_dim_out=8), preconditioner="identity",
                        rollouts=RolloutConfig(num_rollouts=8, max_new_tokens=16, seed=5, batch_size=16))
    build_bank(model_dir, [QUESTION], str(root / "bank"), config, verifier=FunctionVerifier(parity, "test:parity"),
               progress=False)
    rollouts = pq.read_table(root / "bank" / "rollouts.parquet").to_pylist()
    good = [r["completion"] for r in rollouts if r["reward"] == 1 and r["completion"].strip()]
    bad = [r["completion"] for r in rollouts if r["reward"] == 0 and r["completion"].strip()]
    assert len(good) >= 2 and bad
    rows = []
    for i, (wrong, pair) in enumerate(itertools.product(bad, itertools.combinations(good, 2))):
        answers = list(pair)
        answers.insert(i % 3, wrong)
        rows.append({**_convo(f"c{i}", answers), "corrupted": i % 3})
    weighted = [_convo("w-first", [bad[0], good[0]], [0, None]),  # OpenAI: the wrong turn is context only
                _convo("w-last", [good[0], bad[0]], [None, 0]),
                _convo("w-float", [good[0], good[1]], [0.5, 2.0], key="loss_weight")]
    with open(root / "convos.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows + [{**r, "corrupted": -1} for r in weighted])
    scorer = build_scorer("drift", model=model_dir, bank=str(root / "bank"), batch_size=4, granularity="turn")
    run_score(RunConfig(data=(str(root / "convos.jsonl"),), out=str(root / "run")), scorer, progress=False)
    refine_run(str(root / "run"), "positive", str(root / "keep"), granularity="turn", keep_all=True, progress=False)
    refine_run(str(root / "run"), "weights", str(root / "turnw"), granularity="turn", progress=False)
    refine_run(str(root / "run"), "weights", str(root / "roww"), progress=False)  # row weights, input turn weights
    return root, scorer.chat


def _refined(root, name):
    return {r[ID]: r for r in pq.read_table(root / name / "data").to_pylist()}


def _messages(row):
    """The messages as the scorer's adapter handed them to the chat template (null struct fields dropped)."""
    return [dict(m) for m in load_adapter("messages").to_example(row).messages]


def _inputs(row):
    """Each assistant turn's input weight as the adapter read it (OpenAI `weight` / LLaMA-Factory `loss_weight`)."""
    example = load_adapter("messages").to_example(row)
    return [float(m.get("weight", 1.0)) for m in example.messages if m["role"] == "assistant"]


def _expected_turns(row):
    """input_k x turn factor_k (x the row weight where the refine wrote no turn weights)."""
    inputs = _inputs(row)
    if row.get(TURN_WEIGHTS) is not None:
        return [w * float(t) for w, t in zip(inputs, row[TURN_WEIGHTS])]
    row_weight = float(row[WEIGHT]) if WEIGHT in row else float(row["keep"])
    keep = row.get(TURN_KEEP) or [True] * len(inputs)
    return [row_weight * w * float(k) for w, k in zip(inputs, keep)]


def _lf_weights(out):
    rows = pq.read_table(Path(out) / "data").to_pylist()
    return {r[ID]: [m["loss_weight"] for m in r["messages"] if m["role"] == "assistant"] for r in rows}


def test_llamafactory_drops_the_corrupted_turn_and_keeps_the_clean_ones(turn_run, tmp_path):
    root, _ = turn_run
    keep = _refined(root, "keep")
    export_run(str(root / "keep"), "llamafactory", str(tmp_path / "lf-keep"))
    got = _lf_weights(tmp_path / "lf-keep")
    conversations = [r for r in keep.values() if r["corrupted"] >= 0]
    assert len(conversations) >= 12
    for row in conversations:  # positive drops exactly the incorrect turn (tests/test_turns.py)
        assert row[TURN_KEEP] == [k != row["corrupted"] for k in range(3)]
        assert got[row[ID]] == [0.0 if k == row["corrupted"] else 1.0 for k in range(3)]
    for row_id, weights in got.items():
        assert weights == _expected_turns(keep[row_id])
    assert got["w-first"][0] == 0.0 and got["w-last"][1] == 0.0  # input weight 0: never kept

    turnw = _refined(root, "turnw")
    export_run(str(root / "turnw"), "llamafactory", str(tmp_path / "lf-w"))
    got = _lf_weights(tmp_path / "lf-w")
    assert set(got) == set(turnw)
    for row_id, row in turnw.items():
        # float32 column: the product in float64, rounded once, as the export writes it
        assert got[row_id] == [float(np.float32(w)) for w in _expected_turns(row)]
        if row["corrupted"] >= 0:
            clean = [k for k in range(3) if k != row["corrupted"]]
            assert got[row_id][row["corrupted"]] < min(got[row_id][k] for k in clean)
            assert [got[row_id][k] for k in clean] == [float(row[TURN_WEIGHTS][k]) for k in clean]
    assert got["w-float"] == [float(np.float32(0.5 * turnw["w-float"][TURN_WEIGHTS][0])),
                              float(np.float32(2.0 * turnw["w-float"][TURN_WEIGHTS][1]))]


def test_input_weight_zero_turn_exports_loss_weight_zero_from_a_row_refine(turn_run, tmp_path):
    """The OpenAI weight-0 turn of a row-level refine: loss_weight 0 (it used to get the row's weight), the other
    turns the row weight x their input weight."""
    root, _ = turn_run
    roww = _refined(root, "roww")
    assert TURN_WEIGHTS not in roww["w-first"] and roww["w-first"][WEIGHT] > 0
    export_run(str(root / "roww"), "llamafactory", str(tmp_path / "lf"))
    got = _lf_weights(tmp_path / "lf")
    w = float(roww["w-first"][WEIGHT])
    assert got["w-first"] == [0.0, w]
    assert got["w-last"] == [float(roww["w-last"][WEIGHT]), 0.0]
    f = float(roww["w-float"][WEIGHT])
    assert got["w-float"] == [float(np.float32(0.5 * f)), float(np.float32(2.0 * f))]
    plain = [r for r in roww.values() if r["corrupted"] >= 0]
    assert all(got[r[ID]] == [r[WEIGHT]] * 3 for r in plain)  # no input weights: as before


@pytest.mark.parametrize("refined", ["keep", "turnw", "roww"])
def test_token_weights_equal_an_explicit_computation_from_encode(turn_run, tmp_path, refined):
    root, chat = turn_run
    rows = _refined(root, refined)
    manifest = export_run(str(root / refined), "tokens", str(tmp_path / "tok"))
    exported = {r[ID]: r for r in pq.read_table(tmp_path / "tok" / "data").to_pylist()}
    assert manifest["rows_written"] == len(exported) == sum(float(r.get(WEIGHT, r.get("keep"))) > 0
                                                            for r in rows.values())
    adapter = load_adapter("messages")
    for row_id, out in exported.items():
        row = rows[row_id]
        encoded = chat.encode(adapter.to_example(row))
        f = np.asarray(_expected_turns(row), dtype=np.float64).astype(np.float32)  # [K]
        mask = np.asarray(encoded.loss_mask)  # [T]
        turn = np.asarray(encoded.turn_index)  # [T]
        per_token = np.array([f[k] if k >= 0 else 0.0 for k in turn], dtype=np.float32)
        expected = (mask * per_token)[1:]
        assert out["input_ids"] == encoded.input_ids and out["target_tokens"] == encoded.input_ids[1:]
        np.testing.assert_array_equal(np.asarray(out["weights"], dtype=np.float32), expected)  # exact
        trained = (mask == 1) & (per_token != 0)
        assert out["labels"] == [t if m else -100 for t, m in zip(encoded.input_ids, trained)]
        for k in range(len(f)):  # a dropped or weight-0 turn: weight 0 and out of the labels
            span = turn[1:] == k
            assert span.any()
            if f[k] == 0:
                assert not np.asarray(out["weights"])[span].any()
                assert all(x == -100 for x, s in zip(out["labels"], turn == k) if s)
        if refined == "keep" and row["corrupted"] >= 0:
            zero = [k for k in range(3) if not np.asarray(out["weights"])[turn[1:] == k].any()]
            assert zero == [row["corrupted"]]


def test_fireworks_marks_dropped_and_weight_zero_turns(turn_run, tmp_path):
    root, _ = turn_run
    keep = _refined(root, "keep")
    export_run(str(root / "keep"), "fireworks", str(tmp_path / "fw"))
    lines = [json.loads(x) for x in (tmp_path / "fw" / "data" / "train-00000-of-00001.jsonl").read_text().splitlines()]
    by_id = {}
    for line, row_id in zip(lines, [i for i, r in keep.items() if r["keep"]]):  # refined order
        by_id[row_id] = line
    for row_id, line in by_id.items():
        row = keep[row_id]
        marks = [m["weight"] for m in line["messages"] if m["role"] == "assistant"]
        assert marks == [0 if w == 0 else 1 for w in _expected_turns(row)]
        assert all("weight" not in m for m in line["messages"] if m["role"] != "assistant")
        assert line["weight"] == 1.0  # a filter's row weight: the root weight
    # the row refine: float input weights are not Fireworks' 0/1 message weights (they stay 1, the root is the row's)
    roww = _refined(root, "roww")
    export_run(str(root / "roww"), "fireworks", str(tmp_path / "fw-row"))
    text = (tmp_path / "fw-row" / "data" / "train-00000-of-00001.jsonl").read_text().splitlines()
    lines = {row_id: json.loads(x) for row_id, x in zip(roww, text)}
    assert [m["weight"] for m in lines["w-first"]["messages"] if m["role"] == "assistant"] == [0, 1]
    assert [m["weight"] for m in lines["w-float"]["messages"] if m["role"] == "assistant"] == [1, 1]
    plain = next(i for i, r in roww.items() if r["corrupted"] >= 0)
    assert all("weight" not in m for m in lines[plain]["messages"])  # no input weights: as before


def test_trl_cuts_a_dropped_last_turn_and_keeps_messages_as_scored(turn_run, tmp_path, caplog):
    root, _ = turn_run
    keep = _refined(root, "keep")
    with caplog.at_level("WARNING"):
        export_run(str(root / "keep"), "trl", str(tmp_path / "msg"), layout="messages")
    out = {r[ID]: [json.loads(m) for m in r["messages"]] for r in pq.read_table(tmp_path / "msg" / "data").to_pylist()}
    for row_id, messages in out.items():
        row = keep[row_id]
        turns = _expected_turns(row)
        last = max(k for k, w in enumerate(turns) if w > 0)
        # cut after the last kept assistant turn (a user + assistant pair per turn); messages as the adapter gave them
        assert messages == _messages(row)[: 2 * (last + 1)]
    assert "weight-0 assistant turn before a trained one" in caplog.text  # a corrupted middle turn: TRL trains it
    # prompt/completion: a row whose only kept turn is the last one after the cut
    roww = _refined(root, "roww")
    subset = tmp_path / "subset"
    shutil.copytree(root / "roww", subset)
    shard = next((subset / "data").iterdir())
    table = pq.read_table(shard)
    table = table.filter(pa.array(np.isin(table.column(ID).to_pylist(), ["w-first", "w-last"])))
    pq.write_table(table, shard)
    export_run(str(subset), "trl", str(tmp_path / "pc"))
    pc = {r[ID]: r for r in pq.read_table(tmp_path / "pc" / "data").to_pylist()}
    first, last = _messages(roww["w-first"]), _messages(roww["w-last"])
    assert [json.loads(m) for m in pc["w-first"]["prompt"]] == first[:3]  # the weight-0 wrong turn is context
    assert [json.loads(m) for m in pc["w-first"]["completion"]] == first[3:]
    assert [json.loads(m) for m in pc["w-last"]["prompt"]] == last[:1]
    assert [json.loads(m) for m in pc["w-last"]["completion"]] == last[1:2]  # the weight-0 last turn is cut
