"""Grid expansion: the committed grid's tuning budget, and sweeps that fit no method."""
import json
import os
import shlex
import signal
import subprocess
import sys
import re
import textwrap
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest

from alterrec_dist.common.config import PROJECT_ROOT
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.experiments import main
from alterrec_dist.common.config import load_config
from alterrec_dist.grid.runner import expand, load_grid, method_config, prepare_datasets, run_grid, shown_command
from alterrec_dist.grid.selection import choose

# What a method's config refuses or ignores, and so is not one of its switches: a key, or one point of it. AlterRec's
# two networks each take a logit form of their own; ID only's and text only's one network has it as `cosine`.
PER_NETWORK = {"logits=id_cosine", "logits=text_cosine"}
NOT_THEIRS = {  # (train.method and train.reject_worse: AlterRec's own switches, which no other method has)
    "nfrec_sum": {"logits", "train.method", "train.reject_worse"},  # one fused network: no per-network cosine logits
    "id_only": {"model.text_adapter", "train.method", "train.reject_worse", *PER_NETWORK},
    "text_only": {"model.id_init", "train.method", "train.reject_worse", *PER_NETWORK},
    "alterrec": set(),
}


def test_the_committed_grid_tunes_each_method_over_the_same_switches():
    grid = load_grid(PROJECT_ROOT / "configs/experiments/paper.toml")
    [d] = [d for d in grid.datasets if d.name == "scientific"]
    specs = [s for s in expand(grid) if s.dataset == "scientific"]
    # the runs of each method's chosen setting (once its candidates have run): on every seed
    chosen = {s.run_dir for m in NOT_THEIRS for s in (getattr(choose(specs, d, m), "runs", None) or [])}
    points = defaultdict(set)  # method -> (key, value) of its seed-0 sweep runs over the select keys
    for s in specs:
        if s.role == "sweep" and s.method in NOT_THEIRS:
            # tuning on seed 0; other seeds only for the chosen setting (or a former choice's, finished)
            assert (s.seed in d.select_seeds or not set(s.sweeps) & set(d.select) or s.run_dir in chosen
                    or s.done), s.run_dir
            points[s.method] |= {(k, str(v)) for k, v in s.sweeps.items() if k in d.select}
    everything = points["alterrec"]
    for method, skipped in NOT_THEIRS.items():
        theirs = {(k, v) for k, v in everything if k not in skipped and f"{k}={v}" not in skipped}
        assert points[method] == theirs, method
    assert len(everything) == 15 and {f"{k}={v}" for k, v in everything} > PER_NETWORK
    assert set(d.select) == {k for k, _ in everything}
    # The base runs have every seed; seeds 1-2 of a chosen switch come once seed 0 has been compared.
    assert {s.seed for s in specs if s.role == "method" and s.method == "id_only"} == {0, 1, 2}
    # Run order: each tuned method's seed-0 candidates and its chosen setting's other seeds, method by method
    # (AlterRec first), then the peers, then the later rounds, then the rest (the sensitivity sweeps, seeds 1-2 no
    # choice needs).
    first = [i for i, s in enumerate(specs) if s.role != "peer" and s.method in NOT_THEIRS and s.tuning_round == 1 and (
        s.run_dir in chosen or s.seed == 0 and not (s.extra and not {*s.sweeps, *s.combined} & set(d.select)))]
    peers = [i for i, s in enumerate(specs) if s.role == "peer" and s.tuning_round == 1]
    later = [i for i, s in enumerate(specs) if s.tuning_round > 1 and (s.seed in d.select_seeds or s.run_dir in chosen)]
    assert first + peers + later == list(range(len(first) + len(peers) + len(later)))
    assert [specs[i].method for i in first] == sorted((specs[i].method for i in first), key=d.methods.index)
    # Round 2 tries on AlterRec's winner what lost alone against the base, the alternation's own stopping too.
    assert any(specs[i].combined.get("train.reject_worse") for i in later if specs[i].method == "alterrec")
    # RecBole's SASRec is tuned too: its own settings, one at a time, through the peer's --set.
    sasrec = {s.run_dir.name: s.command for s in specs if s.method == "SASRec" and not s.combined}
    assert len(sasrec) == 7 and "SASRec-s0" in sasrec
    # Once those have run, the switches that beat its base run together: only switches it ran one at a time.
    singles = {(k, str(v)) for s in specs if s.method == "SASRec" and not s.combined for k, v in s.sweeps.items()}
    for s in specs:
        if s.method == "SASRec" and s.combined:
            assert len(s.combined) >= 2 and {(k, str(v)) for k, v in s.combined.items()} <= singles, s.run_dir
    cmd = sasrec["SASRec-dropout=0.1-s0"]
    assert cmd[cmd.index("--set"):cmd.index("--seed")] == ["--set", "hidden_dropout_prob=0.1",
                                                            "--set", "attn_dropout_prob=0.1"]


