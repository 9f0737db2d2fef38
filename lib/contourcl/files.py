"""Files replaced whole, and the fault points that test it.

A file that matters (a label, its info, a model, a history) is written to a temporary file in the
same folder, flushed to the disk (``fsync``), and renamed over the old one (``os.replace``, atomic
on POSIX): a reader, or a server restarted after ``kill -9`` or a power cut, sees the old content
or the new one, never half of either. A write that fails (a full or read-only disk) removes its
temporary file and leaves the old file as it was; the ``OSError`` is raised for the caller to
answer (:func:`contourcl.serving.errors.http_errors` makes it a 507 or 503).

:func:`fault` marks the places where a crash or a full disk would hurt most. It does nothing unless
the environment variable ``CONTOURCL_FAULTS`` names that place; the fault tests set it to kill the
server (``kill -9``, the signal no code can catch) or fail the write exactly there.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

#: ``CONTOURCL_FAULTS="name=action,..."``; actions: ``kill`` (SIGKILL this process), ``enospc``,
#: ``erofs``, ``eio`` (raise that ``OSError``)
FAULTS_ENV = "CONTOURCL_FAULTS"
_ERRNOS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eio": errno.EIO}


def fault(name: str) -> None:
    """A fault point: kill this process or raise an ``OSError`` here if ``CONTOURCL_FAULTS`` asks to."""
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, action = item.strip().partition("=")
        if point != name:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # the signal is delivered before this returns
        if action in _ERRNOS:
            code = _ERRNOS[action]
            raise OSError(code, f"{os.strerror(code)} (fault point {name})")


def temporary_name(path: str | Path) -> Path:
    """A hidden name next to ``path`` that no other writer (process or thread) uses."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry, not only the file's data)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _replace_with(path: Path, write, point: str | None) -> Path:
    """Write a temporary file next to ``path`` with ``write(file)``, sync it and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        if point:
            fault(point)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, point: str | None = None) -> Path:
    """Replace ``path`` with ``data`` whole (see the module docstring); ``point``: the
    :func:`fault` point just before the rename."""
    return _replace_with(Path(path), lambda out: out.write(data), point)


def atomic_write_text(path: str | Path, text: str, point: str | None = None) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) whole; the folder is created if needed."""
    return atomic_write_bytes(path, text.encode("utf-8"), point)


def atomic_copy(src: str | Path, dst: str | Path, point: str | None = None) -> Path:
    """Replace ``dst`` with a copy of ``src`` whole."""
    with open(src, "rb") as source:
        return _replace_with(Path(dst), lambda out: shutil.copyfileobj(source, out, 1024 * 1024), point)
