"""A tokenizer without a chat template: the plain format is used with one warning that says so, and a bank built
with the template the tokenizer lacks is refused with advice that works (following it scores the run)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.cli.main import main
from drift_stream.data.tokenization import ChatTokenizer
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.grads.projection import FeatureConfig
from drift_stream.model.loading import load_tokenizer
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(dir of a tiny model whose tokenizer has a chat template, dir of the same model whose tokenizer has none,
    a bank built with the first)."""
    root = tmp_path_factory.mktemp("no_template")
    with_template = save_tiny_model(root / "with", arch="llama", seed=1)
    without = save_tiny_model(root / "without", arch="llama", seed=1)
    tokenizer = load_tokenizer(without)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(without)
    for stale in (root / "without").glob("*.jinja"):
        stale.unlink()
    assert load_tokenizer(without).chat_template is None
    queries = [{"id": f"q{i}", "question": f"Tom has {i} apples and buys {i + 2}. How many?",
                "answer": f"#### {2 * i + 2}"} for i in range(6)]
    config = BankConfig(features=FeatureConfig(proj_dim_in=4, proj_dim_out=4),
                        rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=8, seed=3, batch_size=8))
    bank = build_bank(with_template, queries, root / "bank", config,
                      verifier=FunctionVerifier(lambda c, q: (sum(map(ord, c)) % 3) / 2, "test:graded"),
                      progress=False)
    return with_template, without, str(bank.path)


def test_the_plain_format_is_announced_once(models, caplog):
    _, without, _ = models
    tokenizer = load_tokenizer(without)
    with caplog.at_level(logging.WARNING, logger="drift_stream.data.tokenization"):
        chat = ChatTokenizer(tokenizer)
        ChatTokenizer(tokenizer)  # a second ChatTokenizer of the same tokenizer (a bank build, then a score)
    assert chat.config_dict()["template"] == "plain"
    said = [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(said) == 1
    assert without in said[0] and "plain format" in said[0] and "--chat-template FILE" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drift_stream.data.tokenization"):
        ChatTokenizer(load_tokenizer(str(models[0])))  # a template: nothing to say
        ChatTokenizer(tokenizer, use_chat_template=False)  # --no-chat-template: the plain format was asked for
    assert not [r for r in caplog.records if "no chat template" in r.getMessage()]


def test_the_refusal_advice_works(models, tmp_path, capsys):
    with_template, without, bank = models
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": f"r{i}", "messages": [
        {"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]}
        for i in range(6)]), pool)
    args = ["score", "--data", str(pool), "--model", without, "--bank", bank, "--quiet"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    refusal = capsys.readouterr().err
    assert "--chat-template" in refusal
    template = tmp_path / "template.jinja"  # the advice: the template the bank was built with, as a file
    template.write_text(load_tokenizer(with_template).chat_template)
    assert main([*args, "--out", str(tmp_path / "run"), "--chat-template", str(template)]) == 0, \
        capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["rows_scored"] == 6
    # the same scores as the model whose tokenizer carries that template
    assert main(["score", "--data", str(pool), "--model", with_template, "--bank", bank, "--quiet", "--out",
                 str(tmp_path / "same")]) == 0
    assert pq.read_table(tmp_path / "run" / "data").column("drift_score").to_pylist() == \
        pq.read_table(tmp_path / "same" / "data").column("drift_score").to_pylist()
