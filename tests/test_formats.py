"""Format adapters, row ids, chat tokenization with loss masks, collate."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch

from drift_stream.data.example_types import Example, RowError, TokenizedExample
from drift_stream.data.formats import (
    content_hash,
    list_adapters,
    load_adapter,
    reference_example,
)
from drift_stream.data.tokenization import ChatTemplateError, ChatTokenizer, collate
from drift_stream.embedded.tiny_models import make_char_tokenizer
from drift_stream.errors import AdapterError, ConfigError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SHAREGPT_ROW = {
    "id": "sg-17",
    "conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "What is 2+3?"},
        {"from": "gpt", "value": "5"},
        {"from": "human", "value": "Times 4?"},
        {"from": "gpt", "value": "20"},
    ],
}
GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


@pytest.fixture(scope="module")
def char_tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return make_char_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE tokenizer trained in code, with a ChatML template (Qwen-style headers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello there, how are you today?", "The answer is 42.", ":::: ::: ::x", GSM8K_ROW["question"]] * 50
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def masked_spans(tok, te: TokenizedExample) -> list[str]:
    """Decoded runs of consecutive loss tokens."""
    spans, run = [], []
    for t, m in zip(te.input_ids + [None], te.loss_mask + [0]):
        if m:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


# ------------------------------------------------------------------------------------------------ adapters


def test_builtins_listed_and_valid():
    names = [n for n, _ in list_adapters()]
    assert names == ["alpaca", "messages", "prompt_completion", "qa", "sharegpt", "text"]
    for name in names:
        assert load_adapter(name).name == name


def test_unknown_adapter_lists_available():
    with pytest.raises(AdapterError, match="unknown adapter 'chatml'.*alpaca, messages, prompt_completion, qa"):
        load_adapter("chatml")


def test_messages_adapter_openai_row():
    row = {
        "id": 1234,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}]},
            {"role": "assistant", "content": "Paris."},
        ],
        "source": "web",
    }
    ex = load_adapter("messages").to_example(row)
    assert ex.id == "1234"
    assert ex.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    )
    assert ex.text is None and ex.answer is None


def test_sharegpt_roles_and_system_column():
    adapter = load_adapter("sharegpt")
    ex = adapter.to_example(SHAREGPT_ROW)
    assert ex.id == "sg-17"
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex.messages[4]["content"] == "20"
    row = {"system": "Answer in French.", "conversations": SHAREGPT_ROW["conversations"][1:3]}
    ex = adapter.to_example(row)
    assert ex.messages[0] == {"role": "system", "content": "Answer in French."}
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
    # a system column beside a system turn (issue 22): reconciled as LLaMA-Factory does
    turn = SHAREGPT_ROW["conversations"][0]["value"]
    expected = adapter.to_example({"conversations": SHAREGPT_ROW["conversations"]}).messages
    for column in ("", "   ", turn):  # empty column: the turn; the same text: one system prompt
        ex = adapter.to_example({"system": column, "conversations": SHAREGPT_ROW["conversations"]})
        assert ex.messages == expected and [m["role"] for m in ex.messages].count("system") == 1
    with pytest.raises(RowError) as err:  # two different prompts: set aside with its reason
        adapter.to_example({"system": "x", "conversations": SHAREGPT_ROW["conversations"]})
    assert err.value.reason == "conflicting_system"
    with pytest.raises(RowError) as err:
        adapter.to_example({"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "yo"}]})
    assert err.value.reason == "invalid_role:bing"


@pytest.mark.parametrize(
    "row, user",
    [
        ({"instruction": "Give a synonym.", "input": "happy", "output": "glad"}, "Give a synonym.\n\nhappy"),
        ({"instruction": "Name a color.", "input": "", "output": "Blue."}, "Name a color."),
        ({"instruction": "Name a color.", "output": "Blue."}, "Name a color."),
    ],
)
def test_alpaca_with_and_without_input(row, user):
    ex = load_adapter("alpaca").to_example(row)
    assert ex.messages == ({"role": "user", "content": user}, {"role": "assistant", "content": row["output"]})


def test_alpaca_system():
    ex = load_adapter("alpaca").to_example({"instruction": "Hi", "output": "Hello", "system": "Be kind."})
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]


def test_prompt_completion_standard_and_conversational(char_tok):
    adapter = load_adapter("prompt_completion")
    ex = adapter.to_example({"prompt": "The sky is", "completion": " blue."})
    assert (ex.prompt, ex.response, ex.messages) == ("The sky is", " blue.", None)
    te = ChatTokenizer(char_tok).encode(ex)  # no template, loss on completion + eos
    assert char_tok.decode(te.input_ids) == "The sky is blue.<|end|>"
    assert masked_spans(char_tok, te) == [" blue.<|end|>"]
    row = {
        "prompt": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "What color is the sky?"}],
        "completion": [{"role": "assistant", "content": "It is blue."}],
    }
    ex = adapter.to_example(row)
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
    assert ex.messages[2]["content"] == "It is blue."


def test_prompt_completion_chat_strings_by_user_yaml(tmp_path):
    path = tmp_path / "pc_chat.yaml"
    path.write_text(
        "name: pc_chat\ndescription: strings as chat turns\nkind: prompt_completion\n"
        "fields: {prompt: q, completion: a, system: sys}\nstring_format: chat\nid_field: uid\n"
    )
    adapter = load_adapter(str(path))
    assert adapter.source == str(path)
    ex = adapter.to_example({"uid": "u1", "q": "Hi", "a": "Hello", "sys": "S"})
    assert ex.id == "u1"
    assert ex.messages == (
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    )
    assert adapter.config_dict()["fields"] == {"prompt": "q", "completion": "a", "system": "sys"}


def test_text_adapter_and_encoding(char_tok):
    ex = load_adapter("text").to_example({"text": "abc"})
    assert ex.text == "abc"
    te = ChatTokenizer(char_tok).encode(ex)
    assert te.input_ids == char_tok.convert_tokens_to_ids(["a", "b", "c", "<|end|>"])
    assert te.loss_mask == [0, 1, 1, 1]


def test_qa_gsm8k_answer_extraction():
    adapter = load_adapter("qa")
    ex = adapter.to_example(GSM8K_ROW)
    assert ex.answer == "72"
    assert ex.messages == ({"role": "user", "content": GSM8K_ROW["question"]},)
    assert ex.reference == GSM8K_ROW["answer"]
    assert adapter.to_example({"question": "q", "answer": "  no marker here \n"}).answer == "no marker here"
    assert adapter.to_example({"question": "q", "answer": 42}).answer == "42"
    full = reference_example(ex)
    assert full.messages[-1] == {"role": "assistant", "content": GSM8K_ROW["answer"]}
    assert full.answer == "72"


def test_qa_pattern_without_group(tmp_path):
    path = tmp_path / "boxed.yaml"
    path.write_text(
        "name: boxed\ndescription: d\nkind: qa\nfields: {question: problem, answer: solution}\n"
        "answer_patterns: ['\\d+(?=\\s*$)']\n"
    )
    ex = load_adapter(path).to_example({"problem": "p", "solution": "so it is 17 "})
    assert ex.answer == "17"


# ---------------------------------------------------------------------------------------------- row ids


def test_row_id_hash_is_canonical_json_sha1():
    """No id: sha1 of the canonical JSON of the adapter's own fields (other columns, drift_* and nulls left out)."""
    adapter = load_adapter("messages")
    row = {"messages": [{"role": "user", "content": "hé"}], "n": 3, "drift_score": 0.5}
    expected = hashlib.sha1(
        json.dumps({"messages": row["messages"]}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        .encode("utf-8")
    ).hexdigest()
    assert adapter.row_id(row) == expected
    assert adapter.row_id({**row, "drift_score": 9.0}) == expected  # drift_* columns left out
    assert adapter.row_id({**row, "n": 4}) == expected  # a column the adapter does not read
    assert adapter.row_id({**row, "id": None}) == expected  # a null id column: no id
    assert adapter.row_id({**row, "id": ""}) == expected
    assert adapter.row_id({**row, "messages": [{"role": "user", "content": "he"}]}) != expected
    # pandas rows hold list columns as numpy arrays and ints as numpy scalars: same hash
    assert content_hash({"a": np.array([1, 2]), "b": np.int64(3)}) == content_hash({"a": [1, 2], "b": 3})
    assert content_hash({"a": 3.0, "b": None}) == content_hash({"a": "3"})  # numbers as text, nulls dropped
    assert load_adapter("text").row_id({"id": 7, "text": "x"}) == "7"


# -------------------------------------------------------------------------------------------- rejects


@pytest.mark.parametrize(
    "adapter, row, reason",
    [
        ("messages", {"msgs": []}, "missing_field:messages"),
        ("messages", {"messages": None}, "missing_field:messages"),
        ("messages", {"messages": "hello"}, "wrong_type:messages"),
        ("messages", {"messages": ["hello"]}, "wrong_type:messages"),
        ("messages", {"messages": []}, "empty_conversation"),
        ("messages", {"messages": [{"content": "x"}]}, "missing_field:messages.role"),
        ("messages", {"messages": [{"role": 1, "content": "x"}]}, "wrong_type:messages.role"),
        ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "invalid_role:bot"),
        ("messages", {"messages": [{"role": "user"}]}, "missing_field:messages.content"),
        ("messages", {"messages": [{"role": "user", "content": 5}]}, "wrong_type:messages.content"),
        (
            "messages",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
            "unsupported_content:image_url",
        ),
        ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]},
            "empty_response",
        ),
        (
            "messages",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "misplaced_system",
        ),
        ("alpaca", {"instruction": "do", "output": ""}, "empty_response"),
        ("alpaca", {"instruction": " ", "output": "x"}, "empty_field:instruction"),
        ("alpaca", {"instruction": "do"}, "missing_field:output"),
        ("alpaca", {"instruction": "do", "input": 3, "output": "x"}, "wrong_type:input"),
        ("prompt_completion", {"prompt": "p", "completion": "  "}, "empty_response"),
        ("prompt_completion", {"prompt": "p", "completion": 3}, "wrong_type:completion"),
        ("text", {"text": ""}, "empty_field:text"),
        ("text", {"text": ["a"]}, "wrong_type:text"),
        ("qa", {"question": "q"}, "missing_field:answer"),
        ("qa", {"question": "", "answer": "1"}, "empty_field:question"),
        ("qa", {"question": "q", "answer": True}, "wrong_type:answer"),
        ("qa", {"question": "q", "answer": " "}, "empty_field:answer"),
    ],
)
def test_reject_reasons(adapter, row, reason):
    with pytest.raises(RowError) as err:
        load_adapter(adapter).to_example(row)
    assert err.value.reason == reason


