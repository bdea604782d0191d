"""Shared entry-point behaviour: bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable

from alterrec_dist.common.errors import ConfigError, DataError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a DataError/ConfigError becomes `error: <message>` and exit code 2, as does a
    MemoryError (sizes this machine cannot hold, e.g. synth --items 1e11: numpy's message says how much).
    SIGTERM unwinds as Ctrl-C does, so every command's staged output is removed."""
    try:
        with sigterm_as_exit():
            code = main(argv)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as e:
        print(f"error: out of memory: {str(e) or 'an allocation failed'} (smaller sizes, or a machine with more memory)",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, whose errors (an unknown option, a bad value, a `p.error` of the command's own checks) are
    one line and exit 2 like every other refusal: argparse printed its whole usage block above the error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """--device of the commands that score a trained model (export, recommend, batch_score)."""
    p.add_argument("--device", default="cpu",
                   help="where the model scores: cpu (default), cuda or cuda:N; a GPU run's model scores on a CPU too")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--run / --export / --data: where the commands that score (recommend, batch_score) find the model."""
    p.add_argument("--run", metavar="RUN_DIR", help="training run directory (give this or --export)")
    p.add_argument("--export", metavar="EXPORT_DIR",
                   help="export directory (from `python -m alterrec_dist.export`), instead of --run")
    p.add_argument("--data", metavar="DATASET", help="dataset directory (default: the one the run's model names)")


@contextmanager
def sigterm_as_exit():
    """SIGTERM (a scheduler stopping the job, `kill`) raises SystemExit(143) instead of ending the process
    where it stands, so `finally` blocks and the writers' `Staged` temp files are cleaned up (the default
    left `.OUT.tmp-PID` and the directories made for OUT). Only the main thread may set handlers; elsewhere
    this is a no-op."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


BAR_ENV = ("TQDM_DISABLE", "TQDM_MININTERVAL")  # tqdm's own variables; `train --no-progress` sets the first


def progress_bar(rank: int = 0) -> dict:
    """tqdm's settings for a long job's bar: drawn by rank 0 only, unless TQDM_DISABLE is set (`train
    --no-progress`); refreshed at most every `bar_seconds()`. Read at each bar: tqdm reads its variables once, at
    import, before a command has parsed its arguments, and an explicit `disable` overrides them."""
    return {"disable": rank != 0 or bool(os.environ.get("TQDM_DISABLE")), "mininterval": bar_seconds()}


def bar_env() -> dict[str, str]:
    """The bar settings of this process that a Ray worker, started elsewhere, needs (`BAR_ENV`), those set."""
    return {k: os.environ[k] for k in BAR_ENV if os.environ.get(k)}


def bar_seconds() -> float:
    """The least time between two refreshes of a long job's progress bar: tqdm's own 0.1 s on a terminal, 5 s
    where stderr is a file or a pipe (a Ray worker's, torchrun's, a grid run's log), in which every refresh is
    one more line: a 20 s torchrun run's stderr held 129 bar lines of 134, and a grid log's epoch lines began
    with bar fragments (reviewer finding). TQDM_MININTERVAL, where set, decides."""
    if os.environ.get("TQDM_MININTERVAL"):
        return float(os.environ["TQDM_MININTERVAL"])
    return 0.1 if sys.stderr.isatty() else 5.0
