"""Output locations: checked before the long work starts, never overwritten unless asked, and a
result that cannot be written where asked is kept somewhere safe instead of being lost."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable


class OutputError(ValueError):
    """An output location that cannot be used; the message names it, the problem and the fix."""


def check_folder(folder: str | Path, what: str = "output") -> Path:
    """``folder`` exists (created if need be) and a file can be written into it."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder; give a folder for the {what}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"{folder}: cannot write the {what} there ({e.strerror or e}); choose another folder") from e
    return folder


def check_file(path: str | Path, *, overwrite: bool = False, suffix: str | None = None,
               what: str = "output") -> Path:
    """``path`` can be written: the right kind of name, not a folder, its folder writable, and (unless
    ``overwrite``) no file there yet."""
    path = Path(path).expanduser()
    if suffix and path.suffix != suffix:
        raise OutputError(f"{path}: the {what} must be a {suffix} file; name it e.g. {path.with_suffix(suffix).name}")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the {what}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists already; choose another name, or pass --overwrite to replace it")
    check_folder(path.parent, what)
    return path


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Refuse to replace files a run would write (unless ``overwrite``), naming the first few."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise OutputError(f"{len(existing)} output file(s) exist already ({names}); choose another folder or seed, "
                          "or pass --overwrite to replace them")


def write_or_rescue(write: Callable[[Path], Path], path: Path, what: str) -> Path:
    """``write(path)``; if that fails (disk full, folder gone read-only), ``write`` into the temporary
    folder instead and raise an OutputError that says where the result is."""
    try:
        return write(path)
    except OSError as e:
        rescue = Path(tempfile.gettempdir()) / f"svare-rescued-{time.strftime('%Y%m%d-%H%M%S')}-{path.name}"
        write(rescue)
        raise OutputError(f"could not write the {what} to {path} ({e.strerror or e}); it is kept at {rescue}") from e
