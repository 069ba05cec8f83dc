"""Write files and folders so that a half-written artifact never looks complete: write aside, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it over `target`, on error remove it.

    Works for a file or a folder written at the yielded path. The rename is atomic on one file system.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(target: Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(Path(target)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_npz(target: Path, **arrays: Any) -> None:
    """Write arrays as an .npz file at `target` (its name kept as given), atomically."""
    import numpy as np

    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_json(target: Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `target` atomically."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_atomic(src: Path, target: Path, ignore: tuple[str, ...] = ()) -> None:
    """Copy the file or folder `src` to `target` atomically (a folder without the names matching `ignore`)."""
    with atomic_path(Path(target)) as tmp:
        if Path(src).is_dir():
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*ignore))
        else:
            shutil.copy2(src, tmp)


def remove_stale_partials(folder: Path, name: str) -> None:
    """Remove the leftovers of an interrupted `atomic_path(folder / name)` (they are never complete)."""
    if folder.is_dir():
        for p in folder.glob(f".{name}.partial-*"):
            shutil.rmtree(p, ignore_errors=True)
