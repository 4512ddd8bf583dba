"""Writing outputs so that nothing is lost or half-written: one temp-file + rename helper for every file.

A failed write (disk full, an unwritable format, an interruption) leaves the old file, if any, as it was and no
temporary file behind; a successful one replaces the destination in one `os.replace` (atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o644  # images, masks, inversions and JSON alike: readable by others, as an ordinary `open` makes them


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int = FILE_MODE) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it onto `path`.

    The temporary file keeps `path`'s suffix, so writers that pick a format from the name (PIL, safetensors)
    see the real one. The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write` for a UTF-8 text file (JSON records, summaries)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
