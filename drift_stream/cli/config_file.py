"""`--config FILE.yaml` for every subcommand: the file's keys are the subcommand's flags, the command line wins.

    # score.yaml                              drift-stream score --config score.yaml --out runs/b
    data: [s3://bucket/pool/*.parquet]       # a list for flags that take several values
    model: /models/qwen
    bank: /banks/gsm8k
    beta: auto
    keep-query-scores: true                  # dashes or underscores, as on the command line
    engine: ray

Keys are the flag names without the leading dashes (`batch-rows` or `batch_rows`) and the names of positional
arguments (`run_dir` for refine / report); values are YAML scalars, lists for flags that take several values, booleans
for switches, a mapping for `storage-options`. Every value is checked like the same flag on the command line (type,
choices); an unknown key is an error naming the key and the file. The file's values become the flags' defaults,
so a flag given on the command line wins. Nothing else is special about the file: what a command records (e.g. a
run directory's config.json) is the resolved value, wherever it came from.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from drift_stream.errors import ConfigError

CONFIG_FLAG = "--config"


def config_path(argv: Sequence[str]) -> str | None:
    """The value of the last `--config FILE` / `--config=FILE` in argv, or None."""
    path = None
    for i, token in enumerate(argv):
        if token == CONFIG_FLAG and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith(CONFIG_FLAG + "="):
            path = token.split("=", 1)[1]
    return path


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def leaf_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.ArgumentParser, str] | None:
    """The subcommand parser that `argv` selects (e.g. `bank build`) and its name, or None."""
    names: list[str] = []
    tokens = iter(argv)
    current = parser
    while (sub := _subparsers(current)) is not None:
        token = next((t for t in tokens if not t.startswith("-")), None)
        if token is None or token not in sub.choices:
            return None
        names.append(token)
        current = sub.choices[token]
    return current, " ".join(names)


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values, got {type(values).__name__}")
    return values


def _convert(action: argparse.Action, value: Any, key: str, path: str) -> Any:
    """`value` from the file, converted and checked as argparse would convert and check the flag's text."""
    where = f"--config {path}: {key}"
    kind = {int: "an integer", float: "a number"}.get(action.type)
    if getattr(action.type, "__name__", "") == "_json_arg":  # --storage-options: a mapping, or its JSON text
        if isinstance(value, str):
            value = _call_type(action, value, where)
        elif not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
    elif isinstance(value, (dict, list)):
        raise ConfigError(f"{where} takes one value, got {value!r}")
    elif kind is not None:
        if isinstance(value, str):
            try:
                value = action.type(value)
            except ValueError:
                raise ConfigError(f"{where} must be {kind}, got {value!r}") from None
        elif isinstance(value, bool) or (action.type is int and not isinstance(value, int)):
            raise ConfigError(f"{where} must be {kind}, got {value!r}")
        value = action.type(value)
    elif action.type is not None:  # e.g. --beta: a number or 'auto'
        value = _call_type(action, str(value), where)
    elif not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _call_type(action: argparse.Action, text: str, where: str) -> Any:
    try:
        return action.type(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Make the values of `--config FILE` (if argv has one) the defaults of the selected subcommand's flags.

    Raises ConfigError for an unreadable file, an unknown key (naming it and the file) or a bad value.
    """
    path = config_path(argv)
    if path is None:
        return
    found = leaf_parser(parser, argv)
    if found is None:
        return  # argparse reports the missing / unknown subcommand
    leaf, command = found
    values = load_config_file(path)
    actions = {a.dest: a for a in leaf._actions if a.dest not in ("help", "config") and not isinstance(
        a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise ConfigError(f"--config {path}: unknown key {key!r} for `drift-stream {command}` (its keys: {known})")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} is a switch: true or false, got {value!r}")
        elif action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            if not items and action.nargs == "+":
                raise ConfigError(f"--config {path}: {key} needs at least one value")
            value = [_convert(action, item, key, path) for item in items]
        elif value is not None:
            value = _convert(action, value, key, path)
        action.default = value
        action.required = False
        if not action.option_strings:  # a positional argument given by the file: optional on the command line
            action.nargs = "?"
