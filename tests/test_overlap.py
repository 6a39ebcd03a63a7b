"""Issue 23: tokenization of chunk i+1 on the prefetch thread or in worker processes while the model runs chunk i,
and only the adapter's columns turned into Python objects. Scores, rejects and counters are bit-identical with and
without the overlap; the worker processes never outlive a run (an error, Ctrl-C, the parent killed)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.data.example_types import TokenizedExample
from drift_stream.engines.local import RunConfig, run_score
from drift_stream.scoring.base import ChunkPreparer, adapter_rows
from drift_stream.scoring.prepare_workers import pack, unpack


@pytest.fixture(scope="module")
def loss_scorer(tiny_model_dir):
    from drift_stream.scoring.build import build_scorer

    return lambda: build_scorer("loss", model=tiny_model_dir, adapter="messages", batch_size=3, max_tokens=96)


def pool(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": "q" * (1 + i % 7)},
                                         {"role": "assistant", "content": f"answer {i} " * (1 + i % 5)}],
             "meta": {"blob": "x" * 50, "n": i}} for i in range(40)]
    rows[5]["messages"] = rows[5]["messages"][:1]  # no assistant turn: rejected by the tokenizer
    pq.write_table(pa.Table.from_pylist(rows[:25]), root / "a.parquet", row_group_size=7)
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[25:]))
    return [str(root / "a.parquet"), str(root / "b.jsonl")]


def test_scores_are_bit_identical_with_and_without_the_overlap(tmp_path, loss_scorer):
    paths = pool(tmp_path / "pool")
    runs = {}
    # inline: read and tokenized between model calls; thread: on the prefetch thread; process: in 2 workers
    for name, ahead, workers in (("inline", 0, 0), ("thread", 3, 0), ("process", 3, 2)):
        out = tmp_path / name
        runs[name] = run_score(RunConfig(data=tuple(paths), out=str(out), batch_rows=6, prefetch_batches=ahead,
                                         tokenize_workers=workers), loss_scorer(), progress=False)
    assert runs["inline"] == runs["thread"] == runs["process"]
    assert not multiprocessing.active_children()  # the workers were joined
    for name in ("thread", "process"):
        for sub in ("data", "rejects"):
            shards = sorted((tmp_path / "inline" / sub).glob("*.parquet"))
            assert [p.name for p in shards] == sorted(p.name for p in (tmp_path / name / sub).glob("*.parquet"))
            for path in shards:
                a, b = pq.read_table(path), pq.read_table(tmp_path / name / sub / path.name)
                assert a.equals(b), (name, sub, path.name)  # bit for bit: Table.equals compares float32 exactly
        markers = [sorted((tmp_path / run).rglob("*.json")) for run in ("inline", name)]
        counters = [[json.loads(m.read_text()).get("tokenization") for m in ms] for ms in markers]
        assert counters[0] == counters[1] and {"reasoning_dropped": 0} in counters[0]  # per input file
    assert runs["process"]["rows_scored"] == 39 and runs["process"]["rejected_by_reason"] == {"no_assistant_turn": 1}


def test_packed_rows_unpack_to_equal_examples():
    with_turns = TokenizedExample("a", [5, 6, 7, 8], [0, 0, 1, 1], [-1, -1, 0, 0], (1.0,))
    two_turns = TokenizedExample("b", [1, 2, 3, 4, 5], [0, 1, 0, 0, 1], [-1, 0, -1, 1, 1], (0.5, 2.0))
    plain = TokenizedExample("c", [9, 2**31 - 1], [0, 1])  # text / prompt + response: no turns, no weights
    from drift_stream.scoring.base import PreparedRows

    rows = PreparedRows(["r0", "r1", "r2", "r3", "r4"], [None, with_turns, plain, None, two_turns],
                        [None, None, None, "too_long:9>8", None], {"reasoning_dropped": 2})
    back = unpack(pack(rows))
    assert back == rows
    assert all(type(v) is int for ex in back.tokenized if ex for v in ex.input_ids + ex.loss_mask)
    empty = PreparedRows([], [], [], {})
    assert unpack(pack(empty)) == empty


class FailingPreparer(ChunkPreparer):
    """Tokenizes in the worker, then fails there: the error reaches the run."""

    def __call__(self, table):
        raise RuntimeError(f"worker failed on {table.num_rows} rows")


def test_an_error_in_a_worker_stops_the_run_and_leaves_no_process(tmp_path, loss_scorer, monkeypatch):
    scorer = loss_scorer()
    monkeypatch.setattr(scorer, "chunk_preparer", lambda: FailingPreparer(scorer.adapter, scorer.chat))
    with pytest.raises(RuntimeError, match="worker failed on 6 rows"):
        run_score(RunConfig(data=tuple(pool(tmp_path / "pool")), out=str(tmp_path / "out"), batch_rows=6,
                            tokenize_workers=1), scorer, progress=False)
    assert not multiprocessing.active_children()
    assert not list((tmp_path / "out").rglob("*.parquet"))  # no shard published for the failed file


def test_ctrl_c_while_scoring_stops_the_workers(tmp_path, loss_scorer, monkeypatch):
    scorer = loss_scorer()
    calls = []
    score_table = scorer.score_table

    def interrupted(table, prepared=None):
        if table.num_rows:  # not data_schema's zero-row call
            calls.append(prepared)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return score_table(table, prepared)

    monkeypatch.setattr(scorer, "score_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_score(RunConfig(data=tuple(pool(tmp_path / "pool")), out=str(tmp_path / "out"), batch_rows=6,
                            tokenize_workers=2), scorer, progress=False)
    assert all(p is not None for p in calls)  # tokenized ahead, by the workers
    assert not multiprocessing.active_children()


# No `if __name__ == "__main__":` guard: a worker never runs its parent's script (multiprocessing's spawn would).
PARENT_SCRIPT = """
import time
from drift_stream.io.background import WorkerProcesses
from helper import pid  # a module the worker imports from the parent's sys.path

workers = WorkerProcesses(None, 1)
print(workers.submit(pid).result(), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_exit_when_their_parent_is_killed(tmp_path, sig):
    (tmp_path / "helper.py").write_text("import os\n\n\ndef pid(state):\n    return os.getpid()\n")
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT_SCRIPT))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    worker = int(parent.stdout.readline())
    assert worker != parent.pid and _alive(worker)
    os.kill(parent.pid, sig)
    parent.wait()
    deadline = time.monotonic() + 30  # the worker sees its socket close at once; 30 s only bounds a hang
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), f"worker {worker} outlived its parent"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_prepared_on_another_thread_scores_the_same(loss_scorer):
    scorer = loss_scorer()
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i + 1)}]}
            for i in range(9)]
    table = pa.Table.from_pylist(rows)
    direct = scorer.score_table(table)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("p", scorer.prepare_chunk(table)))
    worker.start()
    worker.join()
    assert box["p"].tokenization == {"reasoning_dropped": 0}
    assert scorer.score_table(table, box["p"]).equals(direct)


def test_only_the_adapters_columns_become_python_objects(loss_scorer):
    adapter = loss_scorer().adapter
    table = pa.table({"meta": [{"blob": "x"}] * 2, "messages": [[{"role": "user", "content": "q"}]] * 2,
                      "id": ["a", "b"]})
    rows = adapter_rows(table, adapter)
    assert [set(r) for r in rows] == [set(adapter.columns) & set(table.column_names)] * 2
    assert "meta" not in rows[0] and rows[1]["id"] == "b"
    assert adapter_rows(table.select(["meta"]), adapter) == [{}, {}]  # no column it reads: rows stay rows
