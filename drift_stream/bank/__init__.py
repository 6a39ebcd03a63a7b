"""The validation bank room: config.py (BankConfig), build.py (build_bank: rollouts -> verifier -> signed query
gradients -> preconditioner -> bank directory), targets.py (the per-query vectors g_j and signing), store.py (the bank
directory on disk: write_bank, ValidationBank, fingerprints) and contrast.py (queries without a contrast, query
weighting).

Import each name from its home module; this package re-exports nothing.
"""