def test_a_sweep_point_no_method_takes_is_an_error(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent('''
        [[dataset]]
        name = "default"
        config = "configs/default.toml"
        methods = ["id_only", "text_only"]
        [[dataset.sweep]]
        key = "logits"
        variants = { cosine = ["model.id_logit=cosine"] }
    '''))
    with pytest.raises(ConfigError, match=r"grid.toml: sweep logits = cosine fits no method: .*id_logit"):
        expand(load_grid(grid))


def id_only_grid(tmp_path: Path, *lines: str) -> tuple[Path, Path]:
    """A grid file of ID only on the default data (`lines` added to its dataset), and its report, which holds
    "the last report"."""
    grid, report = tmp_path / "grid.toml", tmp_path / "RESULTS.md"
    report.write_text("the last report\n")
    grid.write_text(textwrap.dedent(f'''
        out = "{tmp_path}/runs"
        report = "{report}"
        [[dataset]]
        name = "default"
        config = "configs/default.toml"
        methods = ["id_only"]
    ''') + "\n".join(lines) + "\n")
    return grid, report


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


def test_a_runs_recorded_command_holds_no_path_of_this_machine():
    cmd = [sys.executable, "-m", "alterrec_dist.train", "--out", str(PROJECT_ROOT / "results/paper/d/x-s0"),
           "--set", "eval.alpha_sweep=[0.0,1.0]"]
    assert shown_command(cmd) == ("python -m alterrec_dist.train --out results/paper/d/x-s0 "
                                  "--set 'eval.alpha_sweep=[0.0,1.0]'")


def tiny_peer_grid(tmp_path, dataset: str) -> Path:
    """A grid of `dataset`'s methods and sweeps and a peer with two switches, whose runs are a stand-in
    script that writes its result (every switch better on validation, two together more)."""
    (tmp_path / "peer.py").write_text(textwrap.dedent('''
        import argparse, json, os, pathlib, time
        p = argparse.ArgumentParser(); p.add_argument("--seed"); p.add_argument("--out")
        p.add_argument("--set", action="append", default=[]); a = p.parse_args()
        m = {"ndcg@10": 0.3 + 0.01 * len(a.set)}  # every switch helps, two together more
        pathlib.Path(a.out).mkdir(parents=True)
        with open(pathlib.Path(__file__).with_name("ran.txt"), "a") as ran:  # who ran, for the tests
            ran.write(pathlib.Path(a.out).name + "\\n")
        with open(pathlib.Path(__file__).with_name("pids.txt"), "a") as pids:
            pids.write(f"{os.getpid()}\\n")
        time.sleep(float(os.environ.get("PEER_SECONDS", "0")))
        tmp = pathlib.Path(a.out) / "result.json.tmp"  # atomic, as bench/recbole_peer.py writes it: the runner
        tmp.write_text(json.dumps({"valid": m, "test": m}))  # reads a finished run's result while others still run
        os.replace(tmp, tmp.with_suffix(""))
    '''))
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(textwrap.dedent(f'''
        out = "{tmp_path}/runs"
        jobs = 2
        seeds = [0, 1]
        [[dataset]]
        name = "d"
        config = "configs/default.toml"
        select_seeds = [0]
        combine = true
        {textwrap.indent(textwrap.dedent(dataset), " " * 8).strip()}
        [[dataset.peer]]
        name = "P"
        command = ["{{python}}", "{tmp_path}/peer.py"]
        seeds = [0]
        [[dataset.peer.sweep]]
        key = "a"
        values = [1]
        [[dataset.peer.sweep]]
        key = "b"
        values = [2]
    '''))
    return grid_file


