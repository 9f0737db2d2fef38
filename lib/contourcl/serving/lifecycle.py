"""Lifecycle of the processes MONAI Label starts for us: they die with the server, one trainer per model.

MONAI Label runs training (and scoring) in a subprocess, ``python -m monailabel.interfaces.utils.app
-m train ...``, started from a thread-pool thread of the server. Killing the server (``kill -9``)
does not stop that subprocess: it keeps training, publishes a model for a server that is gone,
and a restarted server happily starts a second trainer of the same model next to it.

- :func:`die_with_parent` ties a task subprocess to the server: Linux's parent-death signal
  (``prctl(PR_SET_PDEATHSIG)``; it fires when the parent *thread* exits) and a daemon watchdog
  thread that notices when ``os.getppid()`` is no longer the server's pid. The task leads a process
  group of its own, so either way one ``killpg(SIGKILL)`` ends it and every child it started
  (DataLoader workers) at once: nothing to wait for, nothing for the two paths to race over.
- :class:`TrainLock` is an exclusive ``flock`` on ``<model_dir>/history/<model>/train.lock`` that
  holds the trainer's pid. The kernel releases it when the holder dies, however it dies; a second
  trainer of the same model fails at once with an error that names the pid holding it.

The server's pid travels to the subprocess in ``CONTOURCL_SERVER_PID`` (set by
:func:`note_server_process` in the server): a subprocess whose server died before it got to
:func:`die_with_parent` sees that its parent is no longer that pid and exits instead of training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: environment variable naming the server's pid, inherited by MONAI Label's task subprocesses
SERVER_PID_ENV = "CONTOURCL_SERVER_PID"
#: the module MONAI Label runs its train/scoring/batch-infer subprocesses with
TASK_MODULE = "monailabel.interfaces.utils.app"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_watchdog: ParentWatchdog | None = None


class TrainerBusyError(RuntimeError):
    """Another trainer (or scoring run) of the same model holds its lock."""


def in_task_subprocess() -> bool:
    """True in MONAI Label's task subprocess (``python -m monailabel.interfaces.utils.app``).

    False in the server itself, where a ``run_sync`` request runs a task in-process: tying the
    server's life to *its* parent (a shell, a service manager) would be wrong.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == TASK_MODULE


def note_server_process() -> None:
    """In the server process: publish its pid for the task subprocesses it will start."""
    if not in_task_subprocess():
        os.environ[SERVER_PID_ENV] = str(os.getpid())


def expected_parent() -> int:
    """The pid this process's parent should have: the server's (``CONTOURCL_SERVER_PID``) or, when
    that is not set, the parent's pid now."""
    value = os.environ.get(SERVER_PID_ENV, "")
    return int(value) if value.isdigit() else os.getppid()


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when the thread that started it exits.

    Returns False where that is not available (not Linux, no libc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError) as err:
        logger.warning("prctl(PR_SET_PDEATHSIG) is not available: %s", err)
        return False
    return True


def stop_children(timeout: float = 3.0) -> int:
    """Terminate this process's children (recursively), kill those still alive after
    ``timeout`` seconds, and reap them. Returns how many there were."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(children)


def _say(why: str) -> None:
    try:
        sys.stderr.write(f"contourcl: {why}: stopping this task process (pid {os.getpid()}) and its children\n")
        sys.stderr.flush()
    except Exception:  # the server's end of the pipe is gone: nothing to tell
        pass


def _exit_now(why: str, code: int = 1) -> None:
    """End this task and its children now: SIGKILL to the process group it leads (see
    :func:`die_with_parent`); a process that leads no group stops its children one by one."""
    _say(why)
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)  # this process and every child in its group, at once
        stop_children()
    finally:
        os._exit(code)


class ParentWatchdog(threading.Thread):
    """Daemon thread: exits the process (after stopping its children) as soon as
    ``os.getppid()`` differs from ``parent_pid``."""

    def __init__(self, parent_pid: int, interval: float = 0.5):
        super().__init__(name="contourcl-parent-watchdog", daemon=True)
        self.parent_pid = int(parent_pid)
        self.interval = float(interval)

    def run(self) -> None:
        while True:
            if os.getppid() != self.parent_pid:
                _exit_now(f"the server (pid {self.parent_pid}) is gone")
            time.sleep(self.interval)


def die_with_parent(parent_pid: int | None = None, interval: float = 0.5, use_prctl: bool = True) -> ParentWatchdog:
    """Make this process (and its children) end when its parent, the server, ends.

    ``parent_pid`` defaults to :func:`expected_parent`. If the parent is already gone the process
    exits at once. Safe to call more than once (one watchdog per process).
    """
    global _watchdog
    parent_pid = expected_parent() if parent_pid is None else int(parent_pid)
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # a process group of its own: its children join it, one killpg ends them all
    if use_prctl and set_parent_death_signal(signal.SIGTERM) and threading.current_thread() is threading.main_thread():
        # SIGTERM from the kernel (or from anyone): stop the children too, then exit
        signal.signal(signal.SIGTERM, lambda signum, frame: _exit_now("terminated (SIGTERM)", 128 + signal.SIGTERM))
    # checked after prctl: a parent that died before prctl would never send the signal
    if os.getppid() != parent_pid:  # no child started yet: just leave
        _say(f"the server (pid {parent_pid}) is gone before this task started")
        os._exit(1)
    if _watchdog is None or not _watchdog.is_alive() or _watchdog.parent_pid != parent_pid:
        _watchdog = ParentWatchdog(parent_pid, interval)
        _watchdog.start()
    return _watchdog


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TrainLock:
    """Exclusive lock of one model's training: ``flock`` on ``path``, which holds the holder's pid.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. The lock is released when the
    holding process exits or is killed (the kernel closes its file). A second attempt, from any
    process, raises :class:`TrainerBusyError` naming the pid in the file.
    """

    def __init__(self, path: str | Path, name: str = "this model", role: str = "trainer"):
        self.path = Path(path)
        self.name = name
        self.role = role
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid written in the lock file (whoever holds it now, or held it last)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def acquire(self) -> TrainLock:
        import fcntl

        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder()
            if pid is None:
                who = "another process (no pid written yet)"
            elif _pid_alive(pid):
                who = f"pid {pid}"
            else:
                who = f"a child of pid {pid} (pid {pid} itself is no longer running)"
            advice = f"; wait for it to finish, or stop it (kill {pid})" if pid else ""
            raise TrainerBusyError(f"another {self.role} of {self.name} is running: {self.path} is locked by {who}{advice}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def check(self) -> None:
        """Raise :class:`TrainerBusyError` if another process holds the lock (e.g. in the server,
        before it starts a training subprocess); otherwise take it and drop it at once."""
        if self._fd is None:
            self.acquire()
            self.release()

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no stale pid for the next reader
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TrainLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
