"""Experiment grids: methods x datasets x seeds (plus sweeps and peer baselines) through the normal
driver, resumable, then the report (`docs/RESULTS.md` and its plots) from the run directories alone.

    python -m alterrec_dist.experiments --grid configs/experiments/paper.toml            # run + report
    python -m alterrec_dist.experiments --grid configs/experiments/paper.toml --report-only
    python -m alterrec_dist.experiments --grid configs/experiments/paper.toml --dry-run  # list commands
    python -m alterrec_dist.experiments --grid configs/experiments/paper.toml --only 'scientific/alterrec-round2-*'

The command line only: the grid file is read by `grid/grid_file.py`, its runs listed by `grid/plan.py`,
run by `grid/runner.py` and reported by `grid/report.py`.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from alterrec_dist.common.cli import ArgumentParser, run_cli
from alterrec_dist.common.config import shown
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.grid.grid_file import load_grid
from alterrec_dist.grid.plan import expand, settings_differ
from alterrec_dist.grid.runner import prepare_datasets, run_grid, selected, under_way


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m alterrec_dist.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True, help="grid TOML, e.g. configs/experiments/paper.toml")
    p.add_argument("--report-only", action="store_true", help="write the report from existing runs; train nothing")
    p.add_argument("--dry-run", action="store_true", help="print each run's state and command; run nothing")
    p.add_argument("--jobs", type=int, help="runs at once (overrides the grid's jobs)")
    p.add_argument("--only", metavar="GLOB", help="only the runs whose directory under the grid's out matches, "
                   "e.g. 'scientific/alterrec-round2-*': run them ahead of their turn beside another runner")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grid = load_grid(args.grid)
    if args.jobs is not None:
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        grid.jobs = args.jobs
    specs = expand(grid)
    if args.only and not any(selected(s, grid, args.only) for s in specs):
        raise ConfigError(f"{args.grid}: --only {args.only!r} matches none of the grid's {len(specs)} runs "
                          f"(a glob on their directories under {shown(grid.out)}: DATASET/RUN or "
                          f"DATASET/peers/RUN, e.g. 'scientific/alterrec-round2-*')")
    differ = {s.run_dir: settings_differ(s) for s in specs}
    if args.dry_run:
        for s in (s for s in specs if selected(s, grid, args.only)):
            state = "STALE" if differ[s.run_dir] else "done" if s.done else "busy" if under_way(s) else "todo"
            print(f"{state}  {shlex.join(s.command)}")
        return 0
    stale = [(run_dir, changes) for run_dir, changes in differ.items() if changes]
    if stale:
        run_dir, changes = stale[0]
        key, (wanted, made) = next(iter(changes.items()))
        raise ConfigError(f"{shown(run_dir)}: finished with other settings than {args.grid} gives it ({key}: "
                          f"{made!r} in the run, {wanted!r} in the grid; {len(stale)} run(s) differ, --dry-run lists "
                          "them as STALE): move them away to run them again, or restore the grid")
    failed = []
    if not args.report_only:
        prepare_datasets(grid)
        specs, failed = run_grid(grid, args.only)
    if not any(s.done for s in specs):  # would replace the report with empty tables
        failures = f"; {len(failed)} run(s) failed: " + ", ".join(str(s.log) for s in failed) if failed else ""
        raise ConfigError(f"{args.grid}: no finished run under {shown(grid.out)}, nothing to report "
                          f"(run the grid first; {shown(grid.report)} is left as it is){failures}")
    from alterrec_dist.grid.report import write_report  # plotting libraries only when reporting

    write_report(grid, specs, args.grid)
    print(f"report: {grid.report}", flush=True)
    if failed:
        print(f"error: {len(failed)} run(s) failed: " + ", ".join(str(s.log) for s in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
