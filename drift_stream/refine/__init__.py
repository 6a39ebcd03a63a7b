"""The refine room: what happens to a scored run directory.

policies.py (refine_run: top / threshold / positive / weights / repeat), selection.py (which rows `top:P` keeps,
stratified cuts), chain.py (prefilters: filters in sequence), export.py (a refined run -> the layout a trainer loads),
report.py (the HTML page and the terminal summary of a run).

Import each name from its home module; this package re-exports nothing.
"""
