"""`export --format tokens` (and the Tinker recipe over it) on a real score -> refine run: the shipped tiny model
scored with `--chat-template FILE` (its template plus TRL's {% generation %} markers, so TRL's assistant mask is the
span drift scores: no text follows the end-of-turn token inside the marked block), single- and multi-turn rows.

The token export equals `ChatTokenizer.encode` rebuilt by hand for every row; the weighted loss over it
(model.losses.weighted_example_loss) equals WeightedSFTTrainer's loss on the trl export of the same run, per-example
and per-token; Tinker's summed cross-entropy over the recipe's Datums equals that loss too."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("trl")

from drift_stream.cli.main import main  # noqa: E402
from drift_stream.data.example_types import TokenizedExample  # noqa: E402
from drift_stream.data.formats import load_adapter  # noqa: E402
from drift_stream.data.tokenization import ChatTokenizer, collate  # noqa: E402
from drift_stream.errors import InputChangedError  # noqa: E402
from drift_stream.io.columns import ID, NUM_TOKENS, WEIGHT  # noqa: E402
from drift_stream.model.loading import load_tokenizer  # noqa: E402
from drift_stream.model.losses import weighted_example_loss  # noqa: E402
from drift_stream.refine.export import export_run  # noqa: E402
from drift_stream.refine.export_tokens import tinker_fields  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "drift_stream" / "embedded" / "assets" / "tiny-reasoner"
SCHEMA = ROOT / "schemas" / "export_manifest.schema.json"
MAX_TOKENS = 256
GENERATION_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """16 demo rows + 4 two-turn conversations made of them, scored (loss) and refined with --policy weights."""
    root = tmp_path_factory.mktemp("tokens")
    (root / "template.jinja").write_text(GENERATION_TEMPLATE)
    pool = pq.read_table(MODEL.parent / "demo" / "pool.parquet").slice(0, 20).to_pylist()
    rows = [{"id": r["id"], "messages": r["messages"]} for r in pool[:16]]
    for k in range(4):
        a, b = pool[16 + k]["messages"], pool[k]["messages"]
        rows.append({"id": f"multi-{k}", "messages": [{"role": "system", "content": "Be brief."}, *a, *b]})
    with open(root / "pool.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    common = ["--threads", "1", "-q"]
    assert main(["score", "--data", str(root / "pool.jsonl"), "--model", str(MODEL), "--scorer", "loss",
                 "--max-tokens", str(MAX_TOKENS), "--chat-template", str(root / "template.jinja"),
                 "--out", str(root / "run"), *common]) == 0
    assert main(["refine", str(root / "run"), "--policy", "weights", "--out", str(root / "refined"), *common]) == 0
    assert pq.read_table(root / "refined" / "data").num_rows == 20, "the scorer rejected a row"
    assert main(["export", str(root / "refined"), "--format", "tokens", "--out", str(root / "tokens"), *common]) == 0
    assert main(["export", str(root / "refined"), "--format", "trl", "--layout", "messages",
                 "--out", str(root / "trl"), *common]) == 0
    return root


def _chat(root) -> ChatTokenizer:
    """What `score --chat-template FILE --max-tokens 256` built, by hand."""
    return ChatTokenizer.from_options(load_tokenizer(str(MODEL)), chat_template=str(root / "template.jinja"),
                                      max_tokens=MAX_TOKENS)


def _tokens(root) -> list[dict]:
    return pq.read_table(root / "tokens" / "data").to_pylist()


def test_token_export_is_what_scoring_encoded(run):
    import jsonschema

    chat, adapter = _chat(run), load_adapter("messages")
    refined = {r[ID]: r for r in pq.read_table(run / "refined" / "data").to_pylist()}
    rows = _tokens(run)
    assert sorted(r[ID] for r in rows) == sorted(refined) and len(rows) == 20
    multi = 0
    for row in rows:
        src = refined[row[ID]]
        encoded = chat.encode(adapter.to_example(src))
        assert sum(encoded.loss_mask) == src[NUM_TOKENS]  # the encoding the score run used
        ids, mask = encoded.input_ids, encoded.loss_mask
        assert row["input_ids"] == ids
        assert row["labels"] == [t if m else -100 for t, m in zip(ids, mask)]
        assert row["target_tokens"] == ids[1:]
        w = src[WEIGHT]
        assert row[WEIGHT] == w  # float32 both
        assert row["weights"] == [float(torch.tensor(m * w, dtype=torch.float32)) for m in mask[1:]]
        multi += sum(a == 0 and b == 1 for a, b in zip(mask, mask[1:])) > 1  # two assistant spans
    assert multi == 4
    manifest = json.loads((run / "tokens" / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    assert manifest["tokenization"] == {"model": str(MODEL), **chat.config_dict()}
    assert manifest["rows_written"] == 20 and manifest["form"] == "chat"


def _trl_batch(run, weighting):
    """WeightedSFTTrainer over the trl export (assistant_only_loss), all 20 rows in one collated batch."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM

    from drift_stream.integrations.trl import SFTConfig, WeightedSFTTrainer

    tok = load_tokenizer(str(MODEL))
    tok.chat_template = GENERATION_TEMPLATE
    ds = load_dataset("parquet", data_files=str(run / "trl" / "data" / "*.parquet"), split="train")
    args = SFTConfig(output_dir=str(run / f"trainer-{weighting}"), per_device_train_batch_size=len(ds),
                     report_to=[], use_cpu=True, bf16=False, max_length=None, assistant_only_loss=True,
                     dataloader_num_workers=0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, weighting=weighting)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, model, batch


