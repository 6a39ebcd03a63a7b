"""DRIFT scoring end to end on a tiny model: signs, debiasing, the datasets path against the CLI path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.errors import BankMismatchError, ConfigError
from drift_stream.grads.projection import FeatureConfig
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.build import build_scorer
from drift_stream.scoring.drift import DriftScorer
from drift_stream.scoring.stats import spearman

FEATURES = FeatureConfig(proj_dim_in=8, proj_dim_out=8)
ROLLOUTS = RolloutConfig(num_rollouts=8, max_new_tokens=16, seed=5, batch_size=16)
QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(3)]


def parity(completion, query):
    """A deterministic reward that splits the tiny random model's rollouts into correct and incorrect."""
    return float(sum(map(ord, completion)) % 2 == 0)


def inverted_parity(completion, query):
    return 1.0 - parity(completion, query)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    model_dir = save_tiny_model(root / "model", arch="llama", seed=2)
    banks = {}
    for name, fn in (("sign", parity), ("inverted", inverted_parity)):
        config = BankConfig(features=FEATURES, rollouts=ROLLOUTS, preconditioner="identity")
        banks[name] = str(root / name)
        build_bank(model_dir, QUESTIONS, banks[name], config, verifier=FunctionVerifier(fn, f"test:{name}"),
                   progress=False)
    return root, model_dir, banks


def rollout_rows(bank_dir):
    """Training rows identical to each rollout of the bank (question + the rollout's own completion)."""
    rollouts = pq.read_table(f"{bank_dir}/rollouts.parquet").to_pylist()
    questions = {q["id"]: q["question"] for q in QUESTIONS}
    rows = []
    for r in rollouts:
        rows.append({
            "id": f"{r['query_id']}-{r['rollout_index']}",
            "reward": r["reward"],
            "messages": [{"role": "user", "content": questions[r["query_id"]]},
                         {"role": "assistant", "content": r["completion"]}],
        })
    return rows


def test_correct_rollouts_score_above_incorrect_and_flip_when_inverted(setup):
    _, model_dir, banks = setup
    rows = rollout_rows(banks["sign"])
    table = pa.Table.from_pylist(rows)
    rewards = np.array([r["reward"] for r in rows])
    assert 0 < rewards.mean() < 1, "the parity verifier must give both correct and incorrect rollouts"
    for name, sign in (("sign", 1), ("inverted", -1)):
        scorer = build_scorer("drift", model=model_dir, bank=banks[name], beta=1.0, batch_size=4)
        out = scorer(table)
        # Rows whose completion is empty after templating are rejected; compare the scored ones.
        scores = np.array([np.nan if s is None else s for s in out.column("drift_score").to_pylist()])
        ok = np.isfinite(scores)
        correct, incorrect = scores[ok & (rewards == 1)], scores[ok & (rewards == 0)]
        gap = correct.mean() - incorrect.mean()
        assert sign * gap > 0.02, (name, correct.mean(), incorrect.mean())
        # Row by row: most correct rollouts score above most incorrect ones (AUC), reversed under inversion.
        auc = np.mean([c > i for c in correct for i in incorrect])
        assert (auc > 0.75) if sign > 0 else (auc < 0.25), (name, auc)


def test_inverted_bank_negates_every_score(setup):
    _, model_dir, banks = setup
    table = pa.Table.from_pylist(rollout_rows(banks["sign"]))
    a = build_scorer("drift", model=model_dir, bank=banks["sign"], beta=1.0)(table).column("drift_score")
    b = build_scorer("drift", model=model_dir, bank=banks["inverted"], beta=1.0)(table).column("drift_score")
    a = np.array([np.nan if s is None else s for s in a.to_pylist()])
    b = np.array([np.nan if s is None else s for s in b.to_pylist()])
    np.testing.assert_allclose(a, -b, rtol=1e-4, atol=1e-6)


