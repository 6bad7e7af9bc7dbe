"""Imports point only downwards between stage folders (README's Layout): a stage may import the shared modules
at the top of the package and the stages before it, never a later one."""

from __future__ import annotations

import ast
from pathlib import Path

import medseg

ORDER = ["shared", "datasets", "planning", "preprocessing", "loading", "models", "losses", "inference", "evaluation",
         "training", "cli"]
PACKAGE = Path(medseg.__file__).parent


def _stage(module: str) -> str:
    if module == "medseg.__init__":  # the package's public face (``medseg.Segmenter``, imported lazily): a top
        return "cli"                 # entry point like the command-line tools, above every stage
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else "shared"


def _imports():
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("medseg", *path.relative_to(PACKAGE).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medseg"):
                targets = [node.module] if node.module != "medseg" else [f"medseg.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("medseg")]
            else:
                continue
            for target in targets:
                yield module, target


def test_every_stage_folder_is_known():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(ORDER), f"add {sorted(folders - set(ORDER))} to the stage order in README and here"


def test_imports_point_only_downwards():
    upward = [f"{a} -> {b}" for a, b in _imports() if ORDER.index(_stage(b)) > ORDER.index(_stage(a))]
    assert not upward, "imports against the stage order:\n" + "\n".join(upward)
