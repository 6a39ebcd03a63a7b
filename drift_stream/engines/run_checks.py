"""Runs that look wrong say so: most rows rejected -> a warning naming the top reasons and the likely cause; every row
rejected -> AllRejectedError (the CLI exits 2) unless the caller allows it (`--allow-all-rejected`).

The likely cause is read off the reject reasons (`missing_field:X` / `wrong_type:X` point at the adapter,
`invalid_json` / `not_a_json_object` at the file format, `too_long` at --max-tokens, ...).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from drift_stream.errors import AllRejectedError

logger = logging.getLogger(__name__)

MOST_REJECTED = 0.5  # warn when more than this fraction of the rows in was rejected

_CAUSES = {
    "missing_field": "the rows lack the column(s) the adapter reads: wrong --adapter for this data",
    "wrong_type": "a column the adapter reads has another shape than it expects: wrong --adapter for this data",
    "invalid_role": "the turns use roles the adapter does not map: wrong --adapter (e.g. sharegpt data read as "
                    "messages)",
    "invalid_json": "the file is not JSON Lines (one object per line): check the file format",
    "not_a_json_object": "the records are not JSON objects: check the file format",
    "invalid_utf8": "the file is not UTF-8 text: check its encoding",
    "too_long": "the rows are longer than --max-tokens: raise it or pass --overlong truncate",
    "no_loss_tokens": "no assistant tokens to score: check the chat template (--chat-template) and the adapter",
    "empty_response": "the assistant turns are empty",
    "no_assistant_turn": "no assistant turn in the rows: wrong --adapter, or prompts without responses",
    "conflicting_system": "the rows carry a system column and a different system turn in the conversation: keep "
                          "one of them (an empty column, or the same text, is accepted)",
}


def rejection_summary(manifest: Mapping[str, Any], adapter: str | None = None, top: int = 3) -> str | None:
    """A one-paragraph summary when more than half the rows were rejected, else None."""
    rows_in, rejected = int(manifest.get("rows_in") or 0), int(manifest.get("rows_rejected") or 0)
    if rows_in == 0 or rejected <= MOST_REJECTED * rows_in:
        return None
    by_reason = sorted((manifest.get("rejected_by_reason") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    reasons = ", ".join(f"{code} ({n})" for code, n in by_reason[:top])
    causes = list(dict.fromkeys(_CAUSES[code] for code, _ in by_reason[:top] if code in _CAUSES))
    cause = "; ".join(causes) if causes else "see the rejects/ shards for the reason of each row"
    with_adapter = f" with adapter {adapter!r}" if adapter else ""
    return (f"{rejected} of {rows_in} rows were rejected{with_adapter}; top reasons: {reasons}. Likely cause: "
            f"{cause}. `drift-stream adapters` lists the formats; rejects/ holds every rejected row and its reason")


def check_rejections(manifest: Mapping[str, Any], scorer: Any = None, *, allow_all_rejected: bool = False) -> None:
    """Warn when most rows were rejected; raise AllRejectedError when all were (unless allowed)."""
    adapter = getattr(getattr(scorer, "adapter", None), "name", None)
    summary = rejection_summary(manifest, adapter)
    if summary is None:
        return
    scored = int(manifest.get("rows_scored") or 0)
    # only a complete run is judged as a whole: another shard process may still score good rows
    if scored == 0 and manifest.get("complete", True) and not allow_all_rejected:
        raise AllRejectedError(f"every row was rejected: {summary}. The run directory is kept; pass "
                               "--allow-all-rejected (allow_all_rejected=True) to accept such a run")
    logger.warning("%s", summary)
