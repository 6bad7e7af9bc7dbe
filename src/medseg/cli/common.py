"""Shared by the entry points: where the configs are, custom resolvers, clean errors."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from medseg.errors import MedsegError

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver("basename", lambda p: Path(str(p).rstrip("/")).name)
    if not OmegaConf.has_resolver("config_suffix"):
        # runs of other configurations than the default 3d_fullres get their own run directory
        OmegaConf.register_new_resolver("config_suffix", lambda c: "" if c == "3d_fullres" else f"__{c}")
    if not OmegaConf.has_resolver("basename_noext"):
        OmegaConf.register_new_resolver("basename_noext", lambda p: Path(str(p)).name.split(".")[0])


_register_resolvers()


def friendly_errors(fn):
    """Input and configuration errors end the program with their message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedsegError as e:
            logging.getLogger("medseg").error("%s", e)
            print(f"medseg: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapper
