"""The grid runner behind `python -m alterrec_dist.experiments`: a grid file expanded into one run per
method x dataset x seed (plus sweeps and peer baselines), each through the normal driver.

Tuning (a dataset's `select` keys): each method's sweeps over them run on the selection seeds
(`select_seeds`), then (`combine`) the switches that helped together, then (`rounds`) further rounds: the
winner so far with each other switch on top. Once a round has finished, the setting chosen on validation
(grid/selection.py) runs on the dataset's other seeds too, so the chosen settings are reported over every seed.

A run is done when its directory holds `summary.json` (a peer: `result.json`). The paper grid's
directories are under `results/`, whose .gitignore keeps each finished run's record (summary, per-epoch
metrics, resolved config, command) in git and the rest (checkpoints, models, logs) on the machine: the grid
goes on over sessions and machines, and its report regenerates from a clean checkout. A half-finished
training run goes on from its newest checkpoint (`train --resume auto`), a half-finished peer from the
state its own command keeps in its directory (bench/recbole_peer.py: `resume.pth`). So an interrupted grid
resumes where it stopped. Each run's
exact command is written to `command.txt` beside its results.

Several runners may work on one grid at once (another `--jobs`, another machine on the same file system):
a runner holds an exclusive lock on `<run dir>.lock` while it runs that run, and skips the runs whose lock
another holds (`claim`). The OS drops the lock when its holder dies, so a killed runner blocks nothing.
A runner given `only` (a glob on the run directories) runs those runs alone, ahead of their turn in the
grid's order, while another runner works through the rest.
"""
from __future__ import annotations

import fcntl
import fnmatch
import json
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
from dataclasses import dataclass, field
from pathlib import Path

from alterrec_dist.common import run_layout
from alterrec_dist.common.config import (PROJECT_ROOT, changed_values, load_config, load_saved_config, read_toml,
                                         setting_type, shown)
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import check_file_out, within
from alterrec_dist.common.methods import METHODS
from alterrec_dist.grid.selection import candidates, choose, helpful_switches, next_round, selection_seeds


@dataclass
class RunSpec:
    """One training (or peer) run of the grid: where it goes and the command that makes it."""
    dataset: str
    label: str                 # method, or method + swept setting, or peer name
    seed: int
    run_dir: Path
    command: list[str]
    done_file: str = run_layout.SUMMARY
    role: str = "method"       # "method" | "sweep" | "peer"
    method: str = ""
    sweeps: dict[str, object] = field(default_factory=dict)  # swept key -> this run's value (several if shared)
    extra: list[str] = field(default_factory=list)            # the --set overrides of its sweep point
    combined: dict[str, object] = field(default_factory=dict)  # a combined candidate: its switches, key -> value
    tuning_round: int = 1      # n >= 2: a round-n candidate (the winner so far with one more switch)

    @property
    def done(self) -> bool:
        """Finished: its result file is there and reads as JSON. One cut short is not done: the run goes again
        (a training run's resume rewrites it), rather than counting as done and failing the report hours later."""
        try:
            json.loads((self.run_dir / self.done_file).read_text())
        except (OSError, ValueError):
            return False
        return True

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")

    @property
    def lock(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".lock")


@dataclass
class DatasetGrid:
    name: str
    title: str
    config: str
    methods: list[str]
    seeds: list[int]
    sets: list[str] = field(default_factory=list)
    method_sets: dict[str, list[str]] = field(default_factory=dict)
    prepare: list[str] = field(default_factory=list)
    note: str = ""
    sweeps: list[dict] = field(default_factory=list)
    peers: list[dict] = field(default_factory=list)
    anchors: list[dict] = field(default_factory=list)
    select: list[str] = field(default_factory=list)  # swept keys whose value each method picks on validation
    select_seeds: list[int] = field(default_factory=list)  # seeds the select sweeps run on; empty: all
    tuned: list[str] = field(default_factory=list)  # methods a sweep without method(s) tunes; empty: all
    combine: bool = False  # also try, per method and peer, the switches that beat its base, together
    rounds: int = 1        # up to this many rounds: each after the first, the winner with one more switch


@dataclass
class Grid:
    path: Path
    out: Path
    report: Path
    images: Path
    jobs: int
    threads: int
    datasets: list[DatasetGrid]
    title: str  # the report's heading


