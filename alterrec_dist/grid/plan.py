"""What a grid runs: its file expanded into one run per method x dataset x seed, plus sweeps, peer baselines
and the tuning rounds' candidates, each with the exact command that makes it, in the order they start.

Tuning (a dataset's `select` keys): each method's sweeps over them run on the selection seeds
(`select_seeds`), then (`combine`) the switches that helped together, then (`rounds`) further rounds: the
winner so far with each other switch on top. Once a round has finished, the setting chosen on validation
(grid/selection.py) runs on the dataset's other seeds too, so the chosen settings are reported over every seed.
`expand` is asked again after every finished run, so the later candidates appear as the earlier finish.
"""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alterrec_dist.common import run_layout
from alterrec_dist.common.config import PROJECT_ROOT, changed_values, load_config, load_saved_config, shown
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.common.files import within
from alterrec_dist.grid.grid_file import DatasetGrid, Grid
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
    (default: all), which is how a grid tunes several methods over shared switches (a method's own sweeps, and the
    points its config refuses, make their budgets differ)."""
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


def shown_command(command: list[str]) -> str:
    """A run's command as a user would type it from the project root: its record is committed and read
    on other machines, where this one's interpreter and checkout paths mean nothing."""
    parts = ["python" if part == sys.executable else str(shown(Path(part))) if part.startswith("/") else part
             for part in command]
    return shlex.join(parts)
