"""The house by stage: the import-linter layers contract (pyproject.toml) holds, the package root holds only
__init__/errors/version, no module is over 500 lines, and every CLI `choices=` is the library's own option tuple."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "drift_stream"
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def test_import_linter_layers_contract_is_kept():
    # exit code 0: every contract kept (a wrong arrow, e.g. io importing scoring, makes it 1 and names the import).
    # In a subprocess: import-linter reconfigures logging, which would silence later tests' caplog.
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_root_holds_only_the_typed_errors_and_the_version():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "errors.py", "version.py"]


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def _choice_actions():
    from drift_stream.cli.parser import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + (name,))
            elif action.choices is not None:
                yield path, action.option_strings[0], action, parser

    return list(walk(build_parser(), ()))


def _library_tuples():
    from drift_stream.bank.config import PRECONDITIONERS, SIGNINGS, TARGETS, TRUNCATED
    from drift_stream.bank.contrast import NO_CONTRAST, QUERY_WEIGHTINGS
    from drift_stream.data.tokenization import OVERLONG_POLICIES
    from drift_stream.embedded.real_models import REAL_MODELS
    from drift_stream.engines.local import ENGINES, ON_BAD_ROW
    from drift_stream.model.loading import DTYPES
    from drift_stream.refine.export import FORMATS, LAYOUTS
    from drift_stream.refine.weight_map import WEIGHT_MAPS
    from drift_stream.scoring.base import GRANULARITIES, SCORERS

    return {"--engine": ENGINES, "--scorer": SCORERS, "--overlong": OVERLONG_POLICIES, "--on-bad-row": ON_BAD_ROW,
            "--dtype": DTYPES, "--signing": SIGNINGS, "--targets": TARGETS, "--preconditioner": PRECONDITIONERS,
            "--truncated": TRUNCATED, "--no-contrast": NO_CONTRAST, "--query-weighting": QUERY_WEIGHTINGS,
            "--format": FORMATS, "--layout": LAYOUTS, "--weight-map": WEIGHT_MAPS, "--granularity": GRANULARITIES,
            "--model": tuple(REAL_MODELS)}


def test_cli_choices_are_the_library_option_tuples_both_ways():
    tuples = _library_tuples()
    actions = _choice_actions()
    seen = set()
    for path, flag, action, parser in actions:
        assert flag in tuples, f"{' '.join(path)} {flag}: choices without a library tuple"
        assert tuple(action.choices) == tuple(tuples[flag]), (path, flag)
        seen.add(flag)
        # every library value is accepted by argparse's own check; a value outside the tuple is refused
        for value in tuples[flag]:
            parser._check_value(action, value)
        with pytest.raises(argparse.ArgumentError, match="invalid choice"):
            parser._check_value(action, "not-a-choice")
    assert seen == set(tuples), set(tuples) - seen  # each library tuple is offered by some flag


def test_no_import_circle_between_modules():
    """No two modules of the package import each other, directly or through others (grimp, import-linter's graph;
    imports inside functions count too). Circles hide inside a room, where the layers contract does not look."""
    import grimp

    graph = grimp.build_graph("drift_stream")
    circles = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                      if b != a and graph.chain_exists(importer=b, imported=a)})
    assert not circles, circles