# A grid file's keys and the type of each value: a key not here is a typo (`sets` for `set`), not ignored.
GRID_KEYS = {"seeds": list, "dataset": list, "out": str, "report": str, "images": str, "jobs": int, "threads": int,
             "title": str}
DATASET_KEYS = {"name": str, "title": str, "config": str, "methods": list, "seeds": list, "set": list,
                "method_set": dict, "prepare": list, "note": str, "sweep": list, "peer": list, "anchor": list,
                "select": list, "select_seeds": list, "tuned": list, "combine": bool, "rounds": int}

TYPE_WORDS = {list: "a list", dict: "a table", str: "a string", int: "an integer", bool: "true or false"}


def _checked(table: dict, keys: dict[str, type], where: str) -> dict:
    """`table` with each key known and each value of its type (ConfigError in one line otherwise)."""
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(keys)})")
        typ = keys[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} must be {TYPE_WORDS[typ]}, got {value!r}")
    for key in ("jobs", "threads", "rounds"):
        if table.get(key, 1) < 1:
            raise ConfigError(f"{where}: {key} must be >= 1, got {table[key]}")
    for key in ("seeds", "select_seeds"):
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in table.get(key, [])):
            raise ConfigError(f"{where}: {key} must be a list of seeds (integers >= 0), got {table[key]!r}")
    if "name" in table:
        _check_plain_name(table["name"], where)
    return table


