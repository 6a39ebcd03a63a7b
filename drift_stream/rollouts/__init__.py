"""Rollouts of the model being refined (engine) and the verifiers that reward them.

Importing this package does not import torch; the engine imports it when it generates.

Import each name from its home module; this package re-exports nothing.
"""
