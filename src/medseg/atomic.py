"""Atomic file writes: write beside the target under a unique name, then rename over it.

A reader never sees a half-written file, a killed writer leaves only a hidden temp file, and two processes
writing the same target cannot collide on the temp name.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temp path next to ``path``; on success it replaces ``path``, on error it is removed.
    ``suffix`` keeps an extension some writers insist on (``.npz``, ``.nii.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_signature(paths) -> str:
    """Path, size and modification time of each file ('missing' for absent ones): what cache keys hash, so
    an edited or replaced input invalidates what was derived from it."""
    parts = []
    for p in paths:
        try:
            st = os.stat(p)
            parts.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{p}|missing")
    return "\n".join(parts)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))