def _check_plain_name(name: str, where: str) -> None:
    """A dataset's name is a directory under the grid's out, and a peer's starts its runs' directory names under
    it: `../x` put their runs, and their locks, outside it."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: name {name!r} must be a plain directory name (no '/', not '..')")


def load_grid(path: str | Path) -> Grid:
    """The grid file, checked whole before any run: every key known, every value of its type, every method
    and sweep named (a typo in the last method would otherwise surface after the others had trained)."""
    path = Path(path)
    doc = _checked(read_toml(path, "grid"), GRID_KEYS, str(path))
    seeds = doc.get("seeds", [0, 1, 2])
    datasets = []
    for i, d in enumerate(doc.get("dataset", []), 1):
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: [[dataset]] {i}: not a table")
        where = f"{path}: [[dataset]] {d.get('name', i)!r}"
        _checked(d, DATASET_KEYS, where)
        unknown = [m for m in d.get("methods", []) if m not in METHODS]
        if unknown:
            raise ConfigError(f"{where}: unknown method(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(METHODS)})")
        if any(not isinstance(sw, dict) or "key" not in sw for sw in d.get("sweep", [])):
            raise ConfigError(f"{where}: a [[dataset.sweep]] entry without its key")
        for sw in d.get("sweep", []):
            if "variants" not in sw:  # a variants sweep's key is a free label; a values sweep's, a setting
                setting_type(*sw["key"].partition(".")[::2], f"{where}: [[dataset.sweep]]")
        for peer in d.get("peer", []):
            if not isinstance(peer, dict) or not isinstance(peer.get("name"), str):
                raise ConfigError(f"{where}: a [[dataset.peer]] entry without a name")
            _check_plain_name(peer["name"], f"{where}: [[dataset.peer]]")
        try:
            datasets.append(DatasetGrid(
                name=d["name"], title=d.get("title", d["name"]), config=d["config"], methods=d["methods"],
                seeds=d.get("seeds", seeds), sets=d.get("set", []), method_sets=d.get("method_set", {}),
                prepare=d.get("prepare", []),
                note=d.get("note", ""), sweeps=d.get("sweep", []), peers=d.get("peer", []),
                anchors=d.get("anchor", []), select=d.get("select", []), select_seeds=d.get("select_seeds", []),
                tuned=d.get("tuned", []), combine=d.get("combine", False),
                rounds=d.get("rounds", 1)))
        except KeyError as e:
            raise ConfigError(f"{path}: [[dataset]] entry misses key {e}") from None
    if not datasets:
        raise ConfigError(f"{path}: no [[dataset]] entries")
    names = [d.name for d in datasets]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:  # its runs go in out/<name>: the later entry's replaced the earlier's, in both sections
        raise ConfigError(f"{path}: two [[dataset]] entries are named {twice!r} (each names its runs' directory)")
    root = PROJECT_ROOT
    grid = Grid(path, root / doc.get("out", f"results/{path.stem}"),
                root / doc.get("report", "docs/RESULTS.md"), root / doc.get("images", "docs/img"),
                doc.get("jobs", 1), doc.get("threads", 1), datasets,
                doc.get("title", "Results: AlterRec against its baselines and peers, on real data"))
    _check_report(grid)
    return grid


def _check_report(grid: "Grid") -> None:
    """The report is a Markdown file the grid writes whole, and nothing it reads: `report` naming the grid
    file itself replaced it with the report, and the grid was gone."""
    if grid.report.suffix.lower() != ".md":
        raise ConfigError(f"{grid.path}: report {shown(grid.report)} must be a Markdown file (.md)")
    if within(grid.out, grid.report):  # holding the runs (a report inside out, beside them, is fine)
        raise ConfigError(f"{grid.path}: report {shown(grid.report)} holds the grid's runs ({shown(grid.out)})")
    try:
        check_file_out(grid.report, True, [grid.path, *(PROJECT_ROOT / d.config for d in grid.datasets)])
    except DataError as e:
        raise ConfigError(f"{grid.path}: report: {e}") from None


# How every run of a grid is launched: one worker through the torchrun launcher (W=2 computes the same; see the
# parity tests). `method_config` checks a run's settings as launched so.
ONE_WORKER = "trainer.num_workers=1"
LAUNCHER = "torchrun"  # every run of ours: the world is torchrun's (`train.load_run_config`)


def train_command(d: DatasetGrid, method: str, seed: int, run_dir: Path, extra: list[str] = ()) -> list[str]:
    """The normal driver, one worker through the torchrun launcher. `--resume auto`: a run directory that an
    interrupted attempt started goes on from its newest checkpoint."""
    sets = [ONE_WORKER, f"train.method={method}", f"train.seed={seed}", *d.sets, *d.method_sets.get(method, []),
            *extra]
    cmd = [sys.executable, "-m", "alterrec_dist.train", "--launcher", LAUNCHER, "--config", d.config]
    for s in sets:
        cmd += ["--set", s]
    return cmd + ["--out", str(run_dir), "--resume", "auto"]


def settings_differ(spec: RunSpec) -> dict[str, tuple]:
    """How a finished run of ours was made otherwise than its command in the grid now makes it: config key ->
    (the grid's value, the run's), from the config its `train_command` resolves to and the run's config.toml;
    empty when they agree (always for a peer or an unfinished run). After an edit of the grid file the old runs
    would otherwise be reported, and skipped as done, under the new settings."""
    if spec.role == "peer" or not spec.done:
        return {}
    cmd = spec.command
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    wanted = load_config(PROJECT_ROOT / cmd[cmd.index("--config") + 1],
                         [*sets, f"trainer.launcher={LAUNCHER}"])
    return changed_values(wanted, load_saved_config(spec.run_dir / run_layout.CONFIG))


def sweep_run(d: DatasetGrid, method: str, label: str, seed: int, run_dir: Path, extra: list[str], **kw) -> RunSpec:
    """A method's training run with overrides on top of its config: a sweep point, or a combination."""
    return RunSpec(d.name, label, seed, run_dir, train_command(d, method, seed, run_dir, extra), role="sweep",
                   method=method, extra=list(extra), **kw)


def peer_run(d: DatasetGrid, name: str, seed: int, run_dir: Path, command: list[str], sets: list[str],
             **kw) -> RunSpec:
    """A peer's run from its own command, with its KEY=VALUE settings passed as --set."""
    args = [a for item in sets for a in ("--set", item)]
    return RunSpec(d.name, name, seed, run_dir, [*command, *args, "--seed", str(seed), "--out", str(run_dir)],
                   done_file="result.json", role="peer", method=name, extra=list(sets), **kw)


def sweep_methods(d: DatasetGrid, sw: dict) -> list[str]:
    """The methods a sweep tunes: its `method`, its `methods`, or (neither) the dataset's `tuned` methods
    (default: all), which is how a grid gives each method the same tuning budget over the same switches."""
    if "method" in sw:
        return [sw["method"]]
    return sw.get("methods", d.tuned or d.methods)


def sweep_points(sw: dict, default) -> list[tuple[object, list[str]]]:
    """(value, the --set overrides that make it) per point of a sweep; [] means the base config.
    `values` sweep one config key; `variants` name bundles of overrides (e.g. cosine logits + temperature)."""
    if "variants" in sw:
        return list(sw["variants"].items())
    return [(value, [] if value == default else [f"{sw['key']}={as_toml(value)}"]) for value in sw["values"]]


