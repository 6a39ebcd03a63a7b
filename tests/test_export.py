"""`drift-stream export` on a real scored + refined run (loss scorer, the shipped tiny model): TRL loads and trains
on it, LLaMA-Factory's v1 format, repeat counts, refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest

from drift_stream.cli.main import main
from drift_stream.errors import (
    ConfigError,
    IncompleteRunError,
    InputError,
    RunDirMismatchError,
)
from drift_stream.refine.export import export_run

ASSETS = Path(__file__).resolve().parents[1] / "drift_stream" / "embedded" / "assets"
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "export_manifest.schema.json"
MODEL = ASSETS / "tiny-reasoner"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A scored run of 16 demo rows, refined twice: `weights`, and `top:0.5 --keep-all`."""
    root = tmp_path_factory.mktemp("export")
    pool = pq.read_table(ASSETS / "demo" / "pool.parquet").slice(0, 16)
    pq.write_table(pool, root / "pool.parquet")
    common = ["--threads", "1", "-q"]
    assert main(["score", "--data", str(root / "pool.parquet"), "--model", str(MODEL), "--scorer", "loss",
                 "--max-tokens", "256", "--out", str(root / "run"), *common]) == 0
    assert main(["refine", str(root / "run"), "--policy", "weights", "--out", str(root / "weights"), *common]) == 0
    assert main(["refine", str(root / "run"), "--policy", "top:0.5", "--keep-all", "--out", str(root / "keep"),
                 *common]) == 0
    return root


def _table(path):
    """The rows of an export or refine; trl messages (one `arrow.json` value each) decoded as `datasets` does."""
    rows = pq.read_table(Path(path) / "data").to_pylist()
    for row in rows:
        for key in ("messages", "prompt", "completion"):
            if isinstance(row.get(key), list) and row[key] and isinstance(row[key][0], str):
                row[key] = [json.loads(m) for m in row[key]]
    return rows


def test_trl_export_loads_and_trains_in_trl(runs, tmp_path):
    pytest.importorskip("trl")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from drift_stream.integrations.trl import WeightedSFTTrainer

    out = tmp_path / "trl"
    assert main(["export", str(runs / "weights"), "--format", "trl", "--out", str(out), "-q"]) == 0
    refined = {r["id"]: r for r in _table(runs / "weights")}
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert ds.column_names == ["id", "prompt", "completion", "weight"] and len(ds) == 16
    for row in ds:
        src = refined[row["id"]]
        assert row["prompt"] + row["completion"] == src["messages"]
        assert row["weight"] == pytest.approx(src["weight"], rel=1e-7)
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    assert manifest["rows_in"] == manifest["rows_written"] == 16 and manifest["rows_zero_weight"] == 0
    assert manifest["weight_sum"] == pytest.approx(16.0, rel=1e-6)  # refine's weights have mean 1

    for cls in (SFTTrainer, WeightedSFTTrainer):
        model = AutoModelForCausalLM.from_pretrained(MODEL)
        args = SFTConfig(output_dir=str(tmp_path / cls.__name__), max_steps=5, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         bf16=False, disable_tqdm=True, max_length=256)
        trainer = cls(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(MODEL))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 5 and all(math.isfinite(x) and 0 < x < 10 for x in losses), (cls, losses)


def test_keep_column_gives_weights_one_and_zero(runs, tmp_path):
    manifest = export_run(str(runs / "keep"), "trl", str(tmp_path / "trl"))
    keep = {r["id"]: r["keep"] for r in _table(runs / "keep")}
    out = _table(tmp_path / "trl")
    assert sum(keep.values()) == 8 == len(out) == manifest["rows_written"]
    assert manifest["rows_zero_weight"] == 8 and manifest["rows_in"] == 16
    assert {r["id"] for r in out} == {i for i, k in keep.items() if k} and {r["weight"] for r in out} == {1.0}


def test_llamafactory_export_is_its_v1_sample_format(runs, tmp_path):
    import yaml
    from datasets import load_dataset

    out = tmp_path / "lf"
    manifest = export_run(str(runs / "weights"), "llamafactory", str(out), dataset_name="refined")
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    info = yaml.safe_load((out / "dataset_info.yaml").read_text())
    assert info == {"refined": {"path": str(out / "data"), "source": "local", "split": "train"}}
    # LLaMA-Factory 0.9.5 v1 local loader (plugins/data_plugins/loader.py): the builder is named after the first
    # file of the directory, then `load_dataset(builder, data_dir=path, split=split)`
    files = os.listdir(info["refined"]["path"])
    assert files and all(f.endswith(".parquet") for f in files)
    ds = load_dataset("parquet", data_dir=info["refined"]["path"], split="train")
    refined = {r["id"]: r for r in _table(runs / "weights")}
    assert len(ds) == manifest["rows_written"] == 16
    for row in ds:
        src = refined[row["id"]]
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in src["messages"]]
        for m, s in zip(row["messages"], src["messages"]):  # v1 Message: role, content [{type, value}], loss_weight
            assert m["content"] == [{"type": "text", "value": s["content"]}]
            want = src["weight"] if m["role"] == "assistant" else 0.0
            assert m["loss_weight"] == pytest.approx(want, rel=1e-6)


