"""Errors users see: each names the file and the problem."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of errors caused by input or configuration, reported without a traceback by the CLIs."""


class DatasetError(MedsegError):
    """One or more problems in a dataset, all reported at once."""

    def __init__(self, problems: list[str], dataset: str = "dataset"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {dataset}:\n{lines}")


class ConfigError(MedsegError):
    """An impossible or inconsistent configuration."""
