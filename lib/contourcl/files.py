"""Files replaced whole, and the fault points that test it.

A file that matters (a label, its info, a model, a history) is written to a temporary file in the
same folder, flushed to the disk (``fsync``), and renamed over the old one (``os.replace``, atomic
on POSIX): a reader, or a server restarted after ``kill -9`` or a power cut, sees the old content
or the new one, never half of either. A write that fails (a full or read-only disk) removes its
temporary file and leaves the old file as it was; the ``OSError`` is raised for the caller to
answer (:func:`contourcl.serving.errors.http_errors` makes it a 507 or 503).

:func:`fault` marks the places where a crash or a full disk would hurt most. It does nothing unless
the environment variable ``CONTOURCL_FAULTS`` names that place; the fault tests set it to kill the
server (``kill -9``, the signal no code can catch) or fail the write exactly there. A test that
changes the faults of a running server names a file in ``CONTOURCL_FAULTS_FILE`` instead: it is
read at every fault point, so the test switches faults on and off without restarting the server.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

#: ``CONTOURCL_FAULTS="name=action,..."``; actions: ``kill`` (SIGKILL this process), ``enospc``,
#: ``erofs``, ``eio`` (raise that ``OSError``)
FAULTS_ENV = "CONTOURCL_FAULTS"
#: a file holding the same ``name=action,...`` text, read at every fault point (tests of a running server)
FAULTS_FILE_ENV = "CONTOURCL_FAULTS_FILE"
_ERRNOS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eio": errno.EIO}


def fault(name: str) -> None:
    """A fault point: kill this process or raise an ``OSError`` here if ``CONTOURCL_FAULTS`` (or the
    file named by ``CONTOURCL_FAULTS_FILE``) asks to."""
    spec = os.environ.get(FAULTS_ENV) or ""
    spec_file = os.environ.get(FAULTS_FILE_ENV)
    if spec_file:
        try:
            spec = ",".join(s for s in (spec, Path(spec_file).read_text().strip()) if s)
        except OSError:
            pass
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


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`temporary_name`'s."""
    parts = name.split(".")
    return name.startswith(".") and name.endswith(".tmp") and len(parts) >= 5 and parts[-3].isdigit() and parts[-2].isdigit()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the :func:`temporary_name` files in ``folder`` (not below it) whose writer process is
    gone (killed mid-write); returns what was removed. A live process's files are left alone."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if is_temporary(name) and not _alive(int(name.split(".")[-3])):
            path = Path(folder) / name
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def write_temporary(path: str | Path, write) -> Path:
    """A :func:`temporary_name` next to ``path`` holding what ``write(file)`` wrote, synced to the
    disk: ready to be renamed over ``path``. Nothing is left behind if the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _replace_with(path: Path, write, point: str | None) -> Path:
    """Write a temporary file next to ``path`` with ``write(file)``, sync it and rename it over ``path``."""
    tmp = write_temporary(path, write)
    try:
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


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