def test_a_grid_with_combine_adds_the_combination_once_its_switches_have_run(tmp_path):
    grid_file = tiny_peer_grid(tmp_path, '''
        methods = ["id_only"]
        select = ["train.m_max", "train.m_gap"]
        [[dataset.sweep]]
        key = "train.m_max"
        values = [30]
        [[dataset.sweep]]
        key = "train.m_gap"
        values = [1]''')
    grid = load_grid(grid_file)
    specs = expand(grid)
    assert not any(s.combined for s in specs)
    for s in specs:  # every single switch beats its base on validation
        s.run_dir.mkdir(parents=True)
        valid = 0.05 + 0.01 * bool(s.extra)
        result = ({"valid": {"ndcg@10": valid}} if s.role == "peer"
                  else {"selection": "id/ndcg@10", "valid": {"id": {"ndcg@10": valid}}})
        (s.run_dir / s.done_file).write_text(json.dumps(result))
    combined = {s.run_dir.relative_to(grid.out): s.command for s in expand(grid) if s.combined}
    assert set(combined) == {Path("d/id_only-combined-s0"), Path("d/peers/P-combined-s0")}
    cmd = combined[Path("d/id_only-combined-s0")]
    assert cmd[cmd.index("train.m_max=30") - 1:cmd.index("--out")] == ["--set", "train.m_max=30",
                                                                        "--set", "train.m_gap=1"]
    assert combined[Path("d/peers/P-combined-s0")][1:-4] == [f"{tmp_path}/peer.py", "--set", "a=1", "--set", "b=2"]


def test_a_choice_made_mid_grid_sends_its_other_seeds_ahead_of_the_next_method_and_the_peers(tmp_path):
    grid = load_grid(tiny_peer_grid(tmp_path, '''
        methods = ["id_only", "text_only"]
        select = ["train.m_max"]
        [[dataset.sweep]]
        key = "train.m_max"
        values = [30]'''))
    names = lambda: [s.run_dir.name for s in expand(grid)]  # noqa: E731
    assert names() == ["id_only-s0", "id_only-m_max=30-s0", "text_only-s0", "text_only-m_max=30-s0",
                       "P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-s1", "text_only-s1"]
    for s in expand(grid)[:2]:  # ID only's seed 0 has run: the switch is better on validation
        s.run_dir.mkdir(parents=True)
        valid = 0.05 + 0.01 * bool(s.extra)
        (s.run_dir / "summary.json").write_text(json.dumps({"selection": "id/ndcg@10",
                                                            "valid": {"id": {"ndcg@10": valid}}}))
    assert names()[2:] == ["id_only-m_max=30-s1", "text_only-s0", "text_only-m_max=30-s0",
                           "P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-s1", "text_only-s1"]


def test_round_two_runs_after_the_peers_and_its_winner_then_runs_on_the_other_seeds(tmp_path):
    grid = load_grid(tiny_peer_grid(tmp_path, '''
        rounds = 2
        methods = ["id_only"]
        select = ["train.m_max", "train.m_gap", "train.patience"]
        [[dataset.sweep]]
        key = "train.m_max"
        values = [30]
        [[dataset.sweep]]
        key = "train.m_gap"
        values = [1]
        [[dataset.sweep]]
        key = "train.patience"
        values = [3]'''))

    def finish(name: str, valid: float) -> None:
        [s] = [s for s in expand(grid) if s.run_dir.name == name]
        s.run_dir.mkdir(parents=True)
        (s.run_dir / "summary.json").write_text(json.dumps({"selection": "id/ndcg@10",
                                                            "valid": {"id": {"ndcg@10": valid}}}))
    for name, valid in [("id_only-s0", 0.05), ("id_only-m_max=30-s0", 0.06), ("id_only-m_gap=1-s0", 0.06),
                        ("id_only-patience=3-s0", 0.04), ("id_only-combined-s0", 0.07)]:
        finish(name, valid)
    todo = lambda: [s.run_dir.name for s in expand(grid) if not s.done]  # noqa: E731
    # round 1's winner stands (its other seed first) while round 2 waits behind the peers
    assert todo() == ["id_only-combined-s1", "P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-round2-patience=3-s0",
                      "id_only-s1"]
    finish("id_only-round2-patience=3-s0", 0.08)
    assert todo() == ["P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-round2-patience=3-s1", "id_only-s1"]


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


