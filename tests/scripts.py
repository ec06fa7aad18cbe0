"""Loading a script of the repository's benchmarks/ or tools/ folders (not packages) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(folder: str, name: str) -> ModuleType:
    """``ROOT/folder/name.py`` as module ``name``, with its folder on ``sys.path`` while it loads (for
    its imports of the scripts beside it) and the module in ``sys.modules`` (dataclasses look their
    module up there)."""
    where = str(ROOT / folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, where)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(where)
    return module
