"""Verifiers: a reward in [0, 1] for one rollout of one query, or a failure reason.

A verifier is an object with `score(completion, query) -> float | bool`; it may raise. `verify_rollouts` runs it
in worker processes with a hard timeout per rollout (verifier_pool.py) and turns anything that goes wrong into a
`VerifyResult.failure`, so one bad rollout never stops a bank build. Specs (`load_verifier`): `exact`, `numeric`, `math`, `regex:PATTERN`, `reasoning_gym`,
or `module:function` / `path/to/file.py:function` for a user function `fn(completion: str, query: Query)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import re
import threading  # ReasoningGymVerifier's cache lock
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable

from drift_stream.data.answers import extract_answer
from drift_stream.errors import ConfigError
from drift_stream.rollouts.engine import Query

logger = logging.getLogger(__name__)

_MAX_REASON_CHARS = 200


class VerifierError(ValueError):
    """A verifier cannot judge this rollout (e.g. the reference answer is not a number)."""


@dataclass(frozen=True)
class VerifyResult:
    reward: float | None  # in [0, 1]; None when failed
    failure: str | None = None  # short reason: "timeout:10s", "error:ValueError: ...", "bad_reward:nan"


class Verifier:
    """Base class. Subclasses set `name` and implement `score`."""

    name = "verifier"

    def score(self, completion: str, query: Query) -> float | bool:
        raise NotImplementedError

    def spec(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"


# ---------------------------------------------------------------------------------------------------------------
# answer extraction

_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_FRACTION_RE = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")
_LATEX_FRAC_RE = re.compile(r"^\s*(-?)\s*\\d?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}\s*$")


def parse_number(text: str) -> Fraction | float | None:
    """A number from a short answer span: `1,000`, `30.0`, `$12`, `50%`, `3/4`, `\\frac{3}{4}`, `-2.5e3`.
    Exact (Fraction) where possible so 30.0 == 30; the first number of the span when it holds words too."""
    s = text.strip().replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\%", "%")
    s = s.replace("{,}", ",").rstrip(".")
    frac = _LATEX_FRAC_RE.match(s)
    if frac:
        num, den = _to_fraction(frac.group(2)), _to_fraction(frac.group(3))
        if num is not None and den not in (None, 0):
            return -num / den if frac.group(1) else num / den
    frac = _FRACTION_RE.match(s)
    if frac:
        num, den = _to_fraction(frac.group(1)), _to_fraction(frac.group(2))
        if num is not None and den not in (None, 0):
            return num / den
    match = _NUMBER_RE.search(s)
    return None if match is None else _to_fraction(match.group(0))


def _to_fraction(token: str) -> Fraction | None:
    token = token.strip().replace(",", "")
    if token in ("", "+", "-", "."):
        return None
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        try:
            value = float(token)
        except ValueError:
            return None
        return Fraction(value) if math.isfinite(value) else None


def _last_number(text: str) -> Fraction | None:
    matches = [m.group(0) for m in _NUMBER_RE.finditer(text)]
    for token in reversed(matches):
        value = _to_fraction(token)
        if value is not None:
            return value
    return None


def _normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(".").strip()


def _reference(query: Query) -> str:
    ref = query.answer if query.answer is not None else query.reference
    if ref is None or not str(ref).strip():
        raise VerifierError(f"query {query.id!r} has no reference answer")
    return str(ref)


# ---------------------------------------------------------------------------------------------------------------
# built-in verifiers


class ExactVerifier(Verifier):
    """1.0 when the marked answer (or, when none is marked, the whole completion) equals the reference, modulo
    surrounding/repeated whitespace and a trailing period."""

    name = "exact"

    def __init__(self, case_sensitive: bool = True):
        self.case_sensitive = case_sensitive

    def score(self, completion: str, query: Query) -> float:
        ref = _reference(query)
        got = extract_answer(completion)
        got = completion if got is None else got
        a, b = _normalize(got), _normalize(ref)
        if not self.case_sensitive:
            a, b = a.casefold(), b.casefold()
        return float(a == b)


class NumericVerifier(Verifier):
    """1.0 when the completion's number equals the reference's within `rel_tol` (30.0 == 30, 1,000 == 1000).

    The completion's number is the one in its marked answer, else the last number in the text."""

    name = "numeric"

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9):
        if rel_tol < 0 or abs_tol < 0:
            raise ConfigError(f"numeric verifier tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
        self.rel_tol, self.abs_tol = rel_tol, abs_tol

    def score(self, completion: str, query: Query) -> float:
        ref_text = _reference(query)
        marked = extract_answer(ref_text)
        ref = parse_number(marked if marked is not None else ref_text)
        if ref is None:
            raise VerifierError(f"reference answer {ref_text[:80]!r} of query {query.id!r} is not a number")
        marked = extract_answer(completion)
        got = parse_number(marked) if marked is not None else None
        if got is None:
            got = _last_number(completion)
        if got is None:
            return 0.0
        if got == ref:
            return 1.0
        a, b = float(got), float(ref)
        return float(abs(a - b) <= max(self.abs_tol, self.rel_tol * max(abs(a), abs(b))))


class MathVerifier(Verifier):
    """Mathematical equivalence by the `math-verify` package (LaTeX or plain expressions).

    math-verify's own timeouts use SIGALRM, which only works in the main thread; they are switched off here and
    `verify_rollouts` bounds the time instead (it kills the worker process at the deadline)."""

    name = "math"

    def __init__(self):
        try:
            import math_verify  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "verifier 'math' needs the math-verify package: pip install 'drift-stream[math]'"
            ) from exc

    def score(self, completion: str, query: Query) -> float:
        from math_verify import parse, verify

        ref = _reference(query)
        gold = parse(ref, parsing_timeout=None)
        if not gold:
            gold = parse(f"${ref}$", parsing_timeout=None)
        if not gold:
            raise VerifierError(f"math-verify cannot parse the reference answer {ref[:80]!r} of query {query.id!r}")
        pred = parse(completion, parsing_timeout=None)
        if not pred:
            return 0.0
        return float(bool(verify(gold, pred, timeout_seconds=None)))


