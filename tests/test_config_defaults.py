"""One config: CLI defaults equal the library's; execution-only fields are not compared on resume; beta `auto` is
resolved once per run (OUT/beta.json) and every resume reads it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.cli.main import main
from drift_stream.cli.parser import build_parser
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.engines.local import RunConfig
from drift_stream.grads.projection import FeatureConfig
from drift_stream.io.config_fields import execution_dict, output_dict
from drift_stream.io.run_dir import RunDirectory
from drift_stream.rollouts.engine import RolloutConfig
from drift_stream.rollouts.verifiers import FunctionVerifier
from drift_stream.scoring.base import ScoreConfig
from drift_stream.scoring.build import build_scorer

CLI_ONLY = {"config", "threads", "quiet", "verbose", "engine", "version", "help"}  # no library counterpart


def _field_default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _param_default(fn, name):
    return inspect.signature(fn).parameters[name].default


def library_defaults() -> dict[tuple[str, str], object]:
    """(subcommand, argparse dest) -> the default of the library object the flag feeds."""
    from drift_stream.bank.build import build_bank
    from drift_stream.embedded.demo import run_demo
    from drift_stream.engines.ray import RayEngine, score_on_ray
    from drift_stream.refine.policies import refine_run
    from drift_stream.refine.report import write_report
    from drift_stream.scoring.build import build_scorer as build

    out: dict[tuple[str, str], object] = {}
    for f in dataclasses.fields(ScoreConfig):
        out[("score", f.name)] = _field_default(ScoreConfig, f.name)
    for name in ("batch_rows", "tokenize_workers", "on_bad_row", "num_shards", "shard_index", "storage_options",
                 "allow_all_rejected"):
        out[("score", name)] = _field_default(RunConfig, name)
    out[("score", "allow_mismatch")] = _param_default(build, "allow_mismatch")
    out[("score", "bank")] = _param_default(build, "bank")
    for name in ("actors", "gpus_per_actor", "cpus_per_actor"):
        out[("score", name)] = out[("bank build", name)] = _field_default(RayEngine, name)
    out[("score", "ray_address")] = out[("bank build", "ray_address")] = _param_default(score_on_ray, "address")
    for f in dataclasses.fields(BankConfig):
        if f.name not in ("rollouts", "features"):
            out[("bank build", f.name)] = _field_default(BankConfig, f.name)
    out[("bank build", "rollouts")] = _field_default(RolloutConfig, "num_rollouts")
    for name in ("temperature", "top_p", "max_new_tokens", "seed"):
        out[("bank build", name)] = _field_default(RolloutConfig, name)
    assert _field_default(FeatureConfig, "proj_dim_in") == _field_default(FeatureConfig, "proj_dim_out")
    out[("bank build", "proj_dim")] = _field_default(FeatureConfig, "proj_dim_in")
    out[("bank build", "last_n_blocks")] = _field_default(FeatureConfig, "last_n_blocks")
    out[("bank build", "track_experts")] = _field_default(FeatureConfig, "track_experts")
    for name in ("adapter", "verifier", "fisher_data", "fisher_adapter", "device", "storage_options", "overwrite"):
        out[("bank build", name)] = _param_default(build_bank, name)
    for name in ("seed", "temperature", "weight_map", "clip_z", "granularity", "keep_all", "length_buckets", "storage_options",
                 "allow_incomplete"):
        out[("refine", name)] = _param_default(refine_run, name)
    out[("refine", "stratify_by")] = None if _param_default(refine_run, "stratify_by") == () else "differs"
    out[("refine", "prefilter")] = None if _param_default(refine_run, "prefilters") == () else "differs"
    out[("report", "out")] = _param_default(write_report, "out_html")
    for name in ("storage_options", "allow_incomplete"):
        out[("report", name)] = _param_default(write_report, name)
    for name in ("policy", "model", "download"):
        out[("demo", name)] = _param_default(run_demo, name)
    out[("bank build", "dtype")] = _param_default(build_bank, "dtype")
    from drift_stream.refine.export import export_run

    for name in ("layout", "seed", "dataset_name", "tokenizer", "allow_incomplete", "storage_options"):
        out[("export", name)] = _param_default(export_run, name)
    return out


def cli_defaults() -> dict[tuple[str, str], object]:
    """(subcommand, dest) -> default of every optional flag of every subcommand."""
    found = {}

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}".strip())
            elif action.option_strings and action.dest not in CLI_ONLY:
                found[(name, action.dest)] = action.default

    walk(build_parser(), "")
    return found


def test_every_cli_default_equals_the_library_default():
    lib, cli = library_defaults(), cli_defaults()
    unmapped = sorted(k for k in cli if k not in lib and k[1] not in ("out",) and cli[k] is not None
                      and k != ("demo", "out"))
    assert not unmapped, f"flags with a default but no library counterpart in this test: {unmapped}"
    def same(a, b):  # argparse collects repeated flags in a list; dataclasses hold tuples
        return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

    differ = {k: (cli[k], lib[k]) for k in cli if k in lib and not same(cli[k], lib[k])}
    assert not differ, f"CLI default != library default (cli, library): {differ}"
    # the two that disagreed in issue 17
    assert cli[("bank build", "fisher_examples")] == BankConfig().fisher_examples
    assert cli[("bank build", "max_new_tokens")] == BankConfig().rollouts.max_new_tokens


def test_fields_are_marked_output_changing_or_execution_only():
    assert set(execution_dict(ScoreConfig())) >= {"batch_size", "device"}
    assert "batch_size" not in output_dict(ScoreConfig()) and "beta" in output_dict(ScoreConfig())
    assert "feature_batch_size" in execution_dict(BankConfig()) and "signing" in output_dict(BankConfig())
    assert not any(f.name == "beta" for f in dataclasses.fields(BankConfig))  # it was stored and never read


# ------------------------------------------------------------------------------------------ resume and beta record

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(3)]


def parity(completion, query):
    return float(sum(map(ord, completion)) % 2 == 0)


@pytest.fixture(scope="module")
def model_and_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    model_dir = save_tiny_model(root / "model", arch="llama", seed=2)
    config = BankConfig(features=FeatureConfig(proj_dim_in=8, proj_dim_out=8), preconditioner="identity",
                        rollouts=RolloutConfig(num_rollouts=8, max_new_tokens=16, seed=5))
    build_bank(model_dir, QUESTIONS, str(root / "bank"), config, verifier=FunctionVerifier(parity, "test:parity"),
               progress=False)
    return model_dir, str(root / "bank")


def write_pool(tmp_path) -> list[str]:
    rng = np.random.default_rng(7)
    files = []
    for f in range(2):
        rows = [{"id": f"f{f}-{i}", "messages": [
            {"role": "user", "content": f"What is {i} + 3?"},
            {"role": "assistant", "content": "".join(rng.choice(list("0123456789+= abc"), int(rng.integers(1, 40))))}]}
            for i in range(12)]
        path = tmp_path / f"pool-{f}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        files.append(str(path))
    return files


def score(files, out, model, bank, *extra):
    return main(["score", "--data", *files, "--model", model, "--bank", bank, "--out", str(out), "--beta", "auto",
                 "--calibration-rows", "16", "--quiet", *extra])


def score_magnitude(table: pa.Table, run_dir, bank: str) -> np.ndarray:
    """M_i = max_j ||b_j|| * ||u_i||^(1 - beta): the Cauchy-Schwarz bound on |S(z_i)| = |mean_j <b_j, u_i>| / ||u_i||^beta,
    i.e. the size of the terms each score is summed from (a score near 0 is a cancellation of terms this large)."""
    from drift_stream.bank.store import ValidationBank

    beta = json.loads((run_dir / "beta.json").read_text())["beta"]
    b_norm = float(ValidationBank.load(bank).query_vectors.double().norm(dim=1).max())
    return b_norm * table.column("drift_grad_norm").to_numpy().astype(np.float64) ** (1 - beta)


def assert_scores_close(got: np.ndarray, want: np.ndarray, table: pa.Table, run_dir, bank: str) -> None:
    """Scores of the same rows featurized in other batches (other padding: other float32 sum orders).

    Each component of the float32 features u is a sum with cancellation (G = sum_t delta_t x_t^T, then projections),
    so its rounding is eps32 of the terms' size, up to ~||u||, not of its own value; D such independent errors add up to
    ||du|| ~ sqrt(D) eps32 ||u||, and lambda = 6 of those (a 6-sigma margin): ||du|| <= 6 sqrt(D) eps32 ||u||. Then
    |dS_i| <= 6 sqrt(D) eps32 (M_i + beta |S_i|) (M_i: score_magnitude; the beta term from d||u||^beta), plus the
    float32 storage of S (eps32 |S_i|). Scaled to M_i, not to |S_i|: a score near 0 is a cancellation of terms of size
    M_i (3.2e-8 on S = -1.8e-3 with M = 1.8 was seen: 0.24 eps32 M, 1.8e-5 relative to S).
    """
    from drift_stream.bank.store import ValidationBank

    beta = json.loads((run_dir / "beta.json").read_text())["beta"]
    dim = ValidationBank.load(bank).query_vectors.shape[1]
    eps32 = float(np.finfo(np.float32).eps)
    rho = 6 * np.sqrt(dim) * eps32  # 896 dims here: 2.1e-5
    bound = rho * (score_magnitude(table, run_dir, bank) + abs(beta) * np.abs(want)) + eps32 * np.abs(want)
    excess = np.abs(got.astype(np.float64) - want.astype(np.float64)) - bound
    assert (excess <= 0).all(), (f"{int((excess > 0).sum())} scores differ by more than the float32 bound: worst row "
                                 f"{int(excess.argmax())}: {got[excess.argmax()]} vs {want[excess.argmax()]} "
                                 f"(bound {bound[excess.argmax()]:.3g})")


def test_resume_with_another_batch_size_is_accepted_and_identical(tmp_path, model_and_bank):
    model, bank = model_and_bank
    files = write_pool(tmp_path)
    assert score(files, tmp_path / "a", model, bank, "--batch-size", "8") == 0
    # "OOM" after input file 0: rerun the whole input with a smaller batch size
    assert score(files, tmp_path / "b", model, bank, "--batch-size", "8", "--num-shards", "2", "--shard-index",
                 "0") == 0
    assert score(files, tmp_path / "b", model, bank, "--batch-size", "3") == 0
    recorded = json.loads((tmp_path / "b" / "config.json").read_text())
    assert recorded["execution"]["batch_size"] == 8 and "batch_size" not in json.dumps(
        recorded["config"])
    a, b = pq.read_table(tmp_path / "a" / "data"), pq.read_table(tmp_path / "b" / "data")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    got, want = b.column("drift_score").to_numpy(), a.column("drift_score").to_numpy()
    assert_scores_close(got, want, a, tmp_path / "a", bank)
    with pytest.raises(AssertionError):  # a planted error of 1e-4 of one row's magnitude still fails it
        assert_scores_close(got + 1e-4 * score_magnitude(a, tmp_path / "a", bank) * (np.arange(len(got)) == 5),
                            want, a, tmp_path / "a", bank)
    # an output-changing field is still refused
    assert score(files, tmp_path / "b", model, bank, "--max-tokens", "64") == 2


def test_beta_auto_is_fitted_once_and_read_by_a_resume(tmp_path, model_and_bank):
    model, bank = model_and_bank
    files = write_pool(tmp_path)
    out = tmp_path / "run"
    assert score(files, out, model, bank, "--num-shards", "2", "--shard-index", "0") == 0
    record = json.loads((out / "beta.json").read_text())
    assert record["calibration_rows"] == 16 and np.isfinite(record["beta"])
    # Plant another value: a resume (or the other shard, on other hardware) must score with the record, not refit.
    record["beta"] = 0.25
    (out / "beta.json").write_text(json.dumps(record))
    assert score(files, out, model, bank) == 0
    resumed = pq.read_table(out / "data" / "train-00001-of-00002.parquet")
    fixed = build_scorer("drift", model=model, bank=bank, beta=0.25)(pq.read_table(files[1]))
    scored = fixed.filter(pa.compute.is_null(fixed.column("drift_reject_reason")))
    np.testing.assert_array_equal(resumed.column("drift_score").to_numpy(), scored.column("drift_score").to_numpy())
    marker = json.loads((out / "completions" / "00001.json").read_text())
    assert marker["scorer_info"]["beta"] == 0.25 and marker["scorer_info"]["beta_mode"] == "auto"


def test_first_writer_of_a_record_wins(tmp_path):
    run = RunDirectory(str(tmp_path / "r"))
    assert run.write_json_once("beta.json", {"beta": 1.5})["beta"] == 1.5
    assert run.write_json_once("beta.json", {"beta": 0.5})["beta"] == 1.5
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_concurrent_shards_of_an_array_score_with_one_beta(tmp_path, model_and_bank):
    import subprocess
    import sys

    model, bank = model_and_bank
    files = write_pool(tmp_path)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "drift_stream.cli.main", "score", "--data", *files, "--model", model, "--bank", bank,
            "--out", str(out), "--beta", "auto", "--calibration-rows", "16", "--num-shards", "2", "--quiet",
            "--threads", "1"]
    procs = [subprocess.Popen([*args, "--shard-index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]  # both start with no beta.json
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    record = json.loads((out / "beta.json").read_text())
    betas = [json.loads((out / "completions" / f"{i:05d}.json").read_text())["scorer_info"]["beta"] for i in (0, 1)]
    assert betas == [record["beta"], record["beta"]]
