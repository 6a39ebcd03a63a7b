"""Gradient features: projections, hooked per-example projected gradients, preconditioners.

Import each name from its home module; this package re-exports nothing.
"""
