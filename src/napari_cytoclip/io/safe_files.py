"""Safe writing: temp file in the same folder, then an atomic rename; names sanitised.

Every folder this tool writes carries a marker file, :data:`MARKER`, listing the files it wrote
with their SHA-256. ``--overwrite`` replaces a folder only when every entry in it is such a file,
unchanged; an export folder's files are replaced only when the marker lists them, unchanged.
Anything else (the user's files, an edited result, a symlink) is never replaced or deleted.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from napari_cytoclip.errors import CytoclipError, OutputError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MARKER = "written-by-napari-cytoclip.json"
MARKER_FORMAT = "napari-cytoclip-files"
MARKER_MAX_BYTES = 64 << 20
_SHOWN = 3  # foreign entries named in an error


def now_iso() -> str:
    """The current time, ISO 8601 in UTC (for provenance and logs)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


# ---------------------------------------------------------------------------------------------- modes
def user_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``); 0o022 where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def share_mode(path: Path, folder: bool = False) -> None:
    """Give a temp file (0600) or folder (0700) the mode a plain ``open``/``mkdir`` would: the user's umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~user_umask())


# ---------------------------------------------------------------------------------------------- safe reads
def read_regular_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file; a FIFO, device or folder is refused without blocking on it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CytoclipError(path, f"cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CytoclipError(path, "is not a regular file")
        if limit is not None and info.st_size > limit:
            raise CytoclipError(path, f"is too large ({info.st_size} bytes)")
        return f.read()


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a regular file's content."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- markers
def read_marker(folder: str | Path) -> dict | None:
    """The marker of ``folder`` (``{"kind", "files", "folders"}``), or None when absent or not valid."""
    path = Path(folder) / MARKER
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        doc = json.loads(read_regular_bytes(path, MARKER_MAX_BYTES))
    except (OSError, CytoclipError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT:
        return None
    files, folders = doc.get("files"), doc.get("folders", [])
    if not isinstance(files, dict) or not isinstance(folders, list) or not isinstance(doc.get("kind"), str):
        return None
    if not all(isinstance(v, list) and all(isinstance(d, str) for d in v) for v in files.values()):
        return None
    return {"kind": doc["kind"], "files": files, "folders": [f for f in folders if isinstance(f, str)]}


def write_marker(folder: str | Path, kind: str, files: dict[str, list[str]], folders: Iterable[str] = ()) -> None:
    """Write ``folder``'s marker: ``files`` maps each relative path we wrote to its accepted digests."""
    from napari_cytoclip import __version__

    doc = {"format": MARKER_FORMAT, "kind": kind, "software": f"napari-cytoclip {__version__}",
           "note": "napari-cytoclip replaces only the files listed here, and only while their content is unchanged",
           "files": {k: files[k] for k in sorted(files)}, "folders": sorted(folders)}
    atomic_write_text(Path(folder) / MARKER, json.dumps(doc, indent=1))


def mark_folder(folder: str | Path, kind: str) -> None:
    """Record every file now under ``folder`` in its marker; a subfolder with its own marker is listed as such."""
    folder = Path(folder)
    files: dict[str, list[str]] = {}
    folders: list[str] = []

    def walk(sub: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(sub), key=lambda e: e.name):
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if (Path(entry.path) / MARKER).is_file():
                    folders.append(rel)
                else:
                    walk(Path(entry.path), rel + "/")
            elif entry.is_file(follow_symlinks=False) and rel != MARKER:
                files[rel] = [file_digest(entry.path)]

    walk(folder, "")
    write_marker(folder, kind, files, folders)


def _owned_file(path: Path, digests: list[str] | None) -> bool:
    try:
        return digests is not None and stat.S_ISREG(path.lstat().st_mode) and file_digest(path) in digests
    except OSError:
        return False


