"""beta `auto`, resolved once per run: fitted by the first process, recorded in the run directory, read by the rest.

    OUT/beta.json   {"beta": 0.87, "calibration_rows": 256, "debias": {...}, "fitted_by": {...}, "version": ...}

`resolve_beta(scorer, rows, run)` is THE call every engine makes before scoring (the pipeline, `score --engine ray`
on its driver, `integrations.hf_datasets.score_dataset` without a run directory): with a fixed beta it does nothing;
with `auto` it reads the record when one exists (every other shard process of a Slurm array, every resume, on any
hardware), else fits beta on `rows()` (the first --calibration-rows rows of the whole input) and records it; the first
writer wins (`RunDirectory.write_json_once`), and every process then scores with the recorded number.
Scorers for other processes (Ray actors) are built with that fixed number: `build_scorer(..., beta=value)`.
"""

from __future__ import annotations

import logging
import platform
from typing import Any, Callable

from drift_stream.errors import ConfigError
from drift_stream.version import __version__

logger = logging.getLogger(__name__)

BETA_FILE = "beta.json"


def read_beta_record(run) -> dict | None:
    """The beta record of a run directory (`io.run_dir.RunDirectory`), or None when beta was never fitted there."""
    record = run.read_json(BETA_FILE)
    if record is not None and not isinstance(record.get("beta"), (int, float)):
        raise ConfigError(f"{run.url}/{BETA_FILE} holds no number under 'beta': delete the file to refit beta")
    return record


def resolve_beta(scorer: Any, rows: Callable[[], Any] | Any, run: Any = None) -> float | None:
    """The beta `scorer` scores with, fixed on it (`scorer.use_beta`) when its config says `auto`.

    rows: the calibration rows (a table / batch, or a zero-argument callable returning one, called only when beta
      has to be fitted). run: the RunDirectory whose record is read and written, or None (fit, no record).
    Returns None for scorers without a beta (loss, ifd, random). Raises ConfigError when fitting fails (fewer than
    8 scorable calibration rows).
    """
    if not getattr(scorer, "needs_calibration", False):
        return getattr(scorer, "beta", None)
    record = read_beta_record(run) if run is not None else None
    if record is None:
        beta, debias = scorer.fit_beta(rows() if callable(rows) else rows)
        fitted = {"beta": beta, "calibration_rows": debias.get("calibration_rows"), "debias": debias,
                  "fitted_by": _fitted_by(scorer), "version": __version__}
        record = fitted if run is None else run.write_json_once(BETA_FILE, fitted)
        if record is not fitted and record.get("beta") != beta:
            logger.warning("beta: auto: this process fitted %.6g but %s/%s already held %.6g (another process was "
                           "first); scoring with the recorded value", beta, run.url, BETA_FILE, record["beta"])
    else:
        logger.info("beta: auto: using beta=%.6g recorded in %s/%s", record["beta"], run.url, BETA_FILE)
    scorer.use_beta(float(record["beta"]), record.get("debias"))
    return float(record["beta"])


def _fitted_by(scorer: Any) -> dict:
    """Where beta was fitted (device / dtype of the model), so a record read elsewhere says where it came from."""
    info = {"host": platform.node()}
    model = getattr(scorer, "_model", None)
    if model is not None:
        try:
            param = next(model.parameters())
            info.update(device=str(param.device), dtype=str(param.dtype).replace("torch.", ""))
        except (StopIteration, AttributeError):
            pass
    return info
