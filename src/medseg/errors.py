"""Errors users see: each names the file and the problem."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of errors caused by input or configuration, reported without a traceback by the CLIs, which
    exit with ``exit_code``."""

    exit_code = 2


class DatasetError(MedsegError):
    """One or more problems in a dataset, all reported at once."""

    def __init__(self, problems: list[str], dataset: str = "dataset"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {dataset}:\n{lines}")


class ConfigError(MedsegError):
    """An impossible or inconsistent configuration."""


class VolumeError(MedsegError, ValueError):
    """An image file that cannot be read, or is refused (damaged, truncated, too large, wrong shape or values)."""


class CheckpointError(MedsegError):
    """A checkpoint that cannot be loaded (truncated, not a checkpoint, or holding code rather than data)."""


class WriteError(MedsegError, OSError):
    """An output could not be written (disk full, permissions); whatever was there before is kept."""


class NonFiniteError(MedsegError, FloatingPointError):
    """Training produced a NaN or infinite loss or weights; the last good checkpoint is kept."""


class LockedError(MedsegError):
    """Another medseg process is using the same output folder."""


class TrainingInterrupted(MedsegError):
    """Training was stopped by SIGTERM before it finished; its last checkpoint is kept for resuming. Exits with
    the status a process killed by SIGTERM has (128 + 15), so schedulers and ``&&`` chains see an unfinished
    job."""

    exit_code = 143
