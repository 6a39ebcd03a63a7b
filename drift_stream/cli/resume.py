"""The `drift-stream score` command that completes a recorded run, built from the real parser.

Every recorded setting that differs from the parser's default is rendered the way argparse reads it back: a
`store_true` flag bare, `--no-chat-template` for `use_chat_template: false`, one `--stop-token X` per list item, values
shell-quoted. tests/test_cli.py parses the printed command with `build_parser()` and compares the settings.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, Mapping

# config.json keys of the run itself (not ScoreConfig fields) and the flag that sets each
_RUN_KEYS = {"adapter": "--adapter"}


def _actions(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """`score`'s argparse actions by destination."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    score = sub.choices["score"]
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in score._actions:
        if action.option_strings:
            by_dest.setdefault(action.dest, []).append(action)
    return by_dest


def _render(actions: list[argparse.Action], value: Any) -> list[str] | None:
    """Flags that make argparse set `actions[0].dest` to `value`; None when no flag can (left at its default)."""
    for action in actions:
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if value is True:
                return [flag]
        elif isinstance(action, argparse._StoreFalseAction):
            if value is False:
                return [flag]
        elif isinstance(action, argparse._AppendAction):
            items = list(value or ())
            return [part for item in items for part in (flag, shlex.quote(str(item)))]
        elif isinstance(action, argparse._StoreAction):
            if value is None or isinstance(value, bool):
                continue
            if isinstance(value, Mapping):
                import json

                return [flag, shlex.quote(json.dumps(value))]
            return [flag, shlex.quote(str(value))]
    return None


def resume_command(url: str, config: Mapping[str, Any]) -> str:
    """The `drift-stream score` command that completes the run recorded in `config` (config.json's "config").

    Output-changing settings that differ from the CLI's defaults are given; execution-only ones (batch size, device)
    are left to the user. Inputs are listed when there are at most 8 of them, else a placeholder says so.
    """
    from drift_stream.cli.parser import build_parser

    parser = build_parser()
    actions = _actions(parser)
    scorer = dict(config.get("scorer") or {})
    inputs = list(config.get("input_files") or [])
    data = " ".join(shlex.quote(u) for u in inputs) if 0 < len(inputs) <= 8 else \
        f"<the {len(inputs)} inputs of the first run>"
    parts = ["drift-stream score", f"--data {data}", f"--out {shlex.quote(url)}"]
    for dest in ("model", "scorer", "bank"):
        if scorer.get(dest) not in (None, ""):
            parts += [f"--{dest}", shlex.quote(str(scorer[dest]))]
    settings = {k: v for k, v in scorer.items() if k not in ("model", "scorer", "bank")}
    for key in _RUN_KEYS:
        if config.get(key) is not None and key not in settings:
            settings[key] = config[key]
    for dest, value in settings.items():
        if dest not in actions:
            continue
        default = parser._subparsers._group_actions[0].choices["score"].get_default(dest)
        if value == default or (isinstance(value, (list, tuple)) and list(value) == list(default or [])):
            continue
        rendered = _render(actions[dest], value)
        if rendered:
            parts += rendered
    return " ".join(parts)