def test_configs_scientific_holds_what_the_paper_grid_chose_for_alterrec():
    """configs/scientific.toml is the grid's base (configs/scientific_paper.toml) with the grid's own settings
    (epoch budget, alpha chosen on validation) and AlterRec's candidate chosen on validation (the base until
    the grid has chosen), so `--config configs/scientific.toml` runs the headline setting."""
    grid = load_grid(PROJECT_ROOT / "configs/experiments/paper.toml")
    [d] = [d for d in grid.datasets if d.name == "scientific"]
    choice = choose(expand(grid), d, "alterrec")
    chosen = method_config(d, "alterrec", choice.runs[0].extra if choice else [])
    assert asdict(load_config(PROJECT_ROOT / "configs/scientific.toml")) == asdict(chosen)


def test_the_carryover_check_runs_configs_scientific_as_it_is_on_other_data():
    """configs/experiments/carryover.toml checks whether scientific.toml's settings carry: each method's config
    there is scientific.toml's but for the data, the method, and only what that method needs to take it at all."""
    grid = load_grid(PROJECT_ROOT / "configs/experiments/carryover.toml")
    [d] = grid.datasets
    specs = expand(grid)
    assert sorted(s.run_dir.name for s in specs) == sorted(
        [f"{m}-s{seed}" for m in ("alterrec", "id_only", "nfrec_sum") for seed in (0, 1, 2)] + ["SASRec-s0"])
    base = asdict(load_config(PROJECT_ROOT / "configs/scientific.toml"))
    needs = {"alterrec": {}, "id_only": {("train", "reject_worse"): False},
             "nfrec_sum": {("train", "reject_worse"): False, ("model", "text_logits"): "dot"}}
    for method, own in needs.items():
        cfg = asdict(method_config(d, method))
        differ = {(section, key): value for section, values in cfg.items() for key, value in values.items()
                  if base[section][key] != value}
        assert differ == {("data", "path"): "data/synth-sparse", **({("train", "method"): method}
                                                                   if method != "alterrec" else {}), **own}, method


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
    with pytest.raises(ConfigError, match=r"grid.toml: dataset 'def', method text_only: train.lr_text must be"):
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


@pytest.mark.parametrize("report, refusal", [
    ("{grid}", "must be a Markdown file"),  # it replaced the grid file with the report
    ("configs/default.toml", "must be a Markdown file"),
    ("{tmp}/runs/d", "must be a Markdown file"),
    ("{tmp}/grid.md", "holds the input"),  # a grid file named .md
])
def test_a_report_that_would_replace_what_the_grid_reads_is_refused_before_any_run(tmp_path, report, refusal):
    grid = tmp_path / ("grid.md" if report.endswith("grid.md") else "grid.toml")
    one_dataset_grid(grid, 'methods = ["id_only"]', f'report = "{report.format(grid=grid, tmp=tmp_path)}"')
    text = grid.read_text()
    with pytest.raises(ConfigError, match=rf"{grid}: report.*{refusal}"):
        load_grid(grid)
    assert grid.read_text() == text


def one_dataset_grid(grid: Path, dataset: str, head: str = "", name: str = "d") -> Path:
    """A grid file at `grid` of one dataset `name` on configs/default.toml, its runs beside the file: `head`
    lines before the dataset, `dataset` lines in it."""
    grid.write_text(f'out = "{grid.parent}/runs"\n{head}\n[[dataset]]\nname = "{name}"\n'
                    f'config = "configs/default.toml"\n{textwrap.dedent(dataset)}\n')
    return grid


@pytest.mark.parametrize("dataset, peer", [("../escape", "P"), ("a/b", "P"), ("..", "P"), ("d", "../P"), ("d", "")])
def test_a_dataset_or_peer_name_that_is_not_a_plain_directory_name_is_refused(tmp_path, dataset, peer):
    """`name = "../escape"` put the dataset's runs, and their locks, outside the grid's out."""
    grid = one_dataset_grid(tmp_path / "grid.toml", f'''
        methods = ["id_only"]
        [[dataset.peer]]
        name = "{peer}"
        command = ["true"]
    ''', name=dataset)
    bad = dataset if dataset != "d" else peer
    with pytest.raises(ConfigError, match=rf"name '{re.escape(bad)}' must be a plain directory name"):
        load_grid(grid)


