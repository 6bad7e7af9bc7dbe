"""Shared by the entry points: where the configs are, custom resolvers, clean errors."""

from __future__ import annotations

import functools
import logging
import sys
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

from medseg.errors import MedsegError

# The Hydra configs ship inside the package (src/medseg/configs, package data in wheels), so an editable install
# and a wheel find them alike. A real directory: every entry point's hydra.main(config_path=CONFIG_DIR), and
# initialize_config_dir(CONFIG_DIR) in tests and scripts, read the same files.
CONFIG_DIR = str(Path(str(files("medseg") / "configs")).resolve())


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver("basename", lambda p: Path(str(p).rstrip("/")).name)
    if not OmegaConf.has_resolver("config_suffix"):
        # runs of other configurations than the default 3d_fullres get their own run directory
        OmegaConf.register_new_resolver("config_suffix", lambda c: "" if c == "3d_fullres" else f"__{c}")
    if not OmegaConf.has_resolver("basename_noext"):
        OmegaConf.register_new_resolver("basename_noext", lambda p: Path(str(p)).name.split(".")[0])


_register_resolvers()


def _log_to_files(logger: logging.Logger, level: int, message: str) -> None:
    """Hand a record only to the file handlers it would reach (the log file Hydra's job logging writes), not
    to the console ones: the console gets the message once, from the caller."""
    record = logger.makeRecord(logger.name, level, __file__, 0, "%s", (message,), None)
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        current = current.parent if current.propagate else None


def friendly_errors(fn):
    """Input and configuration errors end the program with their message, not a traceback: one
    ``medseg: error: ...`` line on stderr (the job's log file gets the same message as a log record)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedsegError as e:
            _log_to_files(logging.getLogger("medseg"), logging.ERROR, str(e))
            print(f"medseg: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapper


class _NoLightningTips(logging.Filter):
    """Lightning's advertisements for its cloud services ("💡 Tip: ... try installing [litlogger] / [litmodels]")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


def quiet_lightning() -> None:
    """Each Lightning message once, and none of its cloud-service tips. Call once Lightning is imported.

    Importing ``lightning`` gives its logger a stderr handler of its own ("INFO: ...") while records still
    propagate to the root logger, where Hydra's job logging prints them again (and writes the job's log file).
    Where the root logger has handlers, Lightning's own console handlers are removed, so its records take the
    root's way only: once on the console, and in the log file."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # rank_zero_info logs through these
        if not any(isinstance(f, _NoLightningTips) for f in logger.filters):
            logger.addFilter(_NoLightningTips())
    if not logging.getLogger().handlers:
        return  # no one else would print Lightning's messages
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handlers, not file handlers
                logger.removeHandler(handler)
        logger.propagate = True