# ------------------------------------------------------------------------------------------ specs


def test_yaml_failing_schema_lists_problems(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nkind: conversation\nfields: {messages: 3, text: t}\nroles: {human: robot}\nextra: 1\n"
    )
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    text = str(err.value)
    for needle in [
        "'description' is a required property",
        "Additional properties are not allowed ('extra'",
        "fields.messages: 3 is not of type 'string'",
        "'text' is not one of ['messages', 'system']",
        "roles.human: 'robot' is not one of ['system', 'user', 'assistant', 'tool']",
    ]:
        assert needle in text


@pytest.mark.parametrize(
    "body, needle",
    [
        ("kind: text\nroles: {a: user}\n", "roles: does not apply to kind 'text'"),
        ("kind: qa\nanswer_patterns: ['(unclosed']\n", "is not a valid regular expression"),
        ("kind: prompt_completion\nfields: {system: s}\n", "needs string_format: chat"),
        ("kind: [unclosed\n", "not valid YAML"),
    ],
)
def test_spec_semantic_errors(tmp_path, body, needle):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ndescription: d\n" + body)
    with pytest.raises(AdapterError, match=None) as err:
        load_adapter(path)
    assert needle in str(err.value)


def test_builtin_name_wins_over_a_file_in_cwd(tmp_path, monkeypatch):
    (tmp_path / "messages").write_text("not yaml: [")
    monkeypatch.chdir(tmp_path)
    assert load_adapter("messages").source == "builtin:messages"