def as_toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def point_name(key: str, value) -> str:
    """A sweep point in a run directory's name: `model.dropout` = 0.1 is `dropout=0.1`."""
    return f"{key.partition('.')[2] or key}={as_toml(value)}"


def method_config(d: DatasetGrid, method: str, extra: list[str] = (), launched: bool = False):
    """A method's config in this grid (raises ConfigError where the overrides do not fit it); `launched`: as its
    runs are launched, which is what checks whether one can start (checked at the default two workers, a global
    batch of 999 was refused)."""
    # last: under torchrun the world is torchrun's, whatever the grid's sets say (`train.load_run_config`)
    launch = [f"trainer.launcher={LAUNCHER}", ONE_WORKER] if launched else []
    return load_config(PROJECT_ROOT / d.config, [f"train.method={method}", *d.sets, *d.method_sets.get(method, []),
                                                 *extra, *launch])


def key_value(cfg, sw: dict):
    """The value of the setting a values sweep varies; None for a variants sweep, whose key is a free label (e.g.
    "logits", or "train.lr": dots and all)."""
    if "variants" in sw:
        return None
    section, _, name = sw["key"].partition(".")
    return getattr(getattr(cfg, section), name)  # a setting: load_grid checked it


def expand(grid: Grid) -> list[RunSpec]:
    """Every run of the grid; a sweep point equal to the base config reuses the method's run, and a
    point a method's config refuses (e.g. cosine logits for NFRec's one fused network) is left out."""
    specs: dict[Path, RunSpec] = {}
    for d in grid.datasets:
        base = grid.out / d.name
        for method in d.methods:
            try:  # its `set` and `method_set` checked before any run, as the sweeps' points are
                cfg = method_config(d, method, launched=True)
            except ConfigError as e:
                raise ConfigError(f"{grid.path}: dataset {d.name!r}, method {method}: {e}") from None
            data = cfg.resolve_path(cfg.data.path)
            if within(grid.out, data):  # every run refused to start there, after the runner had written its lock
                raise ConfigError(f"{grid.path}: out {shown(grid.out)} lies in the data of dataset {d.name!r} "
                                  f"({shown(data)}), which its next prepare --overwrite replaces whole")
            for seed in d.seeds:
                run_dir = base / f"{method}-s{seed}"
                specs[run_dir] = RunSpec(d.name, method, seed, run_dir, train_command(d, method, seed, run_dir),
                                         method=method)
        for sw in d.sweeps:
            key = sw["key"]
            refused: dict[str, list[str]] = {}  # point -> why each method's config refused it
            for method in sweep_methods(d, sw):
                for value, extra in sweep_points(sw, key_value(method_config(d, method, launched=True), sw)):
                    try:
                        method_config(d, method, extra, launched=True)
                    except ConfigError as e:
                        refused.setdefault(str(value), []).append(str(e))
                        continue
                    for seed in sw.get("seeds", d.select_seeds if key in d.select and d.select_seeds else d.seeds):
                        stem = f"{method}-{point_name(key, value)}" if extra else method
                        run_dir = base / f"{stem}-s{seed}"
                        spec = specs.get(run_dir) or sweep_run(d, method, f"{method} {key}={value}", seed,
                                                               run_dir, extra)
                        spec.sweeps[key] = value
                        specs[run_dir] = spec
            for value, why in refused.items():
                if len(why) == len(sweep_methods(d, sw)):  # a typo, not a point that fits only some methods
                    raise ConfigError(f"{grid.path}: sweep {key} = {value} fits no method: {why[0]}")
        for method in d.methods:
            for spec in combined_runs(d, method, list(specs.values())):
                specs.setdefault(spec.run_dir, spec)
            for spec in refined_runs(d, method, list(specs.values())):
                specs.setdefault(spec.run_dir, spec)
        for method in d.methods:
            for spec in confirm_runs(d, method, list(specs.values())):
                specs.setdefault(spec.run_dir, spec)
        for peer in d.peers:
            cmd = [part.replace("{python}", sys.executable) for part in peer["command"]]
            for key, value, sets in [("", "", []), *peer_points(peer)]:
                for seed in peer.get("seeds", d.seeds):
                    run_dir = base / "peers" / (f"{peer['name']}-{key}={value}-s{seed}" if sets
                                                else f"{peer['name']}-s{seed}")
                    specs[run_dir] = peer_run(d, peer["name"], seed, run_dir, cmd, sets,
                                              sweeps={key: value} if sets else {})
            for spec in combined_runs(d, peer["name"], list(specs.values()), cmd):
                specs.setdefault(spec.run_dir, spec)
            for spec in refined_runs(d, peer["name"], list(specs.values()), cmd):
                specs.setdefault(spec.run_dir, spec)
    for spec in specs.values():  # a sweep value's '/' (or '..') in a name put its run elsewhere
        where = spec.run_dir.relative_to(grid.out / spec.dataset).parent
        if where not in (Path("."), Path("peers")):
            raise ConfigError(f"{grid.path}: the run directory {shown(spec.run_dir)} of {spec.label!r} is not one "
                              "name under its dataset's (a '/' in a sweep value: name the point as a variant)")
    return run_order(grid, list(specs.values()))