def varied_rows(n=48, seed=0):
    """Rows whose gradient norms span a wide range: short and long, clean and garbled answers."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(1, 60))
        chars = "".join(rng.choice(list("0123456789+= abcxyz#"), size=length))
        rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} + 3?"},
                                                 {"role": "assistant", "content": chars}]})
    return pa.Table.from_pylist(rows)


def test_debiasing_removes_the_pull_of_the_gradient_norm(setup):
    _, model_dir, banks = setup
    table = varied_rows()
    results = {}
    for beta in (0.0, 1.0, "auto"):
        scorer = build_scorer("drift", model=model_dir, bank=banks["sign"], beta=beta)
        if beta == "auto":
            scorer.calibrate(table)
        out = scorer(table)
        score = np.array(out.column("drift_score").to_pylist(), dtype=float)
        norm = np.array(out.column("drift_grad_norm").to_pylist(), dtype=float)
        results[beta] = spearman(np.abs(score), norm)
    # beta = 0 is the raw influence: |score| follows the norm; beta = 1 and auto cut that link.
    assert results[0.0] > 0.5, results
    assert results[1.0] < results[0.0] - 0.1, results  # measured: 0.66 -> 0.46; beta=1 only partly debiases here
    assert abs(results["auto"]) < 0.15, results


def test_datasets_streaming_map_filter_equals_cli_run(setup, tmp_path):
    from datasets import load_dataset

    from drift_stream.cli.main import main
    from drift_stream.integrations.hf_datasets import keep_positive

    _, model_dir, banks = setup
    pool = tmp_path / "pool.parquet"
    pq.write_table(varied_rows(40, seed=1), pool, row_group_size=16)
    run_dir = tmp_path / "run"
    assert main(["score", "--data", str(pool), "--model", model_dir, "--bank", banks["sign"], "--out",
                 str(run_dir), "--batch-size", "5", "--quiet"]) == 0
    cli = pq.read_table(run_dir / "data").to_pylist()
    cli_kept = [r for r in cli if r["drift_score"] > 0]

    scorer = DriftScorer.from_pretrained(model_dir, bank=banks["sign"], adapter="messages")
    ds = load_dataset("parquet", data_files=str(pool), split="train", streaming=True)
    kept = list(ds.map(scorer, batched=True, batch_size=7).filter(keep_positive, batched=True))
    assert 0 < len(kept) < 40
    assert [r["id"] for r in kept] == [r["id"] for r in cli_kept]
    np.testing.assert_allclose([r["drift_score"] for r in kept], [r["drift_score"] for r in cli_kept], rtol=1e-4)
    assert [r["messages"] for r in kept] == [r["messages"] for r in cli_kept]


def test_beta_auto_is_fitted_on_the_input_head_and_recorded(setup, tmp_path):
    from drift_stream.cli.main import main

    _, model_dir, banks = setup
    pool = tmp_path / "pool.parquet"
    pq.write_table(varied_rows(40, seed=2), pool)
    run_dir = tmp_path / "run"
    assert main(["score", "--data", str(pool), "--model", model_dir, "--bank", banks["sign"], "--out",
                 str(run_dir), "--beta", "auto", "--calibration-rows", "32", "--quiet"]) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    info = manifest["scorer_info"]
    assert info["beta_mode"] == "auto" and info["debias"]["calibration_rows"] == 32
    scorer = build_scorer("drift", model=model_dir, bank=banks["sign"], beta="auto")
    assert info["beta"] == pytest.approx(scorer.calibrate(pq.read_table(pool).slice(0, 32)), rel=1e-9)


def test_bank_for_another_model_is_refused(setup, tmp_path):
    _, _, banks = setup
    other = save_tiny_model(tmp_path / "other", arch="llama", seed=99)
    scorer = build_scorer("drift", model=other, bank=banks["sign"])
    with pytest.raises(BankMismatchError, match="rebuild the bank or pass --allow-mismatch"):
        scorer(varied_rows(4))
    allowed = build_scorer("drift", model=other, bank=banks["sign"], allow_mismatch=True)
    assert allowed(varied_rows(4)).num_rows == 4


def test_bank_built_with_another_chat_template_is_refused(setup, tmp_path):
    """A bank built with the tokenizer's chat template must not score rows rendered another way (prompts and targets
    would be tokenized unlike its rollouts); --allow-mismatch lets them through, with a warning."""
    _, model_dir, banks = setup
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    built = json.loads((Path(banks["sign"]) / "manifest.json").read_text())["tokenization"]
    assert built["template"] == "chat" and built["chat_template_sha1"]
    other = build_scorer("drift", model=model_dir, bank=banks["sign"], chat_template=str(template))
    with pytest.raises(BankMismatchError, match="chat template sha1.*--chat-template"):
        other(varied_rows(4))
    plain = build_scorer("drift", model=model_dir, bank=banks["sign"], use_chat_template=False)
    with pytest.raises(BankMismatchError, match="renders rows in the plain format: score with --chat-template FILE"):
        plain(varied_rows(4))
    allowed = build_scorer("drift", model=model_dir, bank=banks["sign"], chat_template=str(template),
                           allow_mismatch=True)
    assert allowed(varied_rows(4)).num_rows == 4
    assert build_scorer("drift", model=model_dir, bank=banks["sign"])(varied_rows(4)).num_rows == 4


def test_off_policy_baselines_need_an_off_policy_bank(setup):
    _, model_dir, banks = setup
    with pytest.raises(ConfigError, match="off-policy"):
        build_scorer("less", model=model_dir, bank=banks["sign"])


def test_score_dataset_with_beta_auto_equals_the_cli(setup, tmp_path):
    from datasets import Dataset

    from drift_stream.cli.main import main
    from drift_stream.integrations.hf_datasets import score_dataset

    _, model_dir, banks = setup
    table = varied_rows(30, seed=3)
    pool = tmp_path / "pool.parquet"
    pq.write_table(table, pool)
    assert main(["score", "--data", str(pool), "--model", model_dir, "--bank", banks["sign"], "--out",
                 str(tmp_path / "run"), "--beta", "auto", "--calibration-rows", "16", "--quiet"]) == 0
    cli = pq.read_table(tmp_path / "run" / "data").to_pylist()
    scorer = DriftScorer.from_pretrained(model_dir, bank=banks["sign"], beta="auto", calibration_rows=16)
    scored = score_dataset(Dataset.from_parquet(str(pool)), scorer, batch_size=8)
    assert scorer.beta is not None
    np.testing.assert_allclose(scored["drift_score"], [r["drift_score"] for r in cli], rtol=1e-4)
