"""The grid runner (grid/runner.py): runs through the normal driver, resumed, shared between runners by their locks,
stopped with the runner, and what it refuses before any run."""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alterrec_dist.common.config import PROJECT_ROOT, load_config
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.experiments import main
from alterrec_dist.grid.grid_file import load_grid
from alterrec_dist.grid.plan import expand, shown_command
from alterrec_dist.grid.runner import prepare_datasets, run_grid
from tests.grid.grids import id_only_grid, tiny_peer_grid


def test_report_only_without_runs_leaves_the_report_alone(tmp_path):
    grid, report = id_only_grid(tmp_path)
    with pytest.raises(ConfigError, match=r"grid.toml: no finished run under .*/runs, nothing to report"):
        main(["--grid", str(grid), "--report-only"])
    assert report.read_text() == "the last report\n"


def test_a_finished_run_the_grid_now_makes_otherwise_is_named_not_reported(tmp_path, capsys):
    """A run left by an earlier version of the grid file was skipped as done and reported under the new
    settings; now --dry-run marks it STALE and a run or report stops on it, the report left alone."""
    from alterrec_dist.common.config import to_toml
    grid, report = id_only_grid(tmp_path, "seeds = [0]", 'set = ["model.dim=16"]')
    spec = expand(load_grid(grid))[0]
    spec.run_dir.mkdir(parents=True)  # finished as the grid made it then
    (spec.run_dir / "config.toml").write_text(to_toml(load_config(
        PROJECT_ROOT / "configs/default.toml", ["train.method=id_only", "train.seed=0", "model.dim=16",
                                                "trainer.num_workers=1", "trainer.launcher=torchrun"])))
    (spec.run_dir / "summary.json").write_text("{}")
    assert main(["--grid", str(grid), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("done  ")
    grid.write_text(grid.read_text().replace("model.dim=16", "model.dim=32"))  # the grid edited since
    assert main(["--grid", str(grid), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("STALE  ")
    for mode in (["--report-only"], []):
        with pytest.raises(ConfigError, match=r"runs/default/id_only-s0: finished with other settings than .*grid.toml "
                                              r"gives it \(model.dim: 16 in the run, 32 in the grid; 1 run\(s\) differ"):
            main(["--grid", str(grid), *mode])
    assert report.read_text() == "the last report\n"


def test_git_keeps_a_finished_runs_record_and_leaves_its_checkpoints_out(tmp_path):
    """results/.gitignore: what a later session or a clean checkout needs to resume the grid and
    regenerate its report is committed; the heavy files are not."""
    grid = load_grid(PROJECT_ROOT / "configs/experiments/paper.toml")
    run = grid.out / "scientific" / "alterrec-s0"
    peer = grid.out / "scientific" / "peers" / "SASRec-s0"
    kept = [run / name for name in ("summary.json", "metrics.jsonl", "config.toml", "command.txt")]
    kept += [peer / "result.json", peer / "command.txt"]
    left = [run / "checkpoints/e00003-s0000000/networks.pt", run / "model/manifest.json", run / "tensorboard/ev",
            run.with_name("alterrec-s0.log"), peer / "saved/SASRec.pth", peer / "config.toml"]
    paths = [str(p.relative_to(PROJECT_ROOT)) for p in kept + left]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=PROJECT_ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == paths[len(kept):]


def test_the_grid_starts_a_run_the_finished_ones_add_in_the_same_call(tmp_path, capsys):
    """A peer's combination exists only once its switches have finished: run_grid expands again after each
    run, so one call runs it too, and reports every run as done."""
    grid = load_grid(tiny_peer_grid(tmp_path, "methods = []"))
    assert [s.run_dir.name for s in expand(grid)] == ["P-s0", "P-a=1-s0", "P-b=2-s0"]
    specs, failed = run_grid(grid)
    assert failed == [] and all(s.done for s in specs)
    assert [s.run_dir.name for s in specs if s.combined] == ["P-combined-s0"]
    out = capsys.readouterr().out.replace(f"{tmp_path}/", "").splitlines()
    done = next(i for i, line in enumerate(out) if line.startswith("ok   runs/d/peers/P-combined-s0 ("))
    assert out.index("start runs/d/peers/P-combined-s0") < done


def test_a_run_another_runner_holds_is_left_to_it(tmp_path, capsys):
    """A run whose lock another process holds (a second runner on the same grid) is not started here; once
    that holder is gone (its lock dies with it), the run and what waited on it run."""
    grid_file = tiny_peer_grid(tmp_path, "methods = []")
    grid = load_grid(grid_file)
    held = next(s for s in expand(grid) if s.run_dir.name == "P-a=1-s0")
    held.lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        import fcntl, sys, time
        f = open({str(held.lock)!r}, "w"); fcntl.flock(f, fcntl.LOCK_EX); print("held", flush=True); time.sleep(600)
    ''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["--grid", str(grid_file), "--dry-run"]) == 0
        states = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
        assert states == ["todo", "busy", "todo"]  # P-s0, P-a=1-s0, P-b=2-s0
        specs, failed = run_grid(grid)
        assert failed == [] and sorted(s.run_dir.name for s in specs if s.done) == ["P-b=2-s0", "P-s0"]
        assert "1 runs left, all under way in other runners" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    specs, failed = run_grid(grid)
    assert failed == [] and all(s.done for s in specs) and len(specs) == 4  # the combination too
    assert sorted((tmp_path / "ran.txt").read_text().split()) == ["P-a=1-s0", "P-b=2-s0", "P-combined-s0", "P-s0"]


def started_runner(tmp_path: Path, grid_file: Path, closed: str = "") -> tuple[subprocess.Popen, list[int]]:
    """`experiments --grid` in a child process (its descriptors in `closed`, e.g. "<&-", closed, as some
    schedulers start a job), once both of its first runs (2 jobs) are under way: (the runner, their pids)."""
    env = {**os.environ, "PEER_SECONDS": "600"}
    command = shlex.join([sys.executable, "-m", "alterrec_dist.experiments", "--grid", str(grid_file)])
    runner = subprocess.Popen(["sh", "-c", f"exec {command} >/dev/null 2>&1 {closed}"], cwd=PROJECT_ROOT, env=env)
    pids_file, deadline = tmp_path / "pids.txt", time.monotonic() + 60
    while not (pids_file.exists() and len(pids_file.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    return runner, [int(p) for p in pids_file.read_text().split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # not a zombie waiting for its parent


@pytest.mark.timeout(120)
def test_sigterm_to_the_runner_stops_its_runs(tmp_path):
    """SIGTERM (a scheduler) reached the runner alone, which then waited for every run under way to train to
    its end (minutes to hours); now its runs are stopped with it."""
    runner, pids = started_runner(tmp_path, tiny_peer_grid(tmp_path, "methods = []"))
    try:
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 128 + signal.SIGTERM
        assert not any(alive(p) for p in pids)
    finally:
        runner.kill()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("closed", ["", "<&-", ">&-"])
def test_a_killed_runners_runs_keep_their_locks(tmp_path, capsys, closed):
    """A runner killed outright (SIGKILL) left its runs training without their lock, so the next runner started
    the same run beside it: two trainers appended to one metrics.jsonl. The run's process holds the lock too,
    also where the runner started with stdin or stdout closed (its lock took descriptor 0 or 1, which the run's
    own stdin or stdout then replaced)."""
    grid_file = tiny_peer_grid(tmp_path, "methods = []")
    runner, pids = started_runner(tmp_path, grid_file, closed)
    try:
        runner.kill()
        runner.wait()
        assert all(alive(p) for p in pids)  # left to finish
        assert main(["--grid", str(grid_file), "--dry-run"]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["busy", "busy", "todo"]
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_run_that_finished_with_no_runner_waiting_gets_its_command(tmp_path):
    """A run whose runner was killed outright finishes on its own (it keeps its lock); only the runner that started
    it wrote command.txt, and later runners skip it as done, so its committed record never had one."""
    grid = load_grid(tiny_peer_grid(tmp_path, "methods = []"))
    orphan = expand(grid)[0]
    orphan.run_dir.mkdir(parents=True)
    (orphan.run_dir / "result.json").write_text(json.dumps({"valid": {"ndcg@10": 0.3}, "test": {"ndcg@10": 0.3}}))
    specs, failed = run_grid(grid)
    assert failed == [] and all(s.done for s in specs)
    assert orphan.run_dir.name not in (tmp_path / "ran.txt").read_text().split()  # not run again
    assert (orphan.run_dir / "command.txt").read_text() == shown_command(orphan.command) + "\n"


def test_a_grid_on_a_file_system_without_locks_is_one_line(tmp_path, monkeypatch):
    """Runners share a grid by its run locks alone; where the file system has none (an NFS mount with `nolock`)
    the first claim was an OSError traceback. It is one line before any run starts."""
    import errno

    from alterrec_dist.common import files

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    grid = load_grid(tiny_peer_grid(tmp_path, "methods = []"))
    with pytest.raises(ConfigError, match=r"P-s0.lock: cannot lock it \(No locks available\): the grid runner needs"):
        run_grid(grid)
    assert not (tmp_path / "ran.txt").exists()


def test_a_grid_whose_runs_all_fail_leaves_the_report_alone(tmp_path):
    """--report-only with nothing finished refused to replace the report with empty tables, but a plain run
    whose runs all failed replaced it."""
    grid_file = tiny_peer_grid(tmp_path, "methods = []")
    (tmp_path / "peer.py").write_text("raise SystemExit(1)\n")
    report = tmp_path / "RESULTS.md"
    grid_file.write_text(f'report = "{report}"\n' + grid_file.read_text())
    report.write_text("the last report\n")
    with pytest.raises(ConfigError, match=r"no finished run under .*, nothing to report .*; 3 run\(s\) failed"):
        main(["--grid", str(grid_file)])
    assert report.read_text() == "the last report\n"


def test_two_at_a_time_the_runner_says_what_is_left_after_each_run_and_why_one_failed(tmp_path, capsys):
    """With jobs = 2 (both shipped grids) the count was printed once, at the start, and a FAIL line named only the
    log that held the run's one-line error (reviewer finding)."""
    grid = load_grid(tiny_peer_grid(tmp_path, "methods = []"))
    (tmp_path / "peer.py").write_text("import sys, time\ntime.sleep(2 if '--set' in sys.argv else 0)\n"  # P-s0 first
                                      "print('error: peer.py: no such column', file=sys.stderr)\nraise SystemExit(2)\n")
    _, failed = run_grid(grid)
    out = capsys.readouterr().out.replace(f"{tmp_path}/", "").splitlines()
    assert len(failed) == 3
    fails = [line for line in out if line.startswith("FAIL ")]
    assert len(fails) == 3 and all(line.endswith(": error: peer.py: no such column") for line in fails), fails
    counts = [line for line in out if " runs already done; " in line]
    assert counts[0] == "0 of 3 runs already done; 3 to run, 0 under way here, 2 at a time", out
    assert "1 under way here" in counts[1], out  # after P-s0's end, while its twin still runs


def test_only_runs_the_runs_its_glob_selects_and_an_unmatched_glob_is_an_error(tmp_path, capsys):
    """`--only` runs a part of the grid ahead of its turn (beside another runner that works through the rest)."""
    grid_file = tiny_peer_grid(tmp_path, "methods = []")
    specs, failed = run_grid(load_grid(grid_file), only="d/peers/P-b=*")
    assert failed == [] and [s.run_dir.name for s in specs if s.done] == ["P-b=2-s0"]
    assert (tmp_path / "ran.txt").read_text().split() == ["P-b=2-s0"]
    capsys.readouterr()
    assert main(["--grid", str(grid_file), "--dry-run", "--only", "d/peers/P-[sa]*"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]  # state, command ... --out RUN_DIR
    assert [(words[0], Path(words[-1]).name) for words in listed] == [("todo", "P-s0"), ("todo", "P-a=1-s0")]
    with pytest.raises(ConfigError, match=r"grid.toml: --only 'P-\*' matches none of the grid's 3 runs"):
        main(["--grid", str(grid_file), "--only", "P-*"])  # the glob is on DATASET/..., not the bare name
    assert (tmp_path / "ran.txt").read_text().split() == ["P-b=2-s0"]


def test_two_runners_on_one_grid_share_its_runs_and_run_each_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PEER_SECONDS", "1")  # long enough for both runners to be at work together
    grid_file = tiny_peer_grid(tmp_path, "methods = []")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_grid(load_grid(grid_file)), range(2)))
    assert all(failed == [] for _, failed in results)
    assert all(s.done for s in expand(load_grid(grid_file)))
    ran = (tmp_path / "ran.txt").read_text().split()
    assert sorted(ran) == ["P-a=1-s0", "P-b=2-s0", "P-combined-s0", "P-s0"]  # each once, none twice


def test_a_dataset_the_grid_cannot_make_is_one_error_before_any_run(tmp_path):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(textwrap.dedent(f'''
        out = "{tmp_path}/runs"
        [[dataset]]
        name = "elsewhere"
        config = "configs/default.toml"
        set = ["data.path={tmp_path}/absent"]
        methods = ["id_only"]
    '''))
    with pytest.raises(ConfigError, match=r"grid.toml: dataset 'elsewhere' has no data at .*absent and no `prepare`"):
        main(["--grid", str(grid_file)])
    assert not (tmp_path / "runs").exists()
    # a `prepare` that fails: its own line, then the grid's (a CalledProcessError traceback and exit 1 before)
    grid_file.write_text(grid_file.read_text() + f'prepare = ["recbole", "--path", "{tmp_path}/nothing", '
                                                 f'"--out", "{tmp_path}/absent"]\n')
    with pytest.raises(DataError, match=r"grid.toml: dataset 'elsewhere': its `prepare` command failed \(exit 2\)"):
        main(["--grid", str(grid_file)])
    assert not (tmp_path / "runs").exists()


def test_a_methods_own_settings_are_checked_before_any_run(tmp_path):
    """A method's `method_set` (or the dataset's `set`) that its config refuses failed only when that method's
    first run came, after every run before it had trained; only sweep points were checked up front."""
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(textwrap.dedent(f'''
        out = "{tmp_path}/runs"
        [[dataset]]
        name = "def"
        config = "configs/default.toml"
        methods = ["id_only", "text_only"]
        method_set = {{ text_only = ["train.lr_text=-1"] }}
    '''))
    with pytest.raises(ConfigError, match=r"grid.toml: dataset 'def', method text_only: --set train.lr_text=-1: "
                                          r"train.lr_text must be"):
        main(["--grid", str(grid_file), "--dry-run"])
    # checked as the runs are launched, one worker each (whatever the grid's sets say, as under torchrun): a global
    # batch that two workers cannot split is fine, in a sweep's points too
    grid_file.write_text(grid_file.read_text().replace('["train.lr_text=-1"]', '["train.global_batch_size=999", '
                                                       '"eval.batch_size=999", "trainer.num_workers=2"]')
                         + '[[dataset.sweep]]\nkey = "train.lr_text"\nvalues = [0.001, 0.01]\n')
    assert main(["--grid", str(grid_file), "--dry-run"]) == 0
    prepare_datasets(load_grid(grid_file))  # a real run's first step: its data is there, nothing to refuse


def test_ctrl_c_leaves_the_runs_to_the_terminals_sigint(tmp_path):
    """Ctrl-C sends SIGINT to the whole process group, so the runs are already unwinding; the runner's SIGTERM on
    top cut that short (a checkpoint's temp directory left behind). Other early exits still stop them."""
    from alterrec_dist.grid.runner import Children, stopping_on_exit

    for raised, stopped in ((KeyboardInterrupt, False), (SystemExit, True)):
        children = Children()
        lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
        with ThreadPoolExecutor(1) as pool:
            rc = pool.submit(children.run, [sys.executable, "-c", "import time; time.sleep(5)"], lock)
            time.sleep(0.5)
            with pytest.raises(raised), stopping_on_exit(children):
                raise raised()
            assert (rc.result() == -signal.SIGTERM) == stopped  # else it ran its 5 s out
        os.close(lock)


