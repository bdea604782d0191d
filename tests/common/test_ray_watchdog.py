"""A driver that starts its private local Ray (training.launch._init_ray) and is then SIGKILLed leaves no Ray
process behind: without the watchdog, Ray 2.60's DashboardAgent and RuntimeEnvAgent survive, reparented
to init, and ignore SIGTERM."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alterrec_dist.common.config import PROJECT_ROOT
from alterrec_dist.common.ray_watchdog import descendants

DRIVER = """
import sys, time
from alterrec_dist.training.launch import _init_ray
_init_ray(1)
print("ray up", flush=True)
time.sleep(600)
"""
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_time(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the watchdog reads /proc (Linux)")
def test_sigkill_of_the_driver_leaves_no_ray_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert driver.stdout.readline().strip() == "ray up"
        root = {driver.pid: start_time(driver.pid)}
        deadline = time.monotonic() + 120
        while True:  # the raylet starts its agents a little after ray.init returns
            procs = descendants(root)
            names = {command_line(pid).strip() for pid in procs}
            if all(any(n.startswith(a) for n in names) for a in AGENTS) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert all(any(n.startswith(a) for n in names) for a in AGENTS), names
        time.sleep(2)  # the watchdog records once a second
        procs = descendants(root)
        watchdog = [pid for pid in procs if "alterrec_dist.common.ray_watchdog" in command_line(pid)]
        assert len(watchdog) == 1
        ray_procs = {pid: t for pid, t in procs.items() if pid not in (driver.pid, *watchdog)}
        assert len(ray_procs) >= 4  # gcs, raylet, dashboard, agents, ...
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        watched = {**ray_procs, watchdog[0]: procs[watchdog[0]]}  # the watchdog exits once it has cleaned up
        deadline = time.monotonic() + 30
        while descendants(watched) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: command_line(pid)[:80] for pid in descendants(ray_procs)}
        assert left == {}, f"still running after the driver's SIGKILL: {left}"
        assert descendants({watchdog[0]: procs[watchdog[0]]}) == {}  # the watchdog is gone too
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
