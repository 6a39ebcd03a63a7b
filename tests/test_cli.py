"""The command line as a user runs it: `drift-stream ...` in a subprocess, plus `main(argv)` for error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.cli.main import main

ROWS = [
    {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
    for i in range(20)
] + [{"messages": [{"role": "user", "content": "no answer"}]}]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "drift_stream.cli.main", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_adapters_lists_the_builtins():
    out = run_cli("adapters").stdout
    for name in ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "qa"):
        assert name in out


def test_score_refine_report_end_to_end(tmp_path, tiny_model_dir):
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), pool)
    run_dir, refined = tmp_path / "run", tmp_path / "refined"
    out = run_cli("score", "--data", str(pool), "--model", tiny_model_dir, "--out", str(run_dir),
                  "--scorer", "loss", "--quiet").stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["rows_in"] == 21 and manifest["rows_scored"] == 20 and manifest["rows_rejected"] == 1
    assert out == ""  # --quiet prints nothing
    out = run_cli("refine", str(run_dir), "--policy", "top:0.5", "--out", str(refined)).stdout
    assert "10 rows written" in out
    kept = pq.read_table(refined / "data").to_pylist()
    scored = pq.read_table(run_dir / "data").to_pylist()
    best = sorted(scored, key=lambda r: -r["drift_score"])[:10]
    assert {r["id"] for r in kept} == {r["id"] for r in best}
    out = run_cli("report", str(run_dir)).stdout
    assert (run_dir / "report.html").exists() and "report written" in out


def test_errors_are_one_clear_line(tmp_path, capsys):
    code = main(["score", "--data", str(tmp_path / "missing.parquet"), "--model", str(tmp_path), "--out",
                 str(tmp_path / "o"), "--scorer", "random"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("drift-stream: error:") and "config.json" in err


def test_drift_without_bank_is_refused(tmp_path, tiny_model_dir, capsys):
    code = main(["score", "--data", "x.parquet", "--model", tiny_model_dir, "--out", str(tmp_path / "o")])
    assert code == 2
    assert "needs --bank" in capsys.readouterr().err


def test_bad_beta_and_storage_options_are_argparse_errors():
    with pytest.raises(SystemExit):
        main(["score", "--data", "x", "--model", "m", "--out", "o", "--beta", "lots"])
    with pytest.raises(SystemExit):
        main(["score", "--data", "x", "--model", "m", "--out", "o", "--storage-options", "[1]"])


def test_resume_command_is_valid_cli_that_restores_the_settings():
    """The score command printed for an incomplete run parses with the real parser into the recorded settings
    (issue 22: it printed `--use-chat-template False` and `--stop-tokens ('<x>',)`, which argparse refuses)."""
    import shlex

    from drift_stream.cli.parser import build_parser
    from drift_stream.cli.resume import resume_command

    scorer = {"model": "/m dir", "scorer": "less", "bank": "/b", "adapter": "sharegpt", "use_chat_template": False,
              "stop_tokens": ["<x>", "<|end|>"], "beta": "auto", "keep_query_scores": True, "overlong": "truncate",
              "max_tokens": 512, "seed": 3, "dtype": "bfloat16", "calibration_rows": 256}
    config = {"scorer": scorer, "input_files": ["/data/a b.jsonl", "/data/c.parquet"]}
    command = resume_command("/runs/r 1", config)
    argv = shlex.split(command)
    assert argv[:2] == ["drift-stream", "score"]
    args = build_parser().parse_args(argv[1:])
    assert args.data == config["input_files"] and args.out == "/runs/r 1" and args.model == "/m dir"
    for key in ("scorer", "bank", "adapter", "use_chat_template", "keep_query_scores", "overlong", "max_tokens",
                "seed", "dtype", "calibration_rows"):
        assert getattr(args, key) == scorer[key], key
    assert args.stop_tokens == scorer["stop_tokens"] and args.beta == "auto"
    assert "--calibration-rows" not in command  # defaults are left out
