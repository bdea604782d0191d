"""The grid runner behind `python -m alterrec_dist.experiments`: the runs `grid/plan.py` lists, each through
the normal driver as a child process, `jobs` at a time, resumable.

A run is done when its directory holds `summary.json` (a peer: `result.json`). The paper grid's
directories are under `results/`, whose .gitignore keeps each finished run's record (summary, per-epoch
metrics, resolved config, command) in git and the rest (checkpoints, models, logs) on the machine: the grid
goes on over sessions and machines, and its report regenerates from a clean checkout. A half-finished
training run goes on from its newest checkpoint (`train --resume auto`), a half-finished peer from the
state its own command keeps in its directory (bench/recbole_peer.py: `resume.pth`). So an interrupted grid
resumes where it stopped. Each run's exact command is written to `command.txt` beside its results.

Several runners may work on one grid at once (another `--jobs`, another machine on the same file system):
a runner holds an exclusive lock on `<run dir>.lock` while it runs that run, and skips the runs whose lock
another holds (`claim`). The OS drops the lock when its holder dies, so a killed runner blocks nothing.
A runner given `only` (a glob on the run directories) runs those runs alone, ahead of their turn in the
grid's order, while another runner works through the rest.
"""
from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

from alterrec_dist.common import run_layout
from alterrec_dist.common.config import PROJECT_ROOT, shown
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import atomic_write_bytes, try_lock
from alterrec_dist.grid.grid_file import Grid
from alterrec_dist.grid.plan import RunSpec, expand, method_config, shown_command