def test_llamafactory_export_through_its_own_data_engine(runs, tmp_path):
    # Runs where LLaMA-Factory 0.9.5 is importable (its full install pins another torch / transformers / trl, so
    # CI does not have it; checked by hand with the wheel's sources, see the export module docstring).
    engine = pytest.importorskip("llamafactory.v1.core.data_engine")
    rendering = pytest.importorskip("llamafactory.v1.core.utils.rendering")
    from drift_stream.embedded.tiny_models import make_char_tokenizer

    out = tmp_path / "lf"
    export_run(str(runs / "weights"), "llamafactory", str(out))
    data = engine.DataEngine(str(out / "dataset_info.yaml"))
    refined = {r["id"]: r["weight"] for r in _table(runs / "weights")}
    assert len(data) == 16
    sample = data[0]
    rendered = rendering.render_chatml_messages(make_char_tokenizer(), sample["messages"])
    weights = sorted(set(rendered["loss_weights"]))
    assert weights == [0.0, pytest.approx(refined[sample["id"]], rel=1e-6)]
    trained = [lab != -100 for lab in rendered["labels"]]
    assert trained == [w > 0 for w in rendered["loss_weights"]] and any(trained)


def _explicit_copies(weights, seed, shard):
    rng = np.random.default_rng([seed, shard])
    u = rng.random(len(weights))
    return [int(math.floor(w)) + int(x < w - math.floor(w)) for w, x in zip(weights, u)]


def test_repeat_counts(runs, tmp_path):
    rows = _table(runs / "weights")
    weights = [r["weight"] for r in rows]
    manifest = export_run(str(runs / "weights"), "repeat", str(tmp_path / "r0"), seed=7)
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    out = _table(tmp_path / "r0")
    counts = {}
    for r in out:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    assert "weight" not in out[0]
    expected = _explicit_copies(weights, 7, 0)
    assert [counts.get(r["id"], 0) for r in rows] == expected
    assert manifest["repeat"]["copies_total"] == sum(expected) == len(out)
    assert manifest["repeat"]["expected_copies"] == pytest.approx(sum(weights))
    # each row floor(w) or ceil(w) times, and over 60 seeds the mean copies approach w (binomial sd / sqrt(60))
    totals = np.zeros(len(rows))
    for seed in range(60):
        copies = _explicit_copies(weights, seed, 0)
        assert all(math.floor(w) <= c <= math.ceil(w) for w, c in zip(weights, copies))
        totals += copies
    sd = np.sqrt([(w % 1) * (1 - w % 1) / 60 for w in weights])
    assert np.all(np.abs(totals / 60 - weights) <= 4 * sd + 1e-12)
    # the same seed gives the same output, shuffled rows included
    export_run(str(runs / "weights"), "repeat", str(tmp_path / "r1"), seed=7)
    assert _table(tmp_path / "r1") == out


