"""Safe writing: temp file in the same folder, then an atomic rename; names sanitised."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import CytoclipError, OutputError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug of user text: no separators, no dot-files, never empty."""
    slug = _UNSAFE.sub("_", text).strip("._")[:max_len]
    return slug or "unnamed"


def inside(folder: Path, path: Path) -> Path:
    """``path`` resolved, refused when it (or a symlink on the way) leads outside ``folder``."""
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise OutputError(path, f"refusing to write outside {folder}")
    return resolved


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path.parent, f"cannot create the folder ({exc.strerror})") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(path, f"could not be written ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result into place."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


@contextlib.contextmanager
def new_output_folder(folder: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a results folder in a temp folder and move it into place when complete.

    An existing folder is kept unless ``overwrite``; then it is replaced only after success.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputError(folder, "already exists (use --overwrite to replace it)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise OutputError(folder.parent, f"not writable ({exc.strerror})") from None
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(folder, f"could not be written ({exc.strerror or exc})") from None
    except CytoclipError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _renamed(exc, tmp, folder) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _renamed(exc: CytoclipError, tmp: Path, folder: Path) -> CytoclipError:
    """``exc`` naming the results ``folder`` (and the file in it) where it named the temp folder ``tmp``."""
    if exc.source is None:
        return exc
    try:
        rel = Path(exc.source).relative_to(tmp)
    except ValueError:
        return exc
    return type(exc)(folder, f"{rel.as_posix()}: {exc.problem}" if rel.parts else exc.problem)
