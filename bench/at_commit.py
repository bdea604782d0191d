"""A module of this repository as it was at an older commit, for benchmarks that compare against it."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def module_at(commit: str, path: str, moved: dict[str, str] | None = None) -> ModuleType:
    """The file `path` (relative to the repository root) at `commit`, imported from git under its stem.
    `moved`: package modules it imports that have moved since (old name -> today's), found under the old
    name while it is imported (a file from before the package's layers imports e.g. alterrec_dist.mining)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / Path(path).name
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"{Path(path).stem}_at_{commit}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    aliases = {old: importlib.import_module(new) for old, new in (moved or {}).items() if old not in sys.modules}
    sys.modules.update(aliases)
    try:
        spec.loader.exec_module(module)
    finally:
        for old in aliases:
            del sys.modules[old]
    return module
