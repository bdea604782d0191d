"""One way for every command to get a Ray: join the cluster in RAY_ADDRESS, or start a private local one.

A private Ray is watched by `ray_watchdog` (a driver killed without `ray.shutdown()` would leave Ray's
agents running) and stopped by `stop_ray`. A signal never cuts `ray.init` short (`_init_to_its_end`).
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

    if _OFF_HERE:
        os.environ.pop(FAILURE_HANDLER_OFF, None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    # `ray job submit` sets RAY_ADDRESS for the entrypoint; ray.init resolves it (also "auto").
    private = not os.environ.get("RAY_ADDRESS")
    if private:
        ray_watchdog.start()  # first, so the watchdog sees every Ray process appear
        # address="local": never attach to some other cluster found in /tmp/ray by accident.
        common |= dict(address="local", num_cpus=num_cpus, include_dashboard=dashboard)
    try:
        _init_to_its_end(common)
    except BaseException:  # a signal during the start, or a failed start: what it had started goes with it
        stop_ray()
        raise
    return private


def _init_to_its_end(kwargs: dict) -> None:
    """`ray.init(**kwargs)`, never cut short by a signal. A SIGTERM (or Ctrl-C) whose handler raised inside ray.init
    could land after Ray had built the driver's core worker and before it kept it where `ray.shutdown` finds it:
    that core worker then crashed the exiting command (SIGSEGV in Ray's exit handler; every time the signal came
    at that point). So both signals wait for the start to end (5-10 s on an idle 2-core machine, 28 s seen on a
    loaded one), then reach the handlers the command had; ray.init's own SIGTERM handler (`sys.exit(15)`, put in
    place as it begins) is left out."""
    import signal
    import threading

    import ray._private.utils

    if threading.current_thread() is not threading.main_thread():  # no handler of Python's runs there
        ray.init(**kwargs)
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    rays_own = ray._private.utils.set_sigterm_handler
    ray._private.utils.set_sigterm_handler = lambda handler: None
    try:
        ray.init(**kwargs)
    finally:
        ray._private.utils.set_sigterm_handler = rays_own
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)  # the command's handler runs here (SIGTERM: SystemExit 143, Ctrl-C: interrupted)


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