def test_missing_path_and_non_mapping(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(AdapterError, match="expected a mapping"):
        load_adapter(tmp_path / "list.yaml")


# ------------------------------------------------------------------------------------------ tokenization


def expected_char_mask(tokens: list[str]) -> list[int]:
    """Independent rule for the char template: loss from after <|assistant|> through the next <|end|>."""
    mask, inside = [], False
    for tok in tokens:
        mask.append(1 if inside else 0)
        if tok == "<|assistant|>":
            inside = True
        elif tok == "<|end|>":
            inside = False
    return mask


def test_multiturn_mask_chat_template_token_by_token(char_tok):
    ex = load_adapter("sharegpt").to_example(SHAREGPT_ROW)
    te = ChatTokenizer(char_tok).encode(ex)
    tokens = char_tok.convert_ids_to_tokens(te.input_ids)
    assert char_tok.decode(te.input_ids) == char_tok.apply_chat_template(list(ex.messages), tokenize=False)
    assert te.loss_mask == expected_char_mask(tokens)
    assert masked_spans(char_tok, te) == ["5<|end|>", "20<|end|>"]
    assert sum(te.loss_mask) == 5


def test_multiturn_mask_plain_template(plain_tok):
    ex = load_adapter("sharegpt").to_example(SHAREGPT_ROW)
    ct = ChatTokenizer(plain_tok)
    assert ct.config_dict()["template"] == "plain"
    te = ct.encode(ex)
    pieces = [
        ("System: You are terse.\n\nUser: What is 2+3?\n\nAssistant:", 0),
        (" 5", 1),
        ("<|end|>", 1),
        ("\n\nUser: Times 4?\n\nAssistant:", 0),
        (" 20", 1),
        ("<|end|>", 1),
    ]
    tokens, mask = [], []
    for text, loss in pieces:
        toks = [text] if text.startswith("<|") else list(text)
        tokens += toks
        mask += [loss] * len(toks)
    assert plain_tok.convert_ids_to_tokens(te.input_ids) == tokens
    assert te.loss_mask == mask


def test_multiturn_mask_bpe_chatml(bpe_tok):
    ex = load_adapter("sharegpt").to_example(SHAREGPT_ROW)
    ct = ChatTokenizer(bpe_tok)
    te = ct.encode(ex)
    rendered = bpe_tok.apply_chat_template(list(ex.messages), tokenize=False)
    assert te.input_ids == bpe_tok(rendered, add_special_tokens=False)["input_ids"]
    assert masked_spans(bpe_tok, te) == ["5<|im_end|>", "20<|im_end|>"]
    # the "\n" the template puts after <|im_end|> carries no loss
    end = bpe_tok.convert_tokens_to_ids("<|im_end|>")
    last = max(i for i, t in enumerate(te.input_ids) if t == end)
    assert te.loss_mask[last] == 1 and te.loss_mask[last + 1 :] == [0] * (len(te.input_ids) - last - 1)


@pytest.mark.parametrize("fixture", ["char_tok", "plain_tok", "bpe_tok"])
def test_encode_prompt_is_prefix_before_each_assistant_turn(request, fixture):
    tok = request.getfixturevalue(fixture)
    ct = ChatTokenizer(tok)
    ex = load_adapter("sharegpt").to_example(SHAREGPT_ROW)
    te = ct.encode(ex)
    for i in (2, 4):
        prompt = ct.encode_prompt(ex.messages[:i])
        assert te.input_ids[: len(prompt)] == prompt
        assert te.loss_mask[len(prompt) - 1] == 0 and te.loss_mask[len(prompt)] == 1


def test_qa_prompt_and_rollout(char_tok):
    ct = ChatTokenizer(char_tok)
    q = load_adapter("qa").to_example(GSM8K_ROW)
    with pytest.raises(RowError) as err:
        ct.encode(q)
    assert err.value.reason == "no_loss_tokens"
    prompt = ct.encode_prompt(q.messages)
    assert char_tok.decode(prompt) == f"<|user|>{GSM8K_ROW['question']}<|end|>\n<|assistant|>"
    eos, pad = char_tok.eos_token_id, char_tok.pad_token_id
    completion = char_tok("72", add_special_tokens=False)["input_ids"] + [eos, pad, pad]
    te = ct.encode_rollout(prompt, completion, id="q0#1")
    assert te.id == "q0#1"
    assert te.input_ids == prompt + completion[:3]
    assert te.loss_mask == [0] * len(prompt) + [1, 1, 1]
    # the rollout is tokenized exactly like the same turn written as a training row
    row = ct.encode(Example(id="r", messages=q.messages + ({"role": "assistant", "content": "72"},)))
    assert row.input_ids[: len(te.input_ids)] == te.input_ids
    with pytest.raises(RowError) as err:
        ct.encode_rollout(prompt, [])
    assert err.value.reason == "no_loss_tokens"


def test_encode_response_only(char_tok, plain_tok):
    ex = load_adapter("sharegpt").to_example(SHAREGPT_ROW)
    te = ChatTokenizer(char_tok).encode_response_only(ex)
    assert char_tok.decode(te.input_ids) == "<|end|>5<|end|>20<|end|>"
    assert te.loss_mask == [0, 1, 1, 1, 1, 1]
    te = ChatTokenizer(plain_tok).encode_response_only(ex)
    assert plain_tok.decode(te.input_ids) == "<|end|> 5<|end|> 20<|end|>"
    assert te.loss_mask == [0] + [1] * 7
    pc = Example(id="p", prompt="The sky is", response=" blue.")
    te = ChatTokenizer(char_tok).encode_response_only(pc)
    assert char_tok.decode(te.input_ids) == "<|end|> blue.<|end|>"
    assert te.loss_mask == [0] + [1] * 7


def test_bos_tokenizer_plain_template():
    """A tokenizer that prepends BOS: it leads every sequence and starts response-only encodings."""
    from tokenizers import processors

    tok = make_char_tokenizer(chat_template=False)
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("ab")["input_ids"][0] == bos
    ct = ChatTokenizer(tok)
    te = ct.encode(Example(id="t", text="ab"))
    assert te.input_ids == [bos] + tok.convert_tokens_to_ids(["a", "b", "<|end|>"])
    assert te.loss_mask == [0, 1, 1, 1]
    te = ct.encode_response_only(Example(id="m", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})))
    assert te.input_ids == [bos] + tok.convert_tokens_to_ids([" ", "a", "<|end|>"])
    assert ct.encode_prompt([{"role": "user", "content": "q"}])[0] == bos


