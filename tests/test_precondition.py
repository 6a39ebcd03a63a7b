"""Preconditioners against explicit numpy computations; streaming fit; safetensors round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drift_stream.errors import ConfigError
from drift_stream.grads.precondition import Preconditioner, PreconditionerConfig

SIZES = [4, 6, 3]


def training_rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(sum(SIZES), sum(SIZES)))
    return rng.normal(size=(n, sum(SIZES))) @ mix  # correlated columns, so the block inverse is not diagonal


def fit(kind, rows, batch=7, **kwargs):
    pre = Preconditioner(PreconditionerConfig(kind=kind, **kwargs), SIZES)
    for start in range(0, len(rows), batch):  # streaming: several uneven batches
        pre.update(torch.tensor(rows[start : start + batch], dtype=torch.float32))
    return pre.finalize()


def queries(seed=1):
    return np.random.default_rng(seed).normal(size=(5, sum(SIZES)))


def test_identity_is_a_copy():
    pre = Preconditioner(PreconditionerConfig(kind="identity"), SIZES).finalize()
    q = torch.tensor(queries())
    out = pre.apply(q)
    assert torch.equal(out, q) and out is not q


@pytest.mark.parametrize("mode,damping", [("relative", 0.1), ("absolute", 0.5)])
def test_diagonal_matches_numpy(mode, damping):
    rows = training_rows().astype(np.float32).astype(np.float64)
    pre = fit("diagonal", rows, damping=damping, damping_mode=mode)
    second = (rows**2).mean(axis=0)
    lam = damping * second.mean() if mode == "relative" else damping
    expected = queries() / (second + lam)
    np.testing.assert_allclose(pre.apply(torch.tensor(queries())).numpy(), expected, rtol=1e-10)
    assert pre.count == len(rows) and float(pre.lambdas[0]) == pytest.approx(lam, rel=1e-12)


@pytest.mark.parametrize("mode,damping", [("relative", 0.1), ("relative", 0.01), ("absolute", 2.0)])
def test_block_matches_numpy(mode, damping):
    rows = training_rows().astype(np.float32).astype(np.float64)
    pre = fit("block", rows, damping=damping, damping_mode=mode)
    q = queries()
    expected = np.empty_like(q)
    start = 0
    for size in SIZES:
        part = rows[:, start : start + size]
        fisher = part.T @ part / len(rows)
        lam = damping * np.linalg.eigvalsh(fisher).mean() if mode == "relative" else damping
        h = fisher + lam * np.eye(size)
        expected[:, start : start + size] = np.linalg.solve(h, q[:, start : start + size].T).T
        start += size
    out = pre.apply(torch.tensor(q)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)
    # not block-diagonal-blind: the answer differs from the diagonal preconditioner's
    assert np.abs(out - fit("diagonal", rows).apply(torch.tensor(q)).numpy()).max() > 1e-3


def test_apply_keeps_dtype_and_bad_rows_are_skipped():
    rows = training_rows()
    pre = Preconditioner(PreconditionerConfig(kind="block"), SIZES)
    poisoned = torch.tensor(rows[:10])
    poisoned[3] = float("nan")
    with pytest.raises(ValueError, match="not flagged as bad"):
        pre.update(poisoned)
    pre.update(poisoned, bad=[None, None, None, "nonfinite_loss"] + [None] * 6)
    pre.update(torch.tensor(rows[10:]))
    pre.finalize()
    assert (pre.count, pre.skipped) == (len(rows) - 1, 1)
    clean = fit("block", np.delete(rows, 3, axis=0))
    q = torch.tensor(queries(), dtype=torch.float32)
    out = pre.apply(q)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, clean.apply(q), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["identity", "diagonal", "block"])
def test_safetensors_round_trip(tmp_path, kind):
    rows = training_rows()
    pre = fit(kind, rows, damping=0.2)
    path = tmp_path / "pre.safetensors"
    pre.save(path)
    loaded = Preconditioner.load(path)
    assert (loaded.kind, loaded.block_sizes, loaded.count, loaded.config) == (kind, SIZES, pre.count, pre.config)
    q = torch.tensor(queries())
    torch.testing.assert_close(loaded.apply(q), pre.apply(q), rtol=1e-12, atol=1e-14)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # a plain safetensors file: no pickle anywhere
        assert "preconditioner.kind" in f.keys()


def test_unfinalized_state_continues_streaming():
    rows = training_rows()
    half = Preconditioner(PreconditionerConfig(kind="diagonal"), SIZES)
    half.update(torch.tensor(rows[:20], dtype=torch.float32))
    resumed = Preconditioner.from_state_dict(half.state_dict())
    assert not resumed.finalized
    resumed.update(torch.tensor(rows[20:], dtype=torch.float32))
    resumed.finalize()
    q = torch.tensor(queries())
    torch.testing.assert_close(resumed.apply(q), fit("diagonal", rows).apply(q), rtol=1e-12, atol=1e-14)


def test_errors():
    with pytest.raises(ConfigError, match="kind"):
        PreconditionerConfig(kind="kfac")
    with pytest.raises(ConfigError, match="damping"):
        PreconditionerConfig(damping=-1.0)
    with pytest.raises(ConfigError, match="block_sizes"):
        Preconditioner(PreconditionerConfig(), [])
    pre = Preconditioner(PreconditionerConfig(kind="block"), SIZES)
    with pytest.raises(ValueError, match=r"\[B, 13\]"):
        pre.update(torch.zeros(2, 12))
    with pytest.raises(RuntimeError, match="finalize"):
        pre.apply(torch.zeros(1, 13))
    with pytest.raises(ValueError, match="no training rows"):
        pre.finalize()
    with pytest.raises(ValueError, match="not a preconditioner"):
        Preconditioner.from_state_dict({})
    zero = Preconditioner(PreconditionerConfig(kind="block", damping=0.0, damping_mode="absolute"), SIZES)
    zero.update(torch.zeros(3, 13))
    with pytest.raises(ValueError, match="singular"):
        zero.finalize()
