"""Typed errors. Each says what was wrong, with which value, and how to fix it."""

from __future__ import annotations


class DriftError(Exception):
    """Base class of every error drift-stream raises on purpose."""


class ConfigError(DriftError, ValueError):
    """A configuration value is invalid (bad flag, bad YAML, out-of-range number)."""


class AdapterError(DriftError, ValueError):
    """A format adapter spec is invalid or cannot be found."""


class InputError(DriftError):
    """An input file cannot be read (corrupt parquet, unreadable URL). Names the file."""


class BadRowError(DriftError, ValueError):
    """A row is invalid and the run was asked to stop on bad rows (--on-bad-row error)."""


class RunDirMismatchError(DriftError):
    """A rerun into a run directory that was made with a different config."""


class InputChangedError(RunDirMismatchError):
    """An input file (or dataset) differs from the one the run directory recorded: resuming would mix two inputs."""


class BankError(DriftError):
    """A validation bank is missing, corrupt, or does not match the model / projector."""


class BankMismatchError(BankError):
    """The bank was built for another model, tokenizer or projector."""


class IncompleteRunError(InputError):
    """A run directory is missing completion markers: some input files were never scored (or not yet).

    `url` and `config` (config.json's "config") let the CLI print the score command that completes the run.
    """

    def __init__(self, message: str, *, url: str | None = None, config: dict | None = None) -> None:
        super().__init__(message)
        self.url, self.config = url, config


class AllRejectedError(DriftError):
    """Every row of a run was rejected (wrong adapter or file format, most often); the run directory is kept."""
