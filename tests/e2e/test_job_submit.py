"""`ray job submit` end to end: a Ray head of our own, the default config as a job, its run directory.

The test starts a private head (`ray start --head --block` in a short temp dir, free ports), submits
`python -m alterrec_dist.train --config configs/default.toml` with the project as working dir,
waits for SUCCEEDED, checks the run output, and then stops only that head. `ray stop` is never
used: it stops every Ray of this user on the machine, including other people's experiments.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from alterrec_dist.common.config import PROJECT_ROOT
from alterrec_dist.training.launch import PRIVATE_RAY_TRAIN_ENV
from tests.e2e.test_train_runs import SMALL, check_run_dir

VENV_BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink out of it
RAY = str(VENV_BIN / "ray")
# Uploaded with the job is the checkout minus what a run does not need (Ray's upload limit is
# ~500 MB and .venv-recbole alone is 1.4 GB). Ray already skips .git, .venv and .gitignore'd
# paths by default; listing them again keeps the upload small if those defaults change.
EXCLUDES = ["/.venv/", "/.venv-*/", "/.git/", "/.cache/", "/.pytest_cache/", "/runs/", "/data/",
            "__pycache__/", "*.egg-info/"]
JOB_TIMEOUT_S = 600


@dataclass
class Head:
    proc: subprocess.Popen  # `ray start --block`: the session leader of every process of the head
    temp_dir: Path
    dashboard: str  # http://127.0.0.1:PORT, the job server
    env: dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    """The environment of the head and of every client command.

    Token auth, not RAY_AUTH_MODE=disabled: token auth is Ray 2.60's default for a new cluster, so
    this is the setup users get. The mode must be explicit on both sides: left unset, `ray start`
    turns token mode on by itself only when ~/.ray/auth_token exists, so the result would depend on
    the machine. The token travels in RAY_AUTH_TOKEN (a fresh one per test), so the test neither
    reads nor overwrites the user's ~/.ray/auth_token; the head's processes, the job driver
    included, inherit it from `ray start` and join the cluster with it.
    """
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", **PRIVATE_RAY_TRAIN_ENV)  # the head set as a private Ray is: ~18 s less
    # The job driver runs the entrypoint through a shell with the head's environment: `python`
    # must be this venv's (the system python has no torch), and so must the `ray` CLI here.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)  # the caller's shell must not redirect us to another cluster or token
    return env


def _http_get(url: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:  # not listening yet
        return 0, str(e)


def start_head() -> Head:
    # Short and private: Ray puts unix sockets under it (paths are limited to ~107 characters,
    # pytest's tmp_path is too long), and every process of this head has it in its command line.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    dash = _free_port()
    env = _ray_env()
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
           # every port a second head on this machine could collide on (the defaults are fixed)
           "--port", str(_free_port()), "--dashboard-port", str(dash),
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--include-dashboard=true", "--disable-usage-stats"]
    # --block keeps `ray start` alive as the leader of a new session: SIGTERM to it shuts its node
    # down, and the session id finds whatever is left (workers run in their own process groups,
    # but stay in this session).
    # On SIGTERM a node first drains (for preemption: up to 30 s waiting for leases to return);
    # this head has nothing to hand over when the test stops it.
    head_env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    with open(temp_dir / "ray_start.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=head_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Head(proc, temp_dir, f"http://127.0.0.1:{dash}", env)


def wait_ready(head: Head, timeout: float = 180) -> None:
    """Until the job server answers (the dashboard starts its job module a few seconds after itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            pytest.fail(f"ray start exited with {head.proc.returncode}:\n{_start_log(head)}")
        if _http_get(f"{head.dashboard}/api/jobs/", head.env["RAY_AUTH_TOKEN"])[0] == 200:
            return
        time.sleep(1)
    pytest.fail(f"the job server at {head.dashboard} did not come up in {timeout:.0f} s:\n{_start_log(head)}")


def _start_log(head: Head) -> str:
    return (head.temp_dir / "ray_start.log").read_text(errors="replace")[-4000:]


# -- finding and stopping our processes (and only ours) ----------------------------------------

def _proc_info(pid: str) -> tuple[str, int, str] | None:
    """(state, session id, command line) of a process, None if it is gone or unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may contain spaces
    return fields[0], int(fields[3]), cmdline


def head_processes(head: Head) -> list[int]:
    """Live processes of this head: in the session of its `ray start`, or naming its temp dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        info = _proc_info(entry.name)
        if info is None or info[0] == "Z":  # zombies hold nothing and go when init reaps them
            continue
        if info[1] == head.proc.pid or str(head.temp_dir) in info[2]:
            found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(head: Head, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := head_processes(head)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def stop_head(head: Head) -> None:
    """What `ray stop` does, restricted to this head: SIGTERM, a grace period, then SIGKILL."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops raylet, GCS, dashboard
        try:
            head.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait()
    _signal_all(head_processes(head), signal.SIGTERM)  # stragglers, e.g. workers of the job
    _signal_all(_wait_gone(head, 16), signal.SIGKILL)  # 16 s: `ray stop`'s grace period
    _wait_gone(head, 10)


# -- the job -----------------------------------------------------------------------------------

def ray_cli(head: Head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=head.env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def submit(head: Head, job_id: str, train_args: list[str]) -> None:
    r = ray_cli(head, "job", "submit", "--address", head.dashboard, "--submission-id", job_id, "--no-wait",
                "--working-dir", str(PROJECT_ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                "--", "python", "-m", "alterrec_dist.train", *train_args)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def wait_job(head: Head, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    """The job's final info from the Jobs REST API (GET /api/jobs/ID) once it is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = _http_get(f"{head.dashboard}/api/jobs/{job_id}", head.env["RAY_AUTH_TOKEN"])
        info = json.loads(body) if code == 200 else {"status": f"HTTP {code}: {body[:200]}"}
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return info
        time.sleep(3)


def job_logs(head: Head, job_id: str) -> str:
    r = ray_cli(head, "job", "logs", "--address", head.dashboard, job_id)
    return r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_ray_job_submit_default_config(tmp_path):
    run = tmp_path / "run"  # absolute: the job's working dir is Ray's unpacked copy, not the checkout
    train_args = ["--config", "configs/default.toml", *[a for s in SMALL for a in ("--set", s)], "--out", str(run)]
    job_id = f"alterrec-test-{secrets.token_hex(4)}"
    head = start_head()
    try:
        wait_ready(head)
        # token auth is really on: the job server refuses a request without the token
        assert _http_get(f"{head.dashboard}/api/jobs/", None)[0] == 401
        submit(head, job_id, train_args)
        info = wait_job(head, job_id)
        logs = job_logs(head, job_id)
        assert info["status"] == "SUCCEEDED", f"job {job_id}: {info}\n--- job logs ---\n{logs[-6000:]}"
        check_run_dir(run, 3, logs, workers=2)
        assert "train e2" in logs  # the workers' progress bars reach the job's log
        for noise in ("Reporting training result", "Failed to query Ray Train Controller"):
            assert noise not in logs  # Ray chatter the driver turns off
    finally:
        stop_head(head)
    assert head_processes(head) == [], f"processes of the head in {head.temp_dir} survived"
    shutil.rmtree(head.temp_dir, ignore_errors=True)