def test_grid_mistakes_that_surfaced_only_as_runs_started_are_refused_as_the_grid_is_read(tmp_path):
    """A sweep of an unknown setting was an AttributeError traceback; two datasets of one name shared their runs
    (the later entry's settings reported under both); an `out` inside a dataset started every run to fail, each
    after the runner had written its lock and log into the dataset."""
    sweep = one_dataset_grid(tmp_path / "sweep.toml", '''
        methods = ["id_only"]
        [[dataset.sweep]]
        key = "model.nosuchkey"
        values = [1, 2]
    ''')
    with pytest.raises(ConfigError, match=r"\[\[dataset.sweep\]\]: unknown key model.nosuchkey"):
        load_grid(sweep)
    for label in ("cos.v2", "train.lr"):  # a variants sweep's key is a free label, dots and a section's name too
        variants = one_dataset_grid(tmp_path / "variants.toml", f'''
            methods = ["id_only"]
            [[dataset.sweep]]
            key = "{label}"
            variants = {{ a = ["model.dropout=0.2"] }}
        ''')
        assert any(s.run_dir.name.endswith("=a-s0") for s in expand(load_grid(variants)))
    twice = tmp_path / "twice.toml"
    twice.write_text(one_dataset_grid(tmp_path / "one.toml", 'methods = ["id_only"]').read_text()
                     + '[[dataset]]\nname = "d"\nconfig = "configs/default.toml"\nmethods = ["alterrec"]\n')
    with pytest.raises(ConfigError, match="two \\[\\[dataset\\]\\] entries are named 'd'"):
        load_grid(twice)
    inside = one_dataset_grid(tmp_path / "inside.toml", 'methods = ["id_only"]\nset = ["data.path=%s"]' % tmp_path)
    with pytest.raises(ConfigError, match=r"out .*/runs lies in the data of dataset 'd'"):
        expand(load_grid(inside))


def test_a_run_made_under_an_earlier_range_is_stale_not_a_stop(tmp_path):
    """A finished run whose config.toml an earlier version accepted (alpha_sweep [0.0, 0.5, 0.5, 1.0], before
    repeated values were refused) stopped --dry-run, --report-only and every run of the grid, even once the grid
    was fixed, naming no file. It is a run made otherwise than the grid now asks: stale."""
    from alterrec_dist.common.config import load_config, to_toml
    from alterrec_dist.grid.runner import settings_differ

    grid = load_grid(one_dataset_grid(tmp_path / "grid.toml", 'methods = ["alterrec"]\n'
                                      'set = ["eval.alpha_sweep=[0.0,0.5,1.0]"]'))
    spec = expand(grid)[0]  # seed 0
    spec.run_dir.mkdir(parents=True)
    old = load_config(None, ["eval.alpha_sweep=[0.0,0.5,1.0]"])
    old.eval.alpha_sweep = [0.0, 0.5, 0.5, 1.0]  # as the earlier version wrote it
    (spec.run_dir / "config.toml").write_text(to_toml(old))
    (spec.run_dir / "summary.json").write_text("{}")
    assert settings_differ(spec)["eval.alpha_sweep"] == ([0.0, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0])


def test_a_report_goes_into_a_folder_made_for_it(tmp_path):
    """A report in a folder that did not exist was a FileNotFoundError traceback after the runs had trained,
    unless a plot had happened to make the folder."""
    from alterrec_dist.grid.report import write_report

    grid = load_grid(one_dataset_grid(tmp_path / "grid.toml", 'methods = ["id_only"]',
                                      head=f'report = "{tmp_path}/new/RESULTS.md"'))
    write_report(grid, expand(grid), "grid.toml")
    assert (tmp_path / "new" / "RESULTS.md").read_text().startswith("# ")


def test_a_sweep_value_with_a_slash_cannot_put_a_run_outside_its_dataset(tmp_path):
    grid = one_dataset_grid(tmp_path / "grid.toml", '''
        methods = []
        [[dataset.peer]]
        name = "P"
        command = ["true"]
        [[dataset.peer.sweep]]
        key = "path"
        values = ["../../../escape"]
    ''')
    with pytest.raises(ConfigError, match=r"the run directory .* of 'P' is not one name under its dataset's"):
        expand(load_grid(grid))
