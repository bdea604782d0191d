"""One way for every command to get a Ray: join the cluster in RAY_ADDRESS, or start a private local one.

A private Ray is watched by `ray_watchdog` (a driver killed without `ray.shutdown()` would leave Ray's
agents running) and stopped by `stop_ray`. One signal does not cut `ray.init` short (`_init_to_its_end`).
"""
from __future__ import annotations

import os
import sys
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


_set_here: list[str] = []  # the `private_env` keys init_ray set, which stop_ray takes back


def init_ray(num_cpus: int, dashboard: bool = False, private_env: dict[str, str] | None = None) -> bool:
    """Connect to the cluster in RAY_ADDRESS, or start a private local Ray of `num_cpus` CPUs (callers
    oversubscribe a small machine rather than wait forever). True if started here. `private_env`: Ray settings for
    a private Ray alone, where the caller's environment has none (its processes inherit the driver's); a cluster
    keeps its own."""
    import logging

    import ray

    if _OFF_HERE:
        os.environ.pop(FAILURE_HANDLER_OFF, None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    # `ray job submit` sets RAY_ADDRESS for the entrypoint; ray.init resolves it (also "auto").
    private = not os.environ.get("RAY_ADDRESS")
    if private:
        for key, value in (private_env or {}).items():
            if key not in os.environ:  # a user's own stands; ours goes at stop_ray (Ray Train hands the driver's
                os.environ[key] = value  # variables on to a later run's controller, a cluster's too)
                _set_here.append(key)
        ray_watchdog.start()  # first, so the watchdog sees every Ray process appear
        # address="local": never attach to some other cluster found in /tmp/ray by accident.
        common |= dict(address="local", num_cpus=num_cpus, include_dashboard=dashboard)
    connected = ray.is_initialized()  # then ray.init refuses ("called twice"): the caller's Ray is left as it is
    try:
        _init_to_its_end(common)
    except BaseException:  # a signal during the start, or a failed start: what it had started goes with it
        if not connected:
            stop_ray()
        raise
    return private


def _init_to_its_end(kwargs: dict) -> None:
    """`ray.init(**kwargs)`, not cut short by one signal. A SIGTERM (or Ctrl-C) whose handler raised inside ray.init
    could land after Ray had built the driver's core worker and before it kept it where `ray.shutdown` finds it:
    that core worker then crashed the exiting command (SIGSEGV in Ray's exit handler; every time the signal came
    at that point). So the first signal waits for the start to end (5-10 s on an idle 2-core machine, 28 s seen on
    a loaded one), then reaches the handler the command had; ray.init's own SIGTERM handler (`sys.exit(15)`, put
    in place as it begins) is left out. A second signal acts as before (once Ray's call returns to Python: each
    try at an address nothing answers takes 35 s), or a start that never ends (a RAY_ADDRESS nothing answers,
    which ray.init retries for minutes) would hold every signal but SIGKILL."""
    import signal
    import threading

    import ray._private.utils

    if threading.current_thread() is not threading.main_thread():  # no handler of Python's runs there
        ray.init(**kwargs)
        return
    # one the command ignores (SIGINT in a background job of a script) stays ignored, not held and announced
    signals = tuple(s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN)
    previous = {s: signal.getsignal(s) for s in signals}
    held: list[int] = []

    def hold(signum, frame) -> None:
        held.append(signum)
        for s in signals:
            signal.signal(s, previous[s])
        print(f"got {signal.Signals(signum).name} while Ray starts: stopping once the start ends (a second signal "
              "stops it now)", file=sys.stderr)

    rays_own = ray._private.utils.set_sigterm_handler
    try:
        ray._private.utils.set_sigterm_handler = lambda handler: None
        for s in signals:
            signal.signal(s, hold)
        ray.init(**kwargs)
    finally:
        ray._private.utils.set_sigterm_handler = rays_own
        for s in signals:
            signal.signal(s, previous[s])
        for s in held:
            signal.raise_signal(s)  # the command's handler runs here (SIGTERM: SystemExit 143, Ctrl-C: interrupted)


def stop_ray() -> None:
    """Disconnect (and stop the private Ray `init_ray` started), then let the watchdog sweep what is left."""
    import ray

    ray.shutdown()
    ray_watchdog.stop()
    while _set_here:
        os.environ.pop(_set_here.pop(), None)


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