@pytest.mark.parametrize("weighting", ["example", "token"])
def test_weighted_loss_over_tokens_equals_weighted_sft_trainer_on_trl_export(run, weighting):
    trainer, model, batch = _trl_batch(run, weighting)
    rows = _tokens(run)
    # the masks TRL built from the trl export are the token export's labels, row for row
    trl_rows = {tuple(ids[: int(n)]): [int(x) for x in lab[: int(n)]] for ids, lab, n in
                zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].sum(1))}
    for row in rows:
        assert trl_rows[tuple(row["input_ids"])][1:] == row["labels"][1:], row[ID]
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))  # eval: this batch's N
        ours = collate([TokenizedExample(r[ID], r["input_ids"], [int(x != -100) for x in r["labels"]])
                        for r in rows], pad_token_id=0)
        ours_loss = weighted_example_loss(model, ours, [r[WEIGHT] for r in rows], weighting=weighting)
    # same function, same ids, masks and weights; only the row order and so the float32 summation order differ
    torch.testing.assert_close(ours_loss, trl_loss, rtol=1e-6, atol=0)
    assert float(ours_loss) > 0


@pytest.mark.parametrize("normalize", ["example", "token"])
def test_tinker_sum_over_datums_equals_weighted_sft_trainer_loss(run, normalize):
    """Tinker's cross_entropy is sum_t -logp(target_t) x weights_t over the batch's Datums; computed here by one
    unpadded forward per Datum (model_input -> logits -> log_softmax at target_tokens)."""
    trainer, model, batch = _trl_batch(run, normalize)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        for d in tinker_fields(_tokens(run), normalize):  # the fields examples/tinker_recipe.py puts in each Datum
            inputs = torch.tensor([d["model_input"]])
            logp = torch.log_softmax(model(input_ids=inputs).logits[0].double(), -1)  # [T-1, V]
            targets = torch.tensor(d["target_tokens"])
            weights = torch.tensor(d["weights"], dtype=torch.float32).double()
            total += -(logp.gather(1, targets[:, None])[:, 0] * weights).sum()
    # float32 forwards, unpadded vs padded batch: logits agree to ~1e-6 relative, summed over ~2k tokens
    torch.testing.assert_close(total.float(), trl_loss, rtol=2e-5, atol=0)


def _recipe():
    spec = importlib.util.spec_from_file_location("tinker_recipe", ROOT / "examples" / "tinker_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tinker_recipe_builds_datums_from_the_export(run):
    pytest.importorskip("tinker")
    from tinker import types

    recipe = _recipe()
    rows = list(recipe.read_rows(str(run / "tokens"), batch_rows=7))
    assert [r[ID] for r in rows] == [r[ID] for r in _tokens(run)]
    datums = recipe.datums(rows, normalize="none")
    assert all(isinstance(d, types.Datum) for d in datums)
    for row, d in zip(rows, datums):
        assert d.model_input.to_ints() == row["input_ids"][:-1]
        assert d.loss_fn_inputs["target_tokens"].to_numpy().tolist() == row["target_tokens"]
        assert d.loss_fn_inputs["weights"].to_numpy().tolist() == row["weights"]
        assert d.loss_fn_inputs["target_tokens"].dtype == "int64" and d.loss_fn_inputs["weights"].dtype == "float32"
    # normalize="example": each row's weights sum to w_i / N (N rows with loss tokens), so the batch sums to mean w
    fields = tinker_fields(rows, "example")
    sums = [sum(f["weights"]) for f in fields]
    for s, row in zip(sums, rows):
        assert s == pytest.approx(row[WEIGHT] / len(rows), rel=1e-5)
    assert [len(list(b)) for b in recipe.batches(iter(rows), 8)] == [8, 8, 4]


def test_changed_template_is_refused(run, tmp_path):
    """The recorded --chat-template file changed after scoring: the export cannot reproduce the scored tokens."""
    template = run / "template.jinja"
    original = template.read_text()
    try:
        template.write_text(original.replace("<|end|>\n{% endif %}", "<|end|>\n\n{% endif %}"))
        with pytest.raises(InputChangedError, match="chat_template_sha1"):
            export_run(str(run / "refined"), "tokens", str(tmp_path / "t"))
    finally:
        template.write_text(original)


def test_tokenizer_path_override(run, tmp_path):
    """The recorded model path is not reachable (moved): --tokenizer points at a copy, the fingerprint still matches,
    the rows are the same, and the manifest names the path used."""
    import shutil

    moved = tmp_path / "moved-model"
    shutil.copytree(MODEL, moved)
    manifest = export_run(str(run / "refined"), "tokens", str(tmp_path / "t"), tokenizer=str(moved))
    assert manifest["tokenization"]["model"] == str(moved)
    assert pq.read_table(tmp_path / "t" / "data").equals(pq.read_table(run / "tokens" / "data"))
