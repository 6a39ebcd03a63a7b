"""The scorer core: rows in, the same rows plus score columns out; loss / ifd / random against explicit computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from drift_stream.errors import ConfigError
from drift_stream.scoring.base import ScoreConfig, random_unit
from drift_stream.scoring.build import build_scorer
from drift_stream.scoring.drift import fit_beta
from drift_stream.scoring.stats import spearman

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
    {"id": "b", "messages": [{"role": "user", "content": "hi"}]},  # no assistant turn -> rejected
    {"id": "c", "messages": [{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "It is 7."}]},
    {
        "id": "d",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2*3?"},
            {"role": "assistant", "content": "6"},
            {"role": "user", "content": "and 2*4?"},
            {"role": "assistant", "content": "8, since 2*4=8"},
        ],
    },
    {"id": "e", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from drift_stream.embedded.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", arch="llama", seed=3)


def explicit_losses(model_dir, tokenized):
    """Mean NLL of each example's masked tokens, one example at a time, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    for ex in tokenized:
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        terms = [-logp[t - 1, ex.input_ids[t]].item() for t in range(1, len(ex.input_ids)) if ex.loss_mask[t]]
        out.append(sum(terms) / len(terms))
    return np.array(out)


def test_rows_pass_through_and_rejects_keep_their_place(model_dir):
    table = pa.Table.from_pylist(ROWS)
    out = build_scorer("loss", model=model_dir, adapter="messages")(table)
    assert out.num_rows == len(ROWS)
    assert out.column("messages").to_pylist() == table.column("messages").to_pylist()
    assert out.column("id").to_pylist() == ["a", "b", "c", "d", "e"]
    reasons = out.column("drift_reject_reason").to_pylist()
    assert reasons[0] is None and reasons[2] is None and reasons[3] is None
    assert reasons[1] == "no_assistant_turn" and reasons[4] == "empty_response"
    scores = out.column("drift_score").to_pylist()
    assert scores[1] is None and scores[4] is None
    assert out.schema.field("drift_score").type == pa.float32()
    assert out.schema.field("drift_num_tokens").type == pa.int32()


def test_loss_scorer_equals_explicit_nll(model_dir):
    scorer = build_scorer("loss", model=model_dir, adapter="messages", batch_size=2)
    table = pa.Table.from_pylist([ROWS[i] for i in (0, 2, 3)])
    out = scorer(table)
    _, tokenized, _ = scorer.prepare(table)
    expected = explicit_losses(model_dir, tokenized)
    got = np.array(out.column("drift_loss").to_pylist())
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(np.array(out.column("drift_score").to_pylist()), -expected, rtol=1e-5)
    assert out.column("drift_num_tokens").to_pylist() == [sum(t.loss_mask) for t in tokenized]


def test_ifd_is_conditional_over_unconditional_loss(model_dir):
    from drift_stream.data.example_types import TokenizedExample

    scorer = build_scorer("ifd", model=model_dir, adapter="messages")
    table = pa.Table.from_pylist([ROWS[0], ROWS[2]])
    out = scorer(table)
    _, tokenized, _ = scorer.prepare(table)
    cond = explicit_losses(model_dir, tokenized)
    tok = scorer.chat.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    alone = explicit_losses(model_dir, [TokenizedExample(
        id=t.id, input_ids=[start] + [i for i, m in zip(t.input_ids, t.loss_mask) if m],
        loss_mask=[0] + [1] * sum(t.loss_mask)) for t in tokenized])
    ifd = cond / alone
    expected = np.where(ifd > 1, -ifd, ifd)
    np.testing.assert_allclose(np.array(out.column("drift_score").to_pylist()), expected, rtol=1e-5)


def test_scores_do_not_depend_on_batching(model_dir):
    table = pa.Table.from_pylist(ROWS)
    whole = build_scorer("loss", model=model_dir, adapter="messages", batch_size=8)(table)
    pieces = build_scorer("loss", model=model_dir, adapter="messages", batch_size=1)
    parts = pa.concat_tables([pieces(table.slice(0, 2)), pieces(table.slice(2))])
    np.testing.assert_allclose(
        np.array(whole.column("drift_score").to_pylist(), dtype=float),
        np.array(parts.column("drift_score").to_pylist(), dtype=float),
        rtol=1e-5,
    )


def test_random_is_a_function_of_seed_and_id(model_dir):
    table = pa.Table.from_pylist([ROWS[0], ROWS[2], ROWS[3]])
    s0 = build_scorer("random", model=model_dir, seed=0)(table).column("drift_score").to_pylist()
    s0_rev = build_scorer("random", model=model_dir, seed=0)(table.take([2, 1, 0])).column("drift_score").to_pylist()
    s1 = build_scorer("random", model=model_dir, seed=1)(table).column("drift_score").to_pylist()
    assert s0 == s0_rev[::-1]
    assert s0 != s1
    assert s0[0] == pytest.approx(random_unit(0, "a"), rel=1e-6)
    assert all(0 <= s < 1 for s in s0 + s1)