def prepare_datasets(grid: Grid) -> None:
    """Make each dataset the grid's methods train on if its directory is missing (the command is in the grid);
    one the grid cannot make is a one-line error here rather than every run failing on it."""
    for d in grid.datasets:
        if not d.methods:
            continue
        cfg = method_config(d, d.methods[0], launched=True)  # its `set` may move data.path off its config's
        path = cfg.resolve_path(cfg.data.path)
        if path.exists():
            continue
        if not d.prepare:
            raise ConfigError(f"{grid.path}: dataset {d.name!r} has no data at {shown(path)} and no `prepare` "
                              "command to make it: make it first (the grid file says how)")
        cmd = [sys.executable, "-m", "alterrec_dist.prepare", *d.prepare]
        print(f"preparing {d.name}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, cwd=PROJECT_ROOT).returncode
        if rc != 0:  # its own error is the line above
            raise DataError(f"{grid.path}: dataset {d.name!r}: its `prepare` command failed (exit {rc})")


def claim(spec: RunSpec) -> int | None:
    """An open descriptor holding the exclusive lock on the run's `.lock` file, or None when another runner
    holds it (that run is under way there). The run's process holds it too (`Children`): it is released when
    both have closed it, or died."""
    spec.lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        return try_lock(spec.lock)
    except OSError as e:  # runners share a grid by these locks alone: without them two would run one run
        raise ConfigError(f"{spec.lock}: cannot lock it ({e.strerror or e}): the grid runner needs file locks "
                          "where its runs go (an NFS mount without nolock, or a local disk)") from None


def under_way(spec: RunSpec) -> bool:
    """Whether a runner holds the run's lock now (`--dry-run`'s "busy")."""
    if not spec.lock.exists():
        return False
    fd = claim(spec)
    if fd is None:
        return True
    os.close(fd)
    return False


class Children:
    """The runs this runner has under way, as child processes. Each holds its run's lock too (`claim`'s
    descriptor is passed on), so a runner killed outright leaves a run under way rather than free for the next
    runner to start beside it (two trainers wrote one run's metrics.jsonl). Stopping the runner (SIGTERM,
    Ctrl-C) stops them: a SIGTERM reached the runner alone, which waited for each to train to its end."""

    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._guard = threading.Lock()
        self._stopping = False

    def run(self, command: list[str], lock_fd: int, **kwargs) -> int:
        with self._guard:
            if self._stopping:
                return -signal.SIGTERM
            proc = subprocess.Popen(command, pass_fds=(lock_fd,), **kwargs)
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._guard:
                self._procs.discard(proc)

    def stop(self) -> None:
        """SIGTERM to every run under way (each unwinds, its checkpoints intact for a later resume), and none
        started after."""
        with self._guard:
            self._stopping = True
            for proc in self._procs:
                proc.terminate()


def run_one(spec: RunSpec, threads: int, lock_fd: int, children: Children) -> tuple[RunSpec, int, float]:
    # A training run that never wrote its config has nothing to go on from: start it again. A peer's
    # directory is its command's own to resume or restart.
    if spec.role != "peer" and spec.run_dir.exists() and not (spec.run_dir / run_layout.CONFIG).is_file():
        shutil.rmtree(spec.run_dir)
    spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(spec.log, "w") as log:
        log.write(f"$ {shlex.join(spec.command)}\n")
        log.flush()
        rc = children.run(spec.command, lock_fd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if rc == 0 and spec.done:
        record_command(spec)
    return spec, rc, seconds


def record_command_if_free(spec: RunSpec) -> None:
    """command.txt for a finished run no runner holds: one that holds it (here or elsewhere) writes it itself."""
    fd = claim(spec)
    if fd is None:
        return
    try:
        if not (spec.run_dir / run_layout.COMMAND).is_file():
            record_command(spec)
    finally:
        os.close(fd)


def record_command(spec: RunSpec) -> None:
    """RUN/command.txt, the command that made the finished run, part of its committed record."""
    atomic_write_bytes(spec.run_dir / run_layout.COMMAND, (shown_command(spec.command) + "\n").encode())


def selected(spec: RunSpec, grid: Grid, only: str | None) -> bool:
    """Whether the glob `only` picks the run: it matches the run's directory under the grid's `out`
    (e.g. "scientific/alterrec-round2-*"); no glob picks every run."""
    return only is None or fnmatch.fnmatchcase(spec.run_dir.relative_to(grid.out).as_posix(), only)


@contextmanager
def stopping_on_exit(children: Children):
    """Stop the children when the runner leaves early (SIGTERM's SystemExit, an error), before the thread pool
    waits for them. Not on Ctrl-C: the terminal's SIGINT reached the runs too, and a SIGTERM on top cut their
    own unwinding short (a checkpoint's temp directory left behind)."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        children.stop()
        raise


def last_error(log: Path) -> str:
    """': <the last error line>' of a failed run's log (a command's one-line error), or '' where it has none."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln.strip() for ln in lines if ln.startswith("error: ")]
    return f": {errors[-1]}" if errors else ""


def run_grid(grid: Grid, only: str | None = None) -> tuple[list[RunSpec], list[RunSpec]]:
    """Run what is not done (of it, what `only` selects), `grid.jobs` at a time in `run_order`; after each
    finished run the grid is expanded again, so a combination or a chosen setting's other seeds start as soon
    as they are known. Returns every run of the grid and the runs that failed."""
    failed: list[RunSpec] = []
    running: dict[Future, tuple[Path, int]] = {}  # each run under way here: its directory, its claim
    children = Children()
    with ThreadPoolExecutor(grid.jobs) as pool, stopping_on_exit(children):
        while True:
            specs = expand(grid)
            for spec in specs:  # finished with no runner waiting for it (its runner was killed outright)
                if spec.done and not (spec.run_dir / run_layout.COMMAND).is_file():
                    record_command_if_free(spec)
            skip = {s.run_dir for s in failed} | {d for d, _ in running.values()}
            todo = [s for s in specs if not s.done and s.run_dir not in skip and selected(s, grid, only)]
            if not running and not todo:
                return specs, failed
            # at the start and after every finished run, whatever runs beside it (jobs > 1 said it once)
            print(f"{sum(s.done for s in specs)} of {len(specs)} runs already done; {len(todo)} to run, "
                  f"{len(running)} under way here, {grid.jobs} at a time", flush=True)
            for spec in todo:
                if len(running) == grid.jobs:
                    break
                fd = claim(spec)
                if fd is None:  # another runner has it under way
                    continue
                if spec.done:  # another runner finished it since `expand` looked
                    os.close(fd)
                    continue
                running[pool.submit(run_one, spec, grid.threads, fd, children)] = spec.run_dir, fd
                print(f"start {shown(spec.run_dir)}", flush=True)  # what is under way, for whoever tails the log
            if not running:  # everything left is under way in other runners
                print(f"{len(todo)} runs left, all under way in other runners", flush=True)
                return specs, failed
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                os.close(running.pop(future)[1])
                spec, rc, seconds = future.result()
                ok = rc == 0 and spec.done
                print(f"{'ok  ' if ok else 'FAIL'} {shown(spec.run_dir)} ({seconds / 60:.1f} min)"
                      f"{'' if ok else f', exit {rc}, see {spec.log}{last_error(spec.log)}'}", flush=True)
                if not ok:
                    failed.append(spec)
