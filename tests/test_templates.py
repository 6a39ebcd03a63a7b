"""Real vocabularies and official chat templates: masks from one render against an independent oracle.

Tokenizers are built once per machine (drift_stream.embedded.vocabs, cached under the temp dir) and once per
session in memory. `python tests/test_templates.py` prints the families x shapes table.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from template_oracle import SHAPES, expected_mask, hf_generation_mask, render  # noqa: E402

from drift_stream.data.example_types import Example, RowError  # noqa: E402
from drift_stream.data.tokenization import ChatTokenizer  # noqa: E402
from drift_stream.embedded.vocabs import FAMILIES, build_tokenizer  # noqa: E402

_CACHE: dict = {}
VOCAB_DIR = Path(os.environ.get("DRIFT_VOCAB_CACHE", Path(tempfile.gettempdir()) / "drift-stream-vocabs-v1"))


def tokenizer(family: str, training: bool = False):
    key = (family, training)
    if key not in _CACHE:
        _CACHE[key] = build_tokenizer(family, VOCAB_DIR, training=training)
    return _CACHE[key]


def outcome(tok, messages, family, oracle):
    """("ok", detail) when our mask equals the oracle's; ("reject", reason) when we reject and the template does
    not render the turn either; ("FAIL", detail) otherwise."""
    ct = ChatTokenizer(tok, max_tokens=100_000)
    try:
        te = ct.encode(Example(id="x", messages=tuple(copy.deepcopy(messages))))
    except RowError as exc:
        return ("reject", exc.reason) if _template_cannot(tok, messages, exc.reason) else ("FAIL", exc.reason)
    ids, mask = oracle(tok, messages, family)
    mask[0] = 0
    if te.input_ids != ids:
        return "FAIL", "input ids differ from one render of the template"
    if te.loss_mask != mask:
        diff = [i for i, (a, b) in enumerate(zip(te.loss_mask, mask)) if a != b]
        return "FAIL", f"mask differs at {diff[:5]}: ours {te.loss_mask[diff[0]]} token {tok.decode(ids[diff[0]])!r}"
    notes = [f"{ct.reasoning_dropped} reasoning dropped"] if ct.reasoning_dropped else []
    if not _prompt_prefix_ok(ct, tok, messages, te):
        notes.append("prompt not a token prefix")
    return "ok", "; ".join(notes)


def _template_cannot(tok, messages, reason):
    if reason.startswith("template_error:"):
        try:
            render(tok, messages, False)
        except Exception:
            return True
        return False
    if reason.startswith("template_span:"):  # the template rendered the row without this turn's text
        text = render(tok, messages, False)
        turn = int(reason.split("assistant turn ")[1].split()[0])
        m = [m for m in messages if m["role"] == "assistant"][turn]
        needles = [m["content"].split("</think>")[-1].strip()] + [c["function"]["name"] for c in
                                                                   m.get("tool_calls", [])]
        return any(n and n not in text for n in needles)
    return False


def _prompt_prefix_ok(ct, tok, messages, te):
    """encode_prompt(messages[:i]) is a token prefix of the row for each assistant turn i exactly when its text is a
    character prefix of the rendered row and no token straddles its end; returns whether it is a prefix for all."""
    text = render(tok, messages, False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    all_ok = True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = render(tok, messages[:i], True)
        ids = ct.encode_prompt(messages[:i])
        is_prefix = te.input_ids[: len(ids)] == ids
        clean = text.startswith(prompt_text) and any(s == len(prompt_text) for s, _ in enc["offset_mapping"])
        assert is_prefix == clean, (i, is_prefix, clean)
        all_ok &= is_prefix
    return all_ok


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_official_template_masks(family, shape):
    status, detail = outcome(tokenizer(family), SHAPES[shape], family, expected_mask)
    assert status != "FAIL", detail


@pytest.mark.slow  # 70 cases over 7 vocabularies: ~1 min on a shared 2-core machine
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if spec.training_template])
def test_training_template_masks_match_hf_generation_mask(family, shape):
    tok = tokenizer(family, training=True)
    status, detail = outcome(tok, SHAPES[shape], family, hf_generation_mask)
    assert status != "FAIL", detail
    if status == "ok":  # and the prefix-render oracle agrees on the training template too
        assert outcome(tok, SHAPES[shape], family, expected_mask)[0] == "ok"


def test_reasoning_dropped_is_counted_and_warned_once(caplog):
    ct = ChatTokenizer(tokenizer("qwen3"), max_tokens=100_000)
    row = Example(id="r", messages=tuple(SHAPES["reasoning every"]))
    with caplog.at_level(logging.WARNING, logger="drift_stream.data.tokenization"):
        ct.encode(row)
        ct.encode(row)
    assert ct.stats() == {"reasoning_dropped": 2}  # the first turn's, each time; the last turn keeps its own
    assert caplog.text.count("the tokenizer's chat template (sha1") == 1 and "drops the reasoning" in caplog.text
    assert ct.pop_stats() == {"reasoning_dropped": 2} and ct.stats() == {"reasoning_dropped": 0}


def test_stop_tokens_come_from_the_template():
    tok = tokenizer("qwen3")  # base-model EOS <|endoftext|>; the template ends turns with <|im_end|>
    ct = ChatTokenizer(tok, stop_tokens=["<|fim_pad|>"])
    ids = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|fim_pad|>")}
    assert ids <= ct.stop_ids
    gptoss = ChatTokenizer(tokenizer("gptoss"))
    # <|end|> closes the analysis message inside one GPT-OSS turn: it must not stop a rollout
    assert tokenizer("gptoss").convert_tokens_to_ids("<|end|>") not in gptoss.stop_ids
    with pytest.raises(Exception, match="not one"):
        ChatTokenizer(tok, stop_tokens=["two words"])


def test_prefill_rollout_and_pool_row_give_identical_tokens():
    """Qwen3.6's generation prompt ends with a "<think>\\n" prefill: a rollout (prompt + completion) and the same
    conversation as a pool row put the same tokens in the loss."""
    tok = tokenizer("qwen3_6")
    ct = ChatTokenizer(tok, max_tokens=100_000)
    query = [{"role": "user", "content": "What is 6*7?"}]
    prompt = ct.encode_prompt(query)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n")
    completion = tok("Six sevens.\n</think>\n\n42<|im_end|>", add_special_tokens=False)["input_ids"]
    rollout = ct.encode_rollout(prompt, completion)
    row = ct.encode(Example(id="p", messages=(*query, {"role": "assistant",
                                                       "content": "<think>\nSix sevens.\n</think>\n\n42"})))
    assert row.input_ids[: len(rollout.input_ids)] == rollout.input_ids
    assert row.loss_mask[: len(rollout.input_ids)] == rollout.loss_mask
    assert sum(row.loss_mask) == sum(rollout.loss_mask)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_warning_where_nothing_is_wrong(family, caplog):
    """Construction and a plain multi-turn row log nothing (Mistral's template has no generation prompt: its turns
    start after [/INST], which is right, so nothing warns)."""
    with caplog.at_level(logging.WARNING):
        ChatTokenizer(tokenizer(family)).encode(Example(id="x", messages=tuple(SHAPES["system+3 turns"])))
    assert caplog.records == []


def test_empty_system_prompt_same_through_messages_and_sharegpt():
    from drift_stream.data.formats import load_adapter

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    via_messages = load_adapter("messages").to_example({"messages": [{"role": "system", "content": ""}] + turns})
    via_sharegpt = load_adapter("sharegpt").to_example(
        {"system": "", "conversations": [{"from": m["role"], "value": m["content"]} for m in turns]})
    assert via_messages.messages == via_sharegpt.messages
    assert via_messages.messages[0] == {"role": "system", "content": ""}
    tok = tokenizer("qwen2_5")  # an empty system turn is kept: Qwen2.5's default system prompt does not appear
    te = ChatTokenizer(tok).encode(via_sharegpt)
    assert "You are Qwen" not in tok.decode(te.input_ids)


def test_tool_turns_reach_the_template_and_carry_no_loss():
    from drift_stream.data.formats import load_adapter

    row = {"messages": copy.deepcopy(SHAPES["tool call+result"])}
    ex = load_adapter("messages").to_example(row)
    assert ex.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather" and ex.messages[1]["content"] is None
    tok = tokenizer("qwen3")
    te = ChatTokenizer(tok).encode(ex)
    loss_text = tok.decode([t for t, m in zip(te.input_ids, te.loss_mask) if m])
    assert "get_weather" in loss_text and "18 C and sunny in Paris." in loss_text
    assert "<tool_response>" not in loss_text and loss_text.count("18 C and sunny") == 1


def test_template_error_names_the_message_and_quotes_the_template():
    tok = tokenizer("gemma3")  # Gemma 3 requires alternating user/assistant turns
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(RowError) as err:
        ChatTokenizer(tok).encode(Example(id="x", messages=tuple(messages)))
    assert err.value.reason.startswith("template_error:message 1 (user): TemplateError: Conversation roles must")


def results_table() -> str:
    rows = ["| family | " + " | ".join(SHAPES) + " |", "|---" * (len(SHAPES) + 1) + "|"]
    for family, spec in FAMILIES.items():
        for training in (False, True) if spec.training_template else (False,):
            oracle = hf_generation_mask if training else expected_mask
            cells = []
            for shape, messages in SHAPES.items():
                status, detail = outcome(tokenizer(family, training), messages, family, oracle)
                cells.append(status + (f" ({detail[:70]})" if detail else ""))
            name = family + (" training (HF mask)" if training else "") + ("" if spec.real_vocab else " [stand-in vocab]")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(results_table())


# ------------------------------------------------------------------------------------------------ end to end


def _model_dir(root: Path, family: str) -> str:
    """A tiny random qwen2 model (2 layers, hidden 16) over the family's real vocabulary, saved with the tokenizer."""
    from drift_stream.embedded.tiny_models import make_tiny_model

    tok = tokenizer(family)
    model = make_tiny_model("qwen2", vocab_size=len(tok), hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32, max_positions=512, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
    path = root / family
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "r1_distill"])
def test_bank_build_and_drift_score_end_to_end(tmp_path, family):
    """120 good rows + 1 row whose only assistant text the template drops -> 120 scored, 1 rejected naming the
    turn; the bank's rollouts stop at the template's end-of-turn token and truncation is counted."""
    import json

    import pyarrow.parquet as pq

    from drift_stream.cli.main import main

    model = _model_dir(tmp_path, family)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)})
                               + "\n" for i in range(4)))
    rows = [{"id": f"r{i:03d}", "messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                             {"role": "assistant", "content": f"<think>\nAdd one.\n</think>\n\n{i + 1}"}]}
            for i in range(120)]
    bad = {"id": "bad", "messages": [{"role": "user", "content": "Think only."},
                                     {"role": "assistant", "content": "<think>\nHmm.\n</think>"},
                                     {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Done."}]}
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows[:60] + [bad] + rows[60:]))
    bank = tmp_path / "bank"
    assert main(["bank", "build", "--model", model, "--queries", str(queries), "--out", str(bank), "--rollouts", "2",
                 "--max-new-tokens", "6", "--proj-dim", "4", "--preconditioner", "identity", "-q"]) == 0
    manifest = json.loads((bank / "manifest.json").read_text())
    trunc = manifest["truncation"]
    assert trunc["rollouts"] == 8 and trunc["truncated"] == sum(q["truncated"] for q in manifest["queries"])
    stops = set(manifest["tokenization"]["stop_token_ids"])
    assert tokenizer(family).convert_tokens_to_ids(FAMILIES[family].eos) in stops
    rollouts = pq.read_table(bank / "rollouts.parquet").to_pylist()
    for r in rollouts:  # each completion ends at its first stop token, or was cut by max_new_tokens
        ids = r["completion_ids"]
        assert (r["finish_reason"] == "eos") == bool(set(ids) & stops)
        assert all(t not in stops for t in ids[:-1])
    out = tmp_path / "run"
    assert main(["score", "--data", str(pool), "--model", model, "--bank", str(bank), "--out", str(out),
                 "--scorer", "drift", "-q"]) == 0
    run = json.loads((out / "manifest.json").read_text())
    assert run["rows_in"] == 121 and run["rows_scored"] == 120 and run["rows_rejected"] == 1
    (reject,) = pq.read_table(next((out / "rejects").glob("*.parquet"))).to_pylist()
    assert reject["id"] == "bad"
    assert reject["drift_reject_reason"].startswith("template_span:assistant turn 0 (message 1)")
    # R1's template strips the reasoning of every assistant turn; Qwen3's keeps it after the last user turn
    assert run["reasoning_dropped"] == (120 if family == "r1_distill" else 0)


@pytest.mark.slow
def test_prefill_rollout_and_pool_row_give_identical_features():
    """R1's generation prompt ends with the "<think>\\n" prefill; with its training template (which keeps the
    reasoning) a rollout and the same conversation as a pool row get the same gradient features."""
    import torch

    from drift_stream.data.tokenization import collate
    from drift_stream.embedded.tiny_models import make_tiny_model
    from drift_stream.grads.features import GradientFeaturizer
    from drift_stream.grads.projection import FeatureConfig

    tok = tokenizer("r1_distill", training=True)
    ct = ChatTokenizer(tok, max_tokens=4096)
    query = [{"role": "user", "content": "What is 6*7?"}]
    prompt = ct.encode_prompt(query)
    assert tok.decode(prompt).endswith("<｜Assistant｜><think>\n")
    completion = tok("Six sevens.</think>\n\n42<｜end▁of▁sentence｜>", add_special_tokens=False)["input_ids"]
    rollout = ct.encode_rollout(prompt, completion)
    row = ct.encode(Example(id="p", messages=(*query, {"role": "assistant",
                                                       "content": "<think>\nSix sevens.</think>\n\n42"})))
    assert (row.input_ids, row.loss_mask) == (rollout.input_ids, rollout.loss_mask)
    model = make_tiny_model("qwen2", vocab_size=len(tok), hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    featurizer = GradientFeaturizer(model, FeatureConfig(proj_dim_in=4, proj_dim_out=4))
    feats = featurizer.featurize(collate([rollout, row], ct.pad_token_id)).features
    torch.testing.assert_close(feats[0], feats[1], rtol=0, atol=0)


def test_truncated_rollouts_counted_and_excluded_on_request(tmp_path, caplog):
    """--stop-token ends rollouts; a rollout cut by max_new_tokens is counted per query; --truncated exclude leaves
    it out of its query's vector (failure_reason "truncated"), negative (the default) signs it like any other."""
    import pyarrow.parquet as pq

    from drift_stream.bank.build import build_bank
    from drift_stream.bank.config import BankConfig
    from drift_stream.embedded.tiny_models import save_tiny_model
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.rollouts.engine import RolloutConfig
    from drift_stream.rollouts.verifiers import FunctionVerifier

    model = save_tiny_model(tmp_path / "m", "llama")
    queries = [{"id": f"q{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(3)]
    graded = FunctionVerifier(lambda completion, query: (sum(map(ord, completion)) % 3) / 2, "test:graded")
    tables, banks = {}, {}
    for policy in ("negative", "exclude"):
        cfg = BankConfig(features=FeatureConfig(proj_dim_in=4, proj_dim_out=4), preconditioner="identity",
                         rollouts=RolloutConfig(num_rollouts=4, max_new_tokens=8, seed=1), truncated=policy,
                         signing="advantage", stop_tokens=tuple("aeiou "))  # the char model stops on a vowel
        with caplog.at_level(logging.WARNING, logger="drift_stream.bank"):
            banks[policy] = build_bank(model, queries, tmp_path / policy, cfg, verifier=graded, progress=False)
        tables[policy] = pq.read_table(tmp_path / policy / "rollouts.parquet").to_pylist()
    table = tables["negative"]
    cut = [r for r in table if r["finish_reason"] == "length"]
    done = [r for r in table if r["finish_reason"] == "eos"]
    assert cut and done and all(r["completion"][-1] in "aeiou " for r in done)
    assert all(len(r["completion_ids"]) == 8 for r in cut)
    manifest = banks["negative"].manifest
    assert manifest["truncation"] == {"rollouts": 12, "truncated": len(cut), "policy": "negative",
                                      "max_new_tokens": 8}
    assert [q["truncated"] for q in manifest["queries"]] == [sum(r["query_id"] == q["id"] for r in cut)
                                                             for q in manifest["queries"]]
    assert all(r["failure_reason"] is None for r in cut)
    assert "were cut by --max-new-tokens 8" in caplog.text and "rollouts (policy negative)" in banks["negative"].summary()
    excl = tables["exclude"]  # the same rollouts (same seeds); only what counts changes
    assert [r["completion_ids"] for r in excl] == [r["completion_ids"] for r in table]
    assert [r["failure_reason"] for r in excl] == [("truncated" if r["finish_reason"] == "length" else None)
                                                  for r in table]
    assert all(r["sign"] is None for r in excl if r["finish_reason"] == "length")


def test_chat_template_choice_on_cli_and_python_entry_points(tmp_path):
    from drift_stream.bank.config import BankConfig
    from drift_stream.cli.parser import build_parser
    from drift_stream.embedded.vocabs import site_file
    from drift_stream.errors import ConfigError
    from drift_stream.scoring.build import build_scorer

    training = site_file("trl", "chat_templates", "qwen3_training.jinja")
    tok = tokenizer("qwen3")
    chat = build_scorer("random", model=None, tokenizer=tok, chat_template=str(training)).chat
    assert chat.template == training.read_text() and chat.template_name == f"--chat-template {training}"
    plain = build_scorer("random", model=None, tokenizer=tok, use_chat_template=False).chat
    assert plain.config_dict()["template"] == "plain"
    with pytest.raises(ConfigError, match="exclude each other"):
        build_scorer("random", model=None, tokenizer=tok, chat_template=str(training), use_chat_template=False)
    with pytest.raises(ConfigError, match="cannot read"):
        build_scorer("random", model=None, tokenizer=tok, chat_template=str(tmp_path / "missing.jinja"))
    assert BankConfig(chat_template=str(training), stop_tokens=["<|fim_pad|>"]).stop_tokens == ("<|fim_pad|>",)
    parser = build_parser()
    score = ["score", "--data", "x.jsonl", "--model", "m", "--out", "o"]
    args = parser.parse_args(score + ["--chat-template", "t.jinja", "--stop-token", "<a>", "--stop-token", "<b>"])
    assert (args.chat_template, args.use_chat_template, args.stop_tokens) == ("t.jinja", True, ["<a>", "<b>"])
    assert parser.parse_args(score + ["--no-chat-template"]).use_chat_template is False
    with pytest.raises(SystemExit):
        parser.parse_args(score + ["--no-chat-template", "--chat-template", "t.jinja"])
    bank = parser.parse_args(["bank", "build", "--model", "m", "--queries", "q", "--out", "b", "--truncated", "exclude",
                              "--no-chat-template"])
    assert (bank.truncated, bank.use_chat_template) == ("exclude", False)