def tuning_group(spec: RunSpec, first_round_group: int) -> int:
    """`run_order`'s group for a tuning run: a later round waits behind every method's and peer's round 1."""
    return 2 if spec.tuning_round > 1 else first_round_group


def run_order(grid: Grid, specs: list[RunSpec]) -> list[RunSpec]:
    """The order runs start in. On this machine the grid is days of CPU spread over sessions, so what a
    result waits for goes first:
      0. each tuned method in the grid's order: its round-1 candidates on the selection seeds, then, once it
         is chosen, the chosen setting's other seeds, so the first method's result is whole as early as it
         can be, before the next method starts;
      1. the peers: their candidates (or their one run) and chosen runs;
      2. the later rounds (`rounds`), methods then peers, each with its chosen setting's other seeds;
      3. the rest: the sensitivity sweeps, untuned methods, base runs on seeds no choice needs.
    Datasets in the grid's order within each. `run_grid` re-reads it after each finished run."""
    place: dict[Path, tuple[int, int]] = {}  # run -> (group, 0 candidate | 1 chosen setting's other seed)
    rank: dict[str, int] = {}  # method or peer -> its place in the grid
    for d in grid.datasets:
        names = [(m, 0) for m in d.methods] + [(p["name"], 1) for p in d.peers]
        for name, group in names:
            rank.setdefault(name, len(rank))
            cands = candidates(specs, d, name)
            if len(cands) < 2 and group == 0:  # an untuned method: no result waits for its runs
                continue
            seeds = selection_seeds(cands, d)
            for runs in cands.values():
                for s in runs:
                    place.setdefault(s.run_dir, (tuning_group(s, group), 0) if s.seed in seeds else (3, 0))
            choice = choose(specs, d, name)
            for s in choice.runs if choice else []:
                place[s.run_dir] = min(place[s.run_dir], (tuning_group(s, group), 1))
    datasets = [d.name for d in grid.datasets]

    def key(s: RunSpec) -> tuple:
        group, chosen = place.get(s.run_dir, (3, 0))
        return group, datasets.index(s.dataset), rank.get(s.method, 0), chosen, s.seed
    return sorted(specs, key=key)


def peer_points(peer: dict) -> list[tuple[str, object, list[str]]]:
    """(key, value, the peer's own KEY=VALUE settings) per point of its sweeps, which tune it on
    validation as `select` tunes a method: `values` of one key of its config, or named `variants`."""
    points = []
    for sw in peer.get("sweep", []):
        if "variants" in sw:
            points += [(sw["key"], name, sets) for name, sets in sw["variants"].items()]
        else:
            points += [(sw["key"], value, [f"{sw['key']}={as_toml(value)}"]) for value in sw["values"]]
    return points


def combined_runs(d: DatasetGrid, name: str, specs: list[RunSpec], peer_command: list[str] = ()) -> list[RunSpec]:
    """With `combine`: a method's (or peer's) switches that beat its base on validation, all together, as one
    more candidate on the selection seeds; none until the single switches have all finished, or where
    fewer than two helped (the combination would be one of them) or the method's config refuses it."""
    switches = helpful_switches(specs, d, name) if d.combine else None
    if not switches or len(switches) < 2:
        return []
    extra = [override for _, _, run in switches for override in run.extra]
    combined = {key: value for key, value, _ in switches}
    return candidate_runs(d, name, specs, switches[0][2], f"{name}-combined", extra, combined, 1, peer_command)