@pytest.mark.parametrize("kind", ["dict", "pandas", "record_batch"])
def test_batch_types_round_trip(model_dir, kind):
    table = pa.Table.from_pylist(ROWS)
    scorer = build_scorer("random", model=model_dir)
    batch = {"dict": table.to_pydict(), "pandas": table.to_pandas(), "record_batch": table.to_batches()[0]}[kind]
    out = scorer(batch)
    expected = scorer(table).column("drift_score").to_pylist()
    if kind == "dict":
        assert isinstance(out, dict) and out["drift_score"] == expected
    elif kind == "pandas":
        assert isinstance(out, pd.DataFrame)
        got = [None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in out["drift_score"]]
        assert got == pytest.approx(expected, nan_ok=True) or got == expected
    else:
        assert isinstance(out, pa.RecordBatch) and out.column("drift_score").to_pylist() == expected


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown scorer"):
        ScoreConfig(scorer="nope")
    with pytest.raises(ConfigError, match="beta"):
        ScoreConfig(beta="sometimes")
    assert ScoreConfig(beta="0.5").beta == 0.5
    with pytest.raises(ConfigError, match="needs --bank"):
        build_scorer("drift", model=None, tokenizer=object())


@pytest.mark.parametrize("scorer, fixed", [("less", 1), ("if", 0)])
def test_the_off_policy_baselines_refuse_another_beta(scorer, fixed, tmp_path, capsys):
    """less / if are defined by their beta: `--beta auto` (or another number) is refused, not silently replaced."""
    for beta in ("auto", 0.5, "2"):
        with pytest.raises(ConfigError, match=f"'{scorer}' is defined with beta={fixed}, so --beta {beta} does not"):
            ScoreConfig(scorer=scorer, beta=beta)
    assert ScoreConfig(scorer=scorer).beta == 1.0  # the flag's default: not given
    assert ScoreConfig(scorer=scorer, beta=float(fixed)).beta == fixed
    assert ScoreConfig(scorer="drift", beta="auto").beta == "auto"
    from drift_stream.cli.main import main

    code = main(["score", "--data", "x.parquet", "--model", "m", "--bank", "b", "--out", str(tmp_path / "o"),
                 "--scorer", scorer, "--beta", "auto"])
    assert code == 2 and "--scorer drift --beta auto" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fit_beta_recovers_a_planted_exponent():
    rng = np.random.default_rng(0)
    norm = np.exp(rng.normal(0, 1, 500))
    raw = rng.choice([-1, 1], 500) * np.exp(rng.normal(0, 0.3, 500)) * norm**0.7
    beta = fit_beta(raw, norm)
    assert beta == pytest.approx(0.7, abs=0.05)
    assert abs(spearman(np.abs(raw) / norm**beta, norm)) < 0.1 < spearman(np.abs(raw), norm)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    x[:5] = 1.0  # ties
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_scored_rows_match_the_published_schema(model_dir):
    import json
    from importlib import resources

    import jsonschema

    schema = json.loads((resources.files("drift_stream") / "schemas" / "scored_columns.schema.json").read_text())
    out = build_scorer("loss", model=model_dir, adapter="messages")(pa.Table.from_pylist(ROWS))
    for row in out.to_pylist():
        jsonschema.validate(row, schema)
    from drift_stream.io import columns

    types = schema["properties"]
    # the published schema names exactly the columns io/columns.py defines (scored, id, and refine's two)
    assert set(types) == {*columns.SCORE_COLUMNS, columns.ID, columns.KEEP, columns.WEIGHT, columns.TURN_KEEP,
                          columns.TURN_WEIGHTS}
    optional = (columns.QUERY_SCORES, columns.TURN_SCORES, columns.TURN_INPUT_WEIGHTS)
    for name in columns.SCORE_COLUMNS:
        if name not in optional:  # only with --keep-query-scores / --granularity turn
            assert out.schema.field(name).type == getattr(pa, types[name]["x-arrow-type"])(), name
    assert not set(optional) & set(out.column_names)
    turned = build_scorer("loss", model=model_dir, adapter="messages", granularity="turn")(pa.Table.from_pylist(ROWS))
    for row in turned.to_pylist():
        jsonschema.validate(row, schema)
    for name in (columns.TURN_SCORES, columns.TURN_INPUT_WEIGHTS):
        assert types[name]["x-arrow-type"] == "list<float32>" and turned.schema.field(name).type == pa.list_(pa.float32())
