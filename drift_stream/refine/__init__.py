"""The refine room: what happens to a scored run directory.

policies.py (refine_run: top / threshold / positive / weights / repeat), selection.py (which rows `top:P` keeps,
stratified cuts), chain.py (prefilters: filters in sequence), export.py (a refined run -> the layout a trainer loads),
report.py (the HTML page and the terminal summary of a run).

`from drift_stream.refine import X` keeps working for every name the former module drift_stream/refine.py exported.
"""

from drift_stream.refine.chain import Prefilter
from drift_stream.refine.policies import (
    BATCH_ROWS,
    FILTER_KINDS,
    POLICY_KINDS,
    Policy,
    RefineConfig,
    read_json,
    refine_run,
)

__all__ = ["BATCH_ROWS", "FILTER_KINDS", "POLICY_KINDS", "Policy", "Prefilter", "RefineConfig", "read_json",
           "refine_run"]