def refined_runs(d: DatasetGrid, name: str, specs: list[RunSpec], peer_command: list[str] = ()) -> list[RunSpec]:
    """Rounds 2..`rounds`' candidates on the selection seeds (grid/selection.py `next_round`), one per switch
    the winner so far lacks; a round's none until the rounds before it have finished, round 1's combination
    included."""
    known = {s.run_dir for s in specs}
    if any(s.run_dir not in known for s in combined_runs(d, name, specs, peer_command)):
        return []
    runs: list[RunSpec] = []
    for n in range(2, d.rounds + 1):
        so_far = [*specs, *runs]
        step = next_round(so_far, d, name, n)
        if step is None or not step[1]:
            break
        winner, settings = step
        runs += [run for key, value, setting, extra in settings
                 for run in candidate_runs(d, name, so_far, winner, f"{name}-round{n}-{point_name(key, value)}",
                                           extra, setting, n, peer_command)]
    return runs


def candidate_runs(d: DatasetGrid, name: str, specs: list[RunSpec], template: RunSpec, stem: str, extra: list[str],
                   setting: dict, tuning_round: int, peer_command: list[str]) -> list[RunSpec]:
    """A candidate made of several switches (`setting`, made by the overrides `extra`), on the selection seeds,
    in `stem`-s<seed> beside `template` (one of its method's or peer's runs); none where a method's config
    refuses it."""
    if template.role != "peer":
        try:
            method_config(d, name, extra, launched=True)
        except ConfigError:
            return []
    runs = []
    for seed in selection_seeds(candidates(specs, d, name), d):
        run_dir = template.run_dir.with_name(f"{stem}-s{seed}")
        kw = dict(combined=dict(setting), tuning_round=tuning_round)
        runs.append(peer_run(d, name, seed, run_dir, peer_command, extra, **kw) if template.role == "peer" else
                    sweep_run(d, name, f"{name} {stem.removeprefix(name + '-')}", seed, run_dir, extra, **kw))
    return runs


def confirm_runs(d: DatasetGrid, method: str, specs: list[RunSpec]) -> list[RunSpec]:
    """The chosen sweep point on the seeds it has not run on (none until the choice is made), and any other
    candidate's runs on those seeds that have finished: a former choice's, which a later round replaced,
    stay in the grid (and its report) rather than drop out of it."""
    choice = choose(specs, d, method)
    runs = []
    for label, cands in candidates(specs, d, method).items():
        if not cands or cands[0].role != "sweep":  # the base runs every seed already
            continue
        template, have = cands[0], {s.seed for s in cands}
        stem = template.run_dir.name.rsplit("-s", 1)[0]
        for seed in (s for s in d.seeds if s not in have):
            run = sweep_run(d, method, template.label, seed, template.run_dir.with_name(f"{stem}-s{seed}"),
                            template.extra, sweeps=dict(template.sweeps), combined=dict(template.combined),
                            tuning_round=template.tuning_round)
            if (choice and label == choice.chosen) or run.done:
                runs.append(run)
    return runs


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
    fd = os.open(spec.lock, os.O_RDWR | os.O_CREAT, 0o644)
    if fd < 3:  # a runner started with stdin/stdout closed: the child's stdin/stdout would replace it there
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fd)
        fd = moved
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
        (spec.run_dir / run_layout.COMMAND).write_text(shown_command(spec.command) + "\n")
    return spec, rc, seconds


def shown_command(command: list[str]) -> str:
    """A run's command as a user would type it from the project root: its record is committed and read
    on other machines, where this one's interpreter and checkout paths mean nothing."""
    parts = ["python" if part == sys.executable else str(shown(Path(part))) if part.startswith("/") else part
             for part in command]
    return shlex.join(parts)


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
            skip = {s.run_dir for s in failed} | {d for d, _ in running.values()}
            todo = [s for s in specs if not s.done and s.run_dir not in skip and selected(s, grid, only)]
            if not running:
                if not todo:
                    return specs, failed
                print(f"{sum(s.done for s in specs)} of {len(specs)} runs already done; {len(todo)} to run, "
                      f"{grid.jobs} at a time", flush=True)
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
                      f"{'' if ok else f', exit {rc}, see {spec.log}'}", flush=True)
                if not ok:
                    failed.append(spec)
