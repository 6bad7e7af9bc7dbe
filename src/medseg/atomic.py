"""Atomic file writes: write beside the target under a unique name, then rename over it.

A reader never sees a half-written file, a killed writer leaves only a hidden temp file, and two processes
writing the same target cannot collide on the temp name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np


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


# --- strict JSON ----------------------------------------------------------------------------------------------
# Every JSON file medseg writes is strict JSON (RFC 8259). Python would write a missing number (HD95 of a class
# never predicted, a mean over no cases) as a bare NaN, which jq, JavaScript and Go refuse: it is written as null
# instead, and allow_nan=False makes any value that slipped through fail loudly rather than spoil the file.
# Readers that compute with such a field turn null back into NaN with ``number``.


def json_safe(obj):
    """``obj`` with NaN and +-Infinity as None, numpy scalars and arrays as Python numbers and lists, tuples as
    lists: recursively through dicts, lists and tuples. Other objects are returned unchanged."""
    if isinstance(obj, dict):
        return {(k.item() if isinstance(k, np.generic) else k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    return obj


def dumps_json(obj, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (see json_safe); raises ValueError rather than write NaN or Infinity."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """Atomically write ``obj`` as strict JSON: NaN and Infinity become null."""
    write_text(path, dumps_json(obj, indent=indent))


def number(value) -> float:
    """A number read back from medseg's JSON: null (a value that does not exist) is NaN again."""
    return math.nan if value is None else float(value)