def test_refusals(runs, tmp_path):
    with pytest.raises(InputError, match="is a scored run, not a refined one"):
        export_run(str(runs / "run"), "trl", str(tmp_path / "a"))
    export_run(str(runs / "weights"), "trl", str(tmp_path / "b"))
    # another config into the same --out: refused, naming the recorded and the new value
    with pytest.raises(RunDirMismatchError, match=r'(?s)export.format: "trl" -> "llamafactory".*use a new --out'):
        export_run(str(runs / "weights"), "llamafactory", str(tmp_path / "b"))
    export_run(str(runs / "weights"), "trl", str(tmp_path / "b"))  # the same export again is fine
    with pytest.raises(RunDirMismatchError, match="holds refine output .* not an export"):
        export_run(str(runs / "weights"), "trl", str(runs / "keep"))  # never over a refine output
    with pytest.raises(ConfigError, match="unknown export format"):
        export_run(str(runs / "weights"), "axolotl", str(tmp_path / "c"))
    # a refine that did not finish: data/ without manifest.json
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs / "weights", unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(IncompleteRunError, match="did not finish"):
        export_run(str(unfinished), "trl", str(tmp_path / "d"))
    assert main(["export", str(unfinished), "--format", "trl", "--out", str(tmp_path / "d"), "-q"]) == 2
    # a finished refine of an incomplete scored run: refused unless allowed
    partial = tmp_path / "partial"
    shutil.copytree(runs / "weights", partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps(dict(manifest, source_fraction_files=0.5)))
    with pytest.raises(IncompleteRunError, match="50.0% of the input files"):
        export_run(str(partial), "trl", str(tmp_path / "e"))
    assert export_run(str(partial), "trl", str(tmp_path / "e"), allow_incomplete=True)["rows_written"] == 16
    # a bad weight is named by file and row
    import pyarrow as pa

    bad = tmp_path / "bad"
    shutil.copytree(runs / "weights", bad)
    shard = next((bad / "data").iterdir())
    rows = pq.read_table(shard).to_pylist()
    rows[5]["weight"] = float("nan")
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    with pytest.raises(InputError, match=rf"{shard.name} row 5: weight nan is not finite"):
        export_run(str(bad), "llamafactory", str(tmp_path / "f"))


def test_multi_turn_rows_need_the_messages_layout(runs, tmp_path):
    import pyarrow as pa

    multi = tmp_path / "multi"
    shutil.copytree(runs / "weights", multi)
    shard = next((multi / "data").iterdir())
    table = pq.read_table(shard).to_pylist()
    table[3]["messages"] = table[3]["messages"] + [{"role": "user", "content": "And doubled?"},
                                                   {"role": "assistant", "content": "#### 2"}]
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(shard)), shard)
    with pytest.raises(InputError, match=r"row 3 .* 2 assistant turns.*--layout messages"):
        export_run(str(multi), "trl", str(tmp_path / "pc"))
    export_run(str(multi), "trl", str(tmp_path / "msg"), layout="messages")
    out = _table(tmp_path / "msg")
    assert out[3]["messages"] == table[3]["messages"] and len(out) == 16


def test_fireworks_export_is_its_weighted_sft_jsonl(runs, tmp_path):
    """Fireworks' SFT JSONL (docs.fireworks.ai/fine-tuning/weighted-training): {"messages": [...], "weight": w}, the
    root-level weight on every row; weight-0 rows left out; text / plain rows refused."""
    manifest = export_run(str(runs / "weights"), "fireworks", str(tmp_path / "fw"))
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    files = sorted((tmp_path / "fw" / "data").iterdir())
    assert [f.name for f in files] == ["train-00000-of-00001.jsonl"]
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    refined = _table(runs / "weights")
    assert len(lines) == len(refined) == manifest["rows_written"] == 16
    for line, src in zip(lines, refined):  # refined order
        assert set(line) == {"messages", "weight"}
        assert line["messages"] == src["messages"]
        assert line["weight"] == src["weight"]  # the float32 weight, exactly
    # --keep-all: weights 1 on kept rows, the 8 dropped rows left out
    kept = export_run(str(runs / "keep"), "fireworks", str(tmp_path / "fw-keep"))
    lines = (tmp_path / "fw-keep" / "data" / "train-00000-of-00001.jsonl").read_text().splitlines()
    assert kept["rows_written"] == 8 == len(lines) and kept["rows_zero_weight"] == 8
    assert {json.loads(x)["weight"] for x in lines} == {1.0}


def test_fireworks_refuses_text_rows(tmp_path):
    import pyarrow as pa

    root = tmp_path
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["The cat sat on the mat.", "Two plus two is four."]}),
                   root / "text.parquet")
    common = ["--threads", "1", "-q"]
    assert main(["score", "--data", str(root / "text.parquet"), "--model", str(MODEL), "--scorer", "loss",
                 "--adapter", "text", "--out", str(root / "run"), *common]) == 0
    assert main(["refine", str(root / "run"), "--policy", "weights", "--out", str(root / "w"), *common]) == 0
    with pytest.raises(InputError, match="plain text, scored without a chat template; Fireworks"):
        export_run(str(root / "w"), "fireworks", str(root / "fw"))
    # the token export takes them: loss on every token but the first, as scored
    manifest = export_run(str(root / "w"), "tokens", str(root / "tok"))
    assert manifest["form"] == "text" and manifest["rows_written"] == 2
    for row in pq.read_table(root / "tok" / "data").to_pylist():
        assert row["labels"][0] == -100 and all(x != -100 for x in row["labels"][1:])
