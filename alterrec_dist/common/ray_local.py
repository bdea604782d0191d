"""One way for every command to get a Ray: join the cluster in RAY_ADDRESS, or start a private local one.

A private Ray is watched by `ray_watchdog` (a driver killed without `ray.shutdown()` would leave Ray's
agents running) and stopped by `stop_ray`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from alterrec_dist.common import ray_watchdog

# Ray's C++ failure-signal handler takes a driver's SIGTERM too: it printed a crash dump, then aborted the command
# (exit 134) in about half of the runs stopped that way, before it could unwind (exit 143). `import ray` reads the
# switch, so it is set here, where every command that starts Ray imports it first. For the driver alone: `init_ray`
# takes it back before a private Ray starts, whose workers would inherit it and lose their crash reports.
FAILURE_HANDLER_OFF = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
_OFF_HERE = FAILURE_HANDLER_OFF not in os.environ
os.environ.setdefault(FAILURE_HANDLER_OFF, "1")


def init_ray(num_cpus: int, dashboard: bool = False) -> bool:
    """Connect to the cluster in RAY_ADDRESS, or start a private local Ray of `num_cpus` CPUs (callers
    oversubscribe a small machine rather than wait forever). True if started here."""
    import logging

    import ray

    if _OFF_HERE:
        os.environ.pop(FAILURE_HANDLER_OFF, None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if os.environ.get("RAY_ADDRESS"):
        # `ray job submit` sets RAY_ADDRESS for the entrypoint; ray.init resolves it (also "auto").
        ray.init(**common)
        return False
    # Started first, so the watchdog sees every Ray process appear.
    ray_watchdog.start()
    try:
        # address="local": never attach to some other cluster found in /tmp/ray by accident.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, **common)
    except BaseException:  # a start cut short (a SIGTERM inside ray.init): what it had started goes with it
        stop_ray()
        raise
    return True


def stop_ray() -> None:
    """Disconnect (and stop the private Ray `init_ray` started), then let the watchdog sweep what is left."""
    import ray

    ray.shutdown()
    ray_watchdog.stop()


@contextmanager
def ray_session(num_cpus: int, dashboard: bool = False) -> Iterator[None]:
    """Ray for the block: a Ray already initialized in this process is used as it is (and left running)."""
    import ray

    if ray.is_initialized():
        yield
        return
    init_ray(num_cpus, dashboard)
    try:
        yield
    finally:
        stop_ray()