def foreign_entries(folder: str | Path, kind: str | None = None) -> list[str]:
    """Entries of ``folder`` that napari-cytoclip did not write or that changed since (relative paths).

    Empty when every entry is a file its marker lists, unchanged (or a subfolder with its own
    marker, checked the same way); everything when there is no marker (or one of another ``kind``).
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None and kind is not None and marker["kind"] != kind:
        marker = None
    files = marker["files"] if marker else {}
    nested = set(marker["folders"]) if marker else set()
    out: list[str] = []

    def walk(sub: Path, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(sub), key=lambda e: e.name)
        except OSError:
            out.append(prefix or ".")
            return
        for entry in entries:
            rel = prefix + entry.name
            path = Path(entry.path)
            if rel == MARKER and marker is not None:
                continue
            if entry.is_dir(follow_symlinks=False):  # an empty folder holds nothing to lose
                if rel in nested:
                    out.extend(f"{rel}/{r}" for r in foreign_entries(path))
                else:
                    walk(path, rel + "/")
            elif not _owned_file(path, files.get(rel)):
                out.append(rel)

    walk(folder, "")
    return out


def _names(entries: list[str]) -> str:
    shown = ", ".join(entries[:_SHOWN])
    return shown + (f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else "")


def check_output_folder(folder: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                        kind: str | None = None) -> None:
    """Refuse a results ``folder`` that may not be (re)placed: one clear :class:`OutputError`.

    A new folder is fine. An existing one needs ``overwrite``, and is replaced only when it is
    empty or napari-cytoclip wrote everything in it (its marker lists every file, unchanged). A
    symlink, a file, or a folder that is or holds one of the ``inputs`` is never replaced.
    """
    folder = Path(folder)
    for item in inputs:
        item = Path(item)
        with contextlib.suppress(OSError, RuntimeError):
            where, res = item.resolve(), folder.resolve()
            if where == res or res in where.parents:
                raise OutputError(folder, f"holds the input {item}; choose another output folder")
    if not os.path.lexists(folder):
        return
    if folder.is_symlink():
        raise OutputError(folder, "already exists as a symbolic link; napari-cytoclip never replaces it, "
                                  "choose another output folder")
    if not folder.is_dir():
        raise OutputError(folder, "already exists and is not a folder")
    foreign = foreign_entries(folder, kind)
    if foreign:
        what = (f"holds {_names(foreign)}, not written by napari-cytoclip (or changed since)"
                if read_marker(folder) is not None else
                f"was not written by napari-cytoclip (no {MARKER}; it holds {_names(foreign)})")
        raise OutputError(folder, f"already exists and {what}; --overwrite replaces only results folders "
                                  "napari-cytoclip wrote: choose another output folder")
    if not overwrite:
        raise OutputError(folder, "already exists (use --overwrite to replace it)")


class _Recorder:
    """Records, in ``folder``'s marker, each atomic write of one of ``names`` (paths relative to ``folder``)."""

    def __init__(self, folder: Path, kind: str, names: Iterable[str]):
        self.folder, self.kind, self.names = folder, kind, set(names)
        marker = read_marker(folder)
        self.files = dict(marker["files"]) if marker and marker["kind"] == kind else {}

    def rel(self, path: Path) -> str | None:
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.folder)).as_posix()
        except ValueError:
            return None
        return rel if rel in self.names else None

    def before(self, tmp: Path, path: Path) -> str | None:
        """``tmp`` is complete and about to replace ``path``: accept both contents until it has."""
        rel = self.rel(path)
        if rel is not None:
            digest = file_digest(tmp)
            self.files[rel] = [*self.files.get(rel, []), digest]
            self.save()
            return digest
        return None

    def after(self, path: Path, digest: str | None) -> None:
        rel = self.rel(path)
        if rel is not None and digest is not None:
            self.files[rel] = [digest]
            self.save()

    def save(self) -> None:
        token = _RECORDER.set(None)
        try:
            write_marker(self.folder, self.kind, self.files)
        finally:
            _RECORDER.reset(token)


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("cytoclip_recorder", default=None)


@contextlib.contextmanager
def recording(folder: str | Path, kind: str, names: Iterable[str]) -> Iterator[None]:
    """While active (in this context), atomic writes of ``names`` under ``folder`` are recorded in its marker.

    The marker is written first (so a folder we began is recognisably ours), and each file's new
    digest is added before the file is renamed into place: an interruption never makes our own
    file look foreign.
    """
    rec = _Recorder(Path(folder), kind, names)
    rec.save()
    token = _RECORDER.set(rec)
    try:
        yield
    finally:
        _RECORDER.reset(token)


def owned(folder: str | Path, rel: str, kind: str) -> bool:
    """Whether ``folder/rel`` is a file that ``folder``'s marker (of ``kind``) lists, unchanged."""
    marker = read_marker(folder)
    return marker is not None and marker["kind"] == kind and _owned_file(Path(folder) / rel, marker["files"].get(rel))


# ---------------------------------------------------------------------------------------------- writing
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
        share_mode(tmp)
        yield tmp
        recorder = _RECORDER.get()
        digest = recorder.before(tmp, path) if recorder is not None else None
        os.replace(tmp, path)
        if recorder is not None:
            recorder.after(path, digest)
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


def temp_folder_beside(folder: Path) -> Path:
    """A new hidden temp folder next to ``folder`` (same file system, the user's umask), for building a
    folder that is renamed into place when complete; :class:`OutputError` when the parent is not writable."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        share_mode(tmp, folder=True)
    except OSError as exc:
        raise OutputError(folder.parent, f"not writable ({exc.strerror or exc})") from None
    return tmp


@contextlib.contextmanager
def new_output_folder(folder: str | Path, overwrite: bool = False, kind: str = "results") -> Iterator[Path]:
    """Build a results folder in a temp folder and move it into place when complete, with its marker.

    An existing folder is replaced only with ``overwrite``, only when it is empty or napari-cytoclip
    wrote all of it (:func:`check_output_folder`, checked again before the swap), and only after success.
    """
    folder = Path(folder)
    check_output_folder(folder, overwrite)
    tmp = temp_folder_beside(folder)
    try:
        yield tmp
        mark_folder(tmp, kind)
        check_output_folder(folder, overwrite)
        if os.path.lexists(folder):
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old, folder)  # put the earlier results back where the user left them
                raise
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


def write_between_markers(path: str | Path, tag: str, text: str) -> None:
    """Replace what lies between ``<!-- tag:begin -->`` and ``<!-- tag:end -->`` in a text file (the
    markers are appended when absent); used by the scripts that generate the documentation's figures."""
    path = Path(path)
    doc = path.read_text(encoding="utf-8")
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    if begin not in doc or end not in doc:
        doc = doc.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = text.strip("\n")  # blank lines go, a first line's indentation (a command block) stays
    atomic_write_text(path, f"{head}{begin}\n{body}\n{end}{tail}")
