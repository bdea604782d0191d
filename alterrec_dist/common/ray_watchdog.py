"""A watchdog that tears down the private local Ray of a driver that dies without `ray.shutdown()`.

Measured with Ray 2.60: after a SIGKILL of a driver that started a local Ray (`ray.init(address=
"local")`), the GCS, raylet, dashboard, log monitor and workers go, but the raylet's two agents
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) stay, reparented to init, and ignore SIGTERM.

`start(driver_pid)` launches `python -m alterrec_dist.common.ray_watchdog` in its own session (a Ctrl-C or
a kill of the driver's process group does not reach it), connected by a pipe whose write end only
the driver holds. While the driver lives, the watchdog records the driver's descendants (pid and
start time, so a reused pid is never taken for one of them) once a second. When the pipe closes
(the driver exited, however it died), it sends SIGTERM to every recorded process still alive and
to their descendants, then SIGKILL to those left after a grace period, and exits.

Linux only (/proc); elsewhere `start` does nothing.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0   # how often the driver's descendants are recorded
GRACE_S = 3.0  # between SIGTERM and SIGKILL

_watchdog: subprocess.Popen | None = None  # held for the driver's lifetime: its stdin is the pipe


def start(driver_pid: int | None = None) -> subprocess.Popen | None:
    """Start the watchdog of `driver_pid` (default: this process) once per process."""
    global _watchdog
    if _watchdog is not None or not Path("/proc/self/stat").exists():
        return _watchdog
    _watchdog = subprocess.Popen(
        [sys.executable, "-m", "alterrec_dist.common.ray_watchdog", str(driver_pid or os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    return _watchdog


def stop() -> None:
    """After `ray.shutdown()`: close the pipe, so the watchdog sweeps what shutdown left, and reap it."""
    global _watchdog
    if _watchdog is None:
        return
    _watchdog.stdin.close()
    try:
        _watchdog.wait(timeout=GRACE_S + 10)
    except subprocess.TimeoutExpired:
        pass
    _watchdog = None


# -- the watchdog process ----------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _processes() -> dict[int, tuple[int, int]]:
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                out[int(entry.name)] = st
    return out


def descendants(roots: dict[int, int], table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """{pid: start time} of the live processes in `roots` ({pid: start time}) and all their descendants."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid: t for pid, t in roots.items() if table.get(pid, (0, None))[1] == t}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def _signal_all(procs: dict[int, int], sig: int) -> dict[int, int]:
    """Send `sig` to each process of `procs` that is still the same process; return those alive."""
    alive = descendants(procs)
    for pid in alive:
        if pid != os.getpid():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return alive


def watch(driver_pid: int) -> None:
    st = _stat(driver_pid)
    if st is None:
        return
    driver = {driver_pid: st[1]}
    before = descendants(driver)  # the driver's children from before Ray (a test runner's) are not Ray's
    recorded: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone (or stopped us after its shutdown)
        recorded.update({pid: t for pid, t in descendants(driver).items() if before.get(pid) != t})
    recorded.pop(driver_pid, None)
    if not recorded:
        return
    _signal_all(recorded, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and descendants(recorded):
        time.sleep(0.2)
    _signal_all(recorded, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
