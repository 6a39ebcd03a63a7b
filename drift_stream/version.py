"""The package version (pyproject.toml [project] version), importable without torch."""

__version__ = "0.1.0"