class RegexVerifier(Verifier):
    """1.0 when `pattern` is found in the completion (re.search). The literal `{answer}` in the pattern stands for
    the query's reference answer, escaped."""

    name = "regex"

    def __init__(self, pattern: str):
        self.pattern = pattern
        try:
            re.compile(pattern.replace("{answer}", "x"))
        except re.error as exc:
            raise ConfigError(f"verifier regex {pattern!r} does not compile: {exc}") from exc

    def spec(self) -> str:
        return f"regex:{self.pattern}"

    def score(self, completion: str, query: Query) -> float:
        pattern = self.pattern
        if "{answer}" in pattern:
            pattern = pattern.replace("{answer}", re.escape(_normalize(_reference(query))))
        return float(re.search(pattern, completion) is not None)


class ReasoningGymVerifier(Verifier):
    """The reasoning-gym dataset's own `score_answer(answer, entry)`.

    The query must carry its task name (`task`, else `metadata["source_dataset"]`) and the entry's `metadata`
    (a JSON column in the queries file). The answer given to `score_answer` is the `<answer>` tag's content, else
    the marked answer, else the whole completion stripped."""

    name = "reasoning_gym"

    def __init__(self):
        try:
            import reasoning_gym  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "verifier 'reasoning_gym' needs the reasoning-gym package: pip install 'drift-stream[gym]'"
            ) from exc
        self._score_fns: dict[str, Callable] = {}
        self._lock = threading.Lock()

    def _score_fn(self, task: str) -> Callable:
        with self._lock:
            if task not in self._score_fns:
                import reasoning_gym

                try:
                    self._score_fns[task] = reasoning_gym.get_score_answer_fn(task)
                except ValueError as exc:
                    raise VerifierError(f"reasoning-gym has no dataset {task!r}") from exc
            return self._score_fns[task]

    def score(self, completion: str, query: Query) -> float:
        metadata = dict(query.metadata or {})
        task = query.task or metadata.get("source_dataset")
        if not task:
            raise VerifierError(
                f"query {query.id!r} names no reasoning-gym task: give a `task` column or metadata.source_dataset"
            )
        # The extracted answer, not `reference` (the whole worked response kept for off-policy targets).
        entry = {"question": query.question, "answer": _reference(query), "metadata": metadata}
        answer = extract_answer(completion)
        if answer is None:
            answer = completion.strip()
        return float(self._score_fn(str(task))(answer, entry))


class FunctionVerifier(Verifier):
    """A user function `fn(completion: str, query: Query) -> float | bool`, named explicitly as `module:function`
    or `path/to/file.py:function`."""

    name = "function"

    def __init__(self, fn: Callable, spec: str):
        self.fn, self._spec = fn, spec

    def spec(self) -> str:
        return self._spec

    def score(self, completion: str, query: Query) -> float | bool:
        return self.fn(completion, query)


