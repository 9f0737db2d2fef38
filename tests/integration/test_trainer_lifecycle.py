"""A trainer dies with the server, and only one trainer of a model runs at a time.

Tiny helper scripts run as real processes (``sys.executable``); they import only
``contourcl.serving.lifecycle`` (standard library and psutil), so each starts in a fraction of a
second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from contourcl.serving.lifecycle import SERVER_PID_ENV, TrainerBusyError, TrainLock, in_task_subprocess

pytestmark = pytest.mark.timeout(60)


def _env() -> dict:
    env = dict(os.environ)
    env.pop(SERVER_PID_ENV, None)  # the helpers name their parent explicitly
    return env


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 15) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"helper exited with {proc.returncode} before printing {prefix!r}: {proc.stderr.read()}")
    raise AssertionError(f"helper did not print {prefix!r} within {timeout} s")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if all(_gone(p) for p in pids):
            return time.time() - t0
        time.sleep(0.1)
    left = [p for p in pids if not _gone(p)]
    raise AssertionError(f"still running after {timeout} s: {left}\n" + subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:20,cmd", "-p", ",".join(map(str, left))], capture_output=True, text=True).stdout)


def _kill_quietly(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


HOLDER = """
    import sys, time
    from contourcl.serving.lifecycle import TrainLock
    TrainLock(sys.argv[1], "the oar model").acquire()
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_trainer_fails_naming_the_pid_and_the_lock_is_freed_when_the_holder_is_killed(tmp_path):
    lock_path = tmp_path / "history" / "oar" / "train.lock"
    holder = subprocess.Popen([sys.executable, str(_script(tmp_path, "holder.py", HOLDER)), str(lock_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for_line(holder, "locked")
        assert lock_path.read_text().strip() == str(holder.pid)

        # another process (this one) cannot take it, and is told who holds it
        with pytest.raises(TrainerBusyError, match=rf"another trainer of the oar model is running: .*locked by pid {holder.pid}"):
            TrainLock(lock_path, "the oar model").acquire()
        with pytest.raises(TrainerBusyError, match=rf"pid {holder.pid}"):
            TrainLock(lock_path, "the oar model").check()  # the server's quick look before it starts one
        # nor can a second helper process
        second = subprocess.run([sys.executable, str(_script(tmp_path, "holder.py", HOLDER)), str(lock_path)],
                                capture_output=True, text=True, env=_env(), timeout=20)
        assert second.returncode != 0 and f"locked by pid {holder.pid}" in second.stderr

        holder.kill()  # SIGKILL: no clean-up code runs; the kernel drops the lock
        holder.wait(10)
        TrainLock(lock_path, "the oar model").check()  # free
        with TrainLock(lock_path, "the oar model") as lock:
            assert lock_path.read_text().strip() == str(os.getpid())
            assert lock.holder() == os.getpid()
        assert lock_path.read_text() == ""  # released: no stale pid left behind
        with TrainLock(lock_path, "the oar model"):  # and it can be taken again
            pass
    finally:
        _kill_quietly([holder.pid])
        holder.wait(10)


# The "server": starts the task process from a worker thread (as MONAI Label does, from its
# thread pool), prints the pids, then waits to be killed.
SERVER = """
    import subprocess, sys, threading, time
    def start():  # like MONAI Label's _task_func: the thread lives while the task runs
        proc = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
        print("task", proc.pid, flush=True)
        proc.wait()
    threading.Thread(target=start, daemon=True).start()
    time.sleep(60)
"""

# The "trainer": ties itself to the server, starts a child of its own (a DataLoader worker, say),
# writes both pids and trains forever.
TASK = """
    import os, subprocess, sys, time
    from contourcl.serving.lifecycle import die_with_parent
    die_with_parent(os.getppid(), interval=0.2, use_prctl=sys.argv[1] == "prctl")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(os.path.dirname(__file__), "pids.%d" % os.getpid()), "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(0.05)
"""


@pytest.mark.parametrize("mode", ["watchdog-only", "prctl"])
def test_the_task_process_and_its_children_die_within_seconds_of_the_server(tmp_path, mode):
    task_script = _script(tmp_path, "task.py", TASK)
    server = subprocess.Popen([sys.executable, str(_script(tmp_path, "server.py", SERVER)), str(task_script), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    pids = [server.pid]
    try:
        task_pid = int(_wait_for_line(server, "task").split()[1])
        pids.append(task_pid)
        pid_file = tmp_path / f"pids.{task_pid}"
        deadline = time.time() + 15
        while not (pid_file.is_file() and pid_file.read_text()):
            assert time.time() < deadline, "the task process did not start its child"
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        pids.append(child_pid)
        time.sleep(0.5)
        assert not _gone(task_pid) and not _gone(child_pid), "the task runs while the server lives"

        server.kill()  # kill -9 of the server
        server.wait(10)
        elapsed = _wait_gone([task_pid, child_pid], timeout=5)
        assert elapsed < 5
    finally:
        _kill_quietly(pids)
        server.wait(10)


def test_a_task_whose_server_is_already_gone_exits_at_once(tmp_path):
    script = _script(tmp_path, "late.py", """
        import os, time
        from contourcl.serving.lifecycle import die_with_parent
        die_with_parent(os.getppid() + 100000)  # not our parent: the server died before we started
        time.sleep(60)
    """)
    t0 = time.time()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=20)
    assert result.returncode == 1 and "is gone before this task started" in result.stderr
    assert time.time() - t0 < 10


def test_the_server_itself_is_not_a_task_subprocess():
    assert not in_task_subprocess()  # pytest's main module: die_with_parent stays off in-process