def test_overlong_policies(char_tok):
    ex = load_adapter("sharegpt").to_example(SHAREGPT_ROW)
    full = ChatTokenizer(char_tok, max_tokens=4096).encode(ex)
    n = len(full.input_ids)
    with pytest.raises(RowError) as err:
        ChatTokenizer(char_tok, max_tokens=n - 1).encode(ex)
    assert err.value.reason == f"too_long:{n}>{n - 1}"
    assert ChatTokenizer(char_tok, max_tokens=n).encode(ex) == full
    cut = ChatTokenizer(char_tok, max_tokens=n - 3, overlong="truncate").encode(ex)
    assert cut.input_ids == full.input_ids[: n - 3] and cut.loss_mask == full.loss_mask[: n - 3]
    first_loss = full.loss_mask.index(1)
    with pytest.raises(RowError) as err:
        ChatTokenizer(char_tok, max_tokens=first_loss, overlong="truncate").encode(ex)
    assert err.value.reason == "no_loss_tokens"
    with pytest.raises(RowError) as err:
        ChatTokenizer(char_tok, max_tokens=10).encode_prompt(ex.messages[:2])
    assert err.value.reason.startswith("too_long:")


def test_tokenizer_config_errors(char_tok):
    with pytest.raises(ConfigError, match="max_tokens"):
        ChatTokenizer(char_tok, max_tokens=1)
    with pytest.raises(ConfigError, match="overlong"):
        ChatTokenizer(char_tok, overlong="drop")
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatTokenizer(make_char_tokenizer(chat_template=False), use_chat_template=True)
    no_eos = make_char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ConfigError, match="no eos_token"):
        ChatTokenizer(no_eos)
    with pytest.raises(ValueError, match="exactly one"):
        Example(id="x", text="a", messages=())


