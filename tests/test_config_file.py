"""`--config FILE.yaml`: every subcommand takes one, keys are flag names, the command line wins, unknown keys fail."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.cli.config_file import apply_config_file
from drift_stream.cli.main import main
from drift_stream.cli.parser import build_parser
from drift_stream.errors import ConfigError

# (subcommand argv, a flag of it as a config key, a value, the parsed attribute and value)
COMMANDS = [
    (["adapters"], "verbose", True, "verbose", True),
    (["score", "--data", "x", "--model", "m", "--out", "o"], "batch-rows", 7, "batch_rows", 7),
    (["bank", "build", "--model", "m", "--queries", "q", "--out", "o"], "max_new_tokens", 9, "max_new_tokens", 9),
    (["bank", "info", "b"], "quiet", True, "quiet", True),
    (["refine", "r", "--policy", "top:0.1", "--out", "o"], "seed", 3, "seed", 3),
    (["report", "r"], "out", "page.html", "out", "page.html"),
    (["demo"], "policy", "top:0.5", "policy", "top:0.5"),
]


def parse(argv):
    parser = build_parser()
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv,key,value,attr,want", COMMANDS, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_every_subcommand_takes_a_config_file(tmp_path, argv, key, value, attr, want):
    path = write(tmp_path, f"{key}: {json.dumps(value)}\n")
    assert getattr(parse([*argv, "--config", path]), attr) == want
    assert getattr(parse(argv), attr) != want  # the default differs, so the file did it
    bad = write(tmp_path, f"{key}: {json.dumps(value)}\nno-such-flag: 1\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'no-such-flag'.*") as err:
        parse([*argv, "--config", bad])
    assert bad in str(err.value)


def test_command_line_wins_and_file_supplies_required_and_positional_values(tmp_path):
    path = write(tmp_path, "data: [a.parquet, b.jsonl]\nmodel: m\nout: o\nbatch_rows: 7\nbeta: auto\n"
                           "keep-query-scores: true\nstorage-options: {anon: true}\n")
    args = parse(["score", "--config", path, "--batch-rows", "9", "--out", "other"])
    assert args.data == ["a.parquet", "b.jsonl"] and args.model == "m" and args.beta == "auto"
    assert args.batch_rows == 9 and args.out == "other" and args.keep_query_scores is True
    assert args.storage_options == {"anon": True}
    assert parse(["score", "--config", path, "--data", "c.parquet"]).data == ["c.parquet"]
    path = write(tmp_path, "run_dir: runs/a\npolicy: top:0.2\nout: refined\n", "refine.yaml")
    args = parse(["refine", "--config", path])
    assert (args.run_dir, args.policy, args.out) == ("runs/a", "top:0.2", "refined")
    assert parse(["refine", "runs/b", "--config", path]).run_dir == "runs/b"


@pytest.mark.parametrize("text,match", [
    ("batch-rows: many\n", "batch-rows must be an integer, got 'many'"),
    ("batch-rows: 2.5\n", "must be an integer"),
    ("scorer: best\n", "must be one of drift, less"),
    ("keep-query-scores: yes please\n", "is a switch"),
    ("beta: high\n", "number or 'auto'"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("data: {a: 1}\n", "takes one value"),
    ("model: 3\n", "must be a string"),
    ("storage-options: [1]\n", "must be a mapping"),
])
def test_bad_values_are_errors_naming_the_file(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        parse(["score", "--data", "x", "--model", "m", "--out", "o", "--config", path])
    assert path in str(err.value)


def test_cli_exits_2_with_one_line_for_an_unknown_key_or_a_missing_file(tmp_path, capsys):
    path = write(tmp_path, "modle: m\n")
    assert main(["score", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'modle'" in err and path in err and "model" in err
    assert main(["report", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read --config" in capsys.readouterr().err


def test_score_from_a_config_file_records_the_same_config_as_flags(tmp_path, tiny_model_dir):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"{i}?"},
                                         {"role": "assistant", "content": str(i)}]} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    flags = ["--data", str(tmp_path / "pool.parquet"), "--model", tiny_model_dir, "--scorer", "random",
             "--seed", "4", "--batch-rows", "4"]
    assert main(["score", *flags, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    path = write(tmp_path, f"data: [{json.dumps(str(tmp_path / 'pool.parquet'))}]\nmodel: {json.dumps(tiny_model_dir)}\n"
                           "scorer: random\nseed: 4\nbatch_rows: 4\nquiet: true\n")
    assert main(["score", "--config", path, "--out", str(tmp_path / "b")]) == 0
    for name in ("config.json", "data/train-00000-of-00001.parquet"):
        a, b = (tmp_path / "a" / name), (tmp_path / "b" / name)
        if name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text())
        else:
            assert pq.read_table(a).equals(pq.read_table(b))


@pytest.mark.parametrize("doc", ["README.md", "docs/ray.md"])
def test_the_documented_cluster_config_is_a_valid_score_config(tmp_path, doc):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "engine: ray" in b]
    assert blocks, f"{doc} has no score.yaml example"
    args = parse(["score", "--config", write(tmp_path, blocks[0])])
    assert args.engine == "ray" and args.actors >= 2 and args.data and args.model and args.out
