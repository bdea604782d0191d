"""run_cli: what every command shares when it ends badly."""
import signal
import subprocess
import sys
import textwrap

import pytest

from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.config import PROJECT_ROOT


def test_sigterm_unwinds_and_a_staged_output_is_removed(tmp_path):
    """A scheduler's SIGTERM ended batch_score or export where they stood, leaving `.OUT.tmp-PID` (tens of MB)
    and the directories made for OUT; prepare alone turned it into an exit that cleans up (review finding).
    In a child process: without the handler SIGTERM ends the process that receives it."""
    command = textwrap.dedent(f"""
        import os, signal
        from alterrec_dist.common.cli import run_cli
        from alterrec_dist.common.files import Staged

        def main(argv):
            with Staged({str(tmp_path / "new" / "o.parquet")!r}) as staged:
                staged.tmp.write_bytes(b"half of an output")
                os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread at once
                raise AssertionError("not reached: SIGTERM ends the command")

        run_cli(main, [])
    """)
    r = subprocess.run([sys.executable, "-c", command], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert list(tmp_path.iterdir()) == []  # no temp file, and the directory made for OUT is gone too


def test_out_of_memory_without_a_message_says_so(capsys):
    """MemoryError() (no message) printed "error: out of memory:  (smaller sizes, ...)": the exception itself is
    always true, so its fallback text never showed."""
    def allocate(argv):
        raise MemoryError()

    with pytest.raises(SystemExit) as e:
        run_cli(allocate, [])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: out of memory: an allocation failed (smaller sizes")


def test_progress_bars_refresh_sparsely_into_a_log_and_as_usual_on_a_terminal(monkeypatch):
    """Into a file or pipe every bar refresh is one more line (a torchrun run's stderr: 129 bar lines of 134)."""
    import io
    import os

    from alterrec_dist.common.cli import bar_seconds

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar_seconds() == 5.0
    leader, follower = os.openpty()
    with open(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert bar_seconds() == 0.1
    os.close(leader)
    monkeypatch.setenv("TQDM_MININTERVAL", "2")
    assert bar_seconds() == 2.0


def test_bars_are_rank_0s_unless_switched_off_and_ray_workers_get_the_switch(monkeypatch):
    """`train --no-progress` sets TQDM_DISABLE after tqdm was imported (which reads it once): each bar reads it."""
    from alterrec_dist.common.cli import bar_env, progress_bar

    for name in ("TQDM_DISABLE", "TQDM_MININTERVAL"):
        monkeypatch.delenv(name, raising=False)
    assert [progress_bar(rank)["disable"] for rank in (0, 1)] == [False, True] and bar_env() == {}
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(0)["disable"] and bar_env() == {"TQDM_DISABLE": "1"}