def test_template_dropping_earlier_turns_rejects_only_rows_it_breaks(char_tok, caplog):
    """No start-up probe refuses a template: a row whose assistant text the template does not render is one reject
    naming the turn; rows it renders are encoded."""
    tok = make_char_tokenizer()
    tok.chat_template = (  # blanks every assistant turn but the last
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|assistant|><|end|>\n"
        "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    ct = ChatTokenizer(tok)
    one = Example(id="a", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}))
    assert masked_spans(tok, ct.encode(one)) == ["Yo<|end|>"]
    two = Example(id="b", messages=one.messages + ({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}))
    with pytest.raises(RowError) as err:
        ct.encode(two)
    assert err.value.reason.startswith("template_span:assistant turn 0 (message 1)")


def test_template_exception_and_token_merge(bpe_tok):
    tok = make_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    with pytest.raises(RowError) as err:
        ChatTokenizer(tok).encode(load_adapter("messages").to_example(row))
    assert err.value.reason == "template_error:message 1 (user): TemplateError: roles must alternate"
    # a header ending in ':' merges with content starting with '::' under this BPE: the merged token straddles the
    # turn's start and carries the loss (as in HF's assistant-token masks), rather than rejecting the row
    bpe = bpe_tok.__class__(tokenizer_object=bpe_tok.backend_tokenizer, eos_token="<|im_end|>")
    bpe.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    ct = ChatTokenizer(bpe)
    ok = Example(id="a", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x::"}))
    assert masked_spans(bpe, ct.encode(ok)) == ["x::<|im_end|>"]
    merged = Example(id="b", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "::x"}))
    te = ct.encode(merged)
    (span,) = masked_spans(bpe, te)
    assert span.endswith("::x<|im_end|>") and span in (":::x<|im_end|>", "::x<|im_end|>")
    assert bpe.decode(te.input_ids) == "user:Hi<|im_end|>assistant:::x<|im_end|>"