_BUILTIN = {
    "exact": ExactVerifier,
    "numeric": NumericVerifier,
    "math": MathVerifier,
    "reasoning_gym": ReasoningGymVerifier,
    "reasoning-gym": ReasoningGymVerifier,
}


def load_verifier(spec: str | Verifier) -> Verifier:
    """`exact` | `numeric` | `math` | `regex:PATTERN` | `reasoning_gym` | `module:function` | `file.py:function`."""
    if isinstance(spec, Verifier):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"verifier spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in _BUILTIN:
        return _BUILTIN[spec]()
    if spec.startswith("regex:"):
        return RegexVerifier(spec[len("regex:") :])
    if ":" in spec:
        return FunctionVerifier(_import_function(spec), spec)
    raise ConfigError(
        f"unknown verifier {spec!r}: use exact, numeric, math, regex:PATTERN, reasoning_gym, "
        "or module:function / path/to/file.py:function"
    )


def _import_function(spec: str) -> Callable:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"verifier {spec!r} must look like module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"verifier file {module_name!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"drift_user_verifier_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import verifier module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"verifier {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn


# ---------------------------------------------------------------------------------------------------------------
# running verifiers safely


def _check_reward(value) -> VerifyResult:
    if isinstance(value, bool):
        return VerifyResult(float(value))
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return VerifyResult(None, f"bad_reward:{type(value).__name__}")
    if not math.isfinite(reward) or reward < 0.0 or reward > 1.0:
        return VerifyResult(None, f"bad_reward:{reward!r}")
    return VerifyResult(reward)


def _error_reason(exc: BaseException) -> str:
    return f"error:{type(exc).__name__}: {exc}"[:_MAX_REASON_CHARS]


def _score_one(verifier: Verifier, completion: str, query: Query) -> VerifyResult:
    """One verification in the calling process: an exception becomes a failure reason (no time limit)."""
    try:
        return _check_reward(verifier.score(completion, query))
    except Exception as exc:  # a user's verifier may raise anything; it must not stop the build
        return VerifyResult(None, _error_reason(exc))


def run_verifier(verifier: Verifier, completion: str, query: Query, timeout_s: float | None = 10.0) -> VerifyResult:
    """One verification, contained: an exception or a run past `timeout_s` becomes a failure reason.

    With a timeout the call runs in a worker process that is killed at the deadline (verifier_pool.py); without one,
    in this process."""
    if not timeout_s:
        return _score_one(verifier, completion, query)
    return verify_rollouts(verifier, [(completion, query)], timeout_s, workers=1)[0]


def verify_rollouts(
    verifier: Verifier,
    items: Iterable[tuple[str, Query]],
    timeout_s: float | None = 10.0,
    progress: bool = False,
    workers: int | None = None,
) -> list[VerifyResult]:
    """Verify (completion, query) pairs; results in input order. Failures are counted and logged, never raised.

    The calls run on `workers` processes (default min(4, CPUs, items)); one running past `timeout_s` seconds is
    stopped (its process killed) and answered `timeout:Xs`, so a catastrophic regex costs at most its timeout.
    With timeout_s None and one worker, they run in this process.
    """
    from drift_stream.rollouts.verifier_pool import default_workers, run_in_processes

    items = list(items)
    if not items:
        return []
    workers = default_workers(len(items)) if workers is None else max(1, int(workers))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="verify", unit="rollout")
    try:
        if not timeout_s and workers == 1:
            results = []
            for completion, query in items:
                results.append(_score_one(verifier, completion, query))
                if bar is not None:
                    bar.update(1)
        else:
            results = run_in_processes(
                _score_one, verifier, items, timeout_s, workers,
                on_timeout=lambda i: VerifyResult(None, f"timeout:{timeout_s:g}s"),
                on_death=lambda i, code: VerifyResult(None, f"error:verifier process died (exit code {code})"),
                progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    failed = [r.failure for r in results if r.failure is not None]
    if failed:
        logger.warning(
            "verifier %s failed on %d of %d rollouts (first reason: %s)", verifier, len(failed), len(results), failed[0]
        )
    timeouts = sum(1 for r in failed if r.startswith("timeout:"))
    if timeouts:
        logger.warning("verifier %s ran past its %gs timeout on %d rollouts: those processes were stopped",
                       verifier, timeout_s, timeouts)
    return results