def test_template_ignoring_generation_prompt_masks_content_without_warning(caplog):
    """No generation prompt: a turn starts after the token closing the previous message, so the model writes its own
    header (<|assistant|>) and it is in the loss, as in a rollout from the same prompt; nothing warns."""
    tok = make_char_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    with caplog.at_level(logging.WARNING):
        ct = ChatTokenizer(tok)
        te = ct.encode(Example(id="a", messages=({"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Yo"})))
    assert masked_spans(tok, te) == ["<|assistant|>Yo<|end|>"]
    assert ct.encode_prompt(te_messages := [{"role": "user", "content": "Hi"}]) == te.input_ids[:4]
    assert tok.decode(ct.encode_prompt(te_messages)) == "<|user|>Hi<|end|>"
    assert caplog.text == ""


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate(side):
    a = TokenizedExample(id="a", input_ids=[5, 6, 7], loss_mask=[0, 1, 1])
    b = TokenizedExample(id="b", input_ids=[8, 9, 10, 11, 12], loss_mask=[0, 0, 1, 1, 1])
    out = collate([a, b], pad_token_id=0, padding_side=side)
    if side == "right":
        ids, att, loss = [[5, 6, 7, 0, 0], b.input_ids], [[1, 1, 1, 0, 0], [1] * 5], [[0, 1, 1, 0, 0], b.loss_mask]
    else:
        ids, att, loss = [[0, 0, 5, 6, 7], b.input_ids], [[0, 0, 1, 1, 1], [1] * 5], [[0, 0, 0, 1, 1], b.loss_mask]
    assert torch.equal(out["input_ids"], torch.tensor(ids, dtype=torch.long))
    assert torch.equal(out["attention_mask"], torch.tensor(att, dtype=torch.long))
    assert torch.equal(out["loss_mask"], torch.tensor(loss, dtype=torch.float32))
    with pytest.raises(ValueError, match="padding_side"):
        collate([a], pad_token_id=0, padding_side="middle")


def test_first_token_never_carries_loss(char_tok):
    te = ChatTokenizer(char_tok).encode_rollout([], char_tok("ab", add_special_tokens=False)["input_ids"])
    assert te.loss_mask == [0, 1]


def test_rows_from_parquet_and_pandas(tmp_path):
    """Rows as pyarrow.to_pylist and pandas to_dict give the same examples and ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"conversations": SHAREGPT_ROW["conversations"], "source": "a"},
            {"conversations": SHAREGPT_ROW["conversations"][1:3], "source": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet")
    adapter = load_adapter("sharegpt")
    from_arrow = [adapter.to_example(r) for r in table.to_pylist()]
    from_pandas = [adapter.to_example(r) for r in table.to_pandas().to_dict("records")]
    assert from_arrow == from_pandas
    assert [e.id for e in from_arrow] == [content_hash({"conversations": r["conversations"]}) for r in rows]
    assert len(from_arrow[0].messages) == 5 and from_arrow[1].messages[1]["content"] == "5"
