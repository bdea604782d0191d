"""Training driver: `python -m alterrec_dist.train [--config F] [--set a.b=c ...] [--out DIR] [--launcher L]`,
or `... --resume RUN_DIR [--set ...]` to continue a run from its newest intact checkpoint.

Launchers (the same worker code runs under both; see `recipe.run_worker`):

* `ray` (default): a Ray Train `TorchTrainer` with `trainer.num_workers` workers (gloo on CPU,
  nccl on GPU). With no `RAY_ADDRESS` it starts a private local Ray; under `ray job submit`
  (which sets `RAY_ADDRESS`) it joins that cluster.
* `torchrun`: `torchrun --nproc_per_node N -m alterrec_dist.train --launcher torchrun ...`;
  every process joins the process group from the torchrun environment. Without `WORLD_SIZE`
  (plain `python -m alterrec_dist.train --launcher torchrun`) it runs a group of one.

Everything that can be checked before launching (config, dataset, run directory, the checkpoint
to resume from) is checked on the driver, so bad input costs a one-line error and exit code 2, not
a Ray start.

Resuming (see `load_run_config`): the workers always start from the newest intact checkpoint in
RUN_DIR/checkpoints when there is one, so the same code path serves `--resume`, Ray restarting the
workers after a failure (`trainer.max_failures`), and a retried job (`--resume auto`).
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack

from alterrec_dist.common import run_layout
from alterrec_dist.common.cli import ArgumentParser, run_cli
from alterrec_dist.common.config import METRICS, SCORE_PARTS, Config, check_resumable, load_config
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.common.files import resolve_location
from alterrec_dist.common.methods import sweep_kind
from alterrec_dist.common.storage import Location
from alterrec_dist.training.launch import (TrainingError, adopt_torchrun_world, check_ray_train_v2, launch_ray,
                                           launch_torchrun)
from alterrec_dist.training.metric_sinks import check_mlflow
from alterrec_dist.training.run_dir import check_dataset, check_resources, default_run_dir, open_run_dir


def load_run_config(args: argparse.Namespace) -> tuple[Config, Location | None]:
    """The config to run and, when an existing run goes on, its directory (else None: a new run).

    `--resume RUN_DIR`: RUN_DIR's config.toml with the `--set` values on top (e.g. another
    trainer.num_workers). `--resume auto` (a retried job with a fixed command line): the job's own
    `--config` and `--set` for the run directory that `--out` or `trainer.name` names, going on there if an
    attempt has started (it holds a config.toml), else a new run there. Either way a change to what the run
    trains (`config.check_resumable`) is refused: the job's own config for `auto`, the `--set` values else.
    `--launcher`, and under torchrun its world size, are part of the config before it is checked."""
    def launching(cfg: Config) -> None:
        if args.launcher:
            cfg.trainer.launcher = args.launcher
        if cfg.trainer.launcher == "torchrun":
            adopt_torchrun_world(cfg)

    if args.resume is None:
        return load_config(args.config, args.overrides, launching), None
    if args.resume == "auto":
        requested = load_config(args.config, args.overrides, launching)
        if not (args.out or requested.trainer.name):
            raise ConfigError("--resume auto needs a run directory a retry finds again: --out or trainer.name")
        run_dir = resolve_location(args.out) if args.out else default_run_dir(requested).absolute()
        saved = run_dir / run_layout.CONFIG
        if not saved.is_file():
            return requested, None
        # the job's own --config and --set as they are now: what a resume may change (its world size, its
        # budget) from either, the rest checked equal below (the --config's values were dropped)
        cfg = requested
    else:
        if args.config or args.out:
            raise ConfigError("--resume RUN_DIR goes on with the run's own config.toml: drop --config and --out")
        run_dir = resolve_location(args.resume)
        saved = run_dir / run_layout.CONFIG
        if not saved.is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
        cfg = requested = load_config(saved, args.overrides, launching)
    check_resumable(load_config(saved), requested, str(saved), in_place=args.resume != "auto")
    return cfg, run_dir


# -- the summary table ------------------------------------------------------------------------

def format_summary(summary: dict, run_dir: Location) -> str:
    """The test table (rows id/text/fused, and with eval.alpha_sweep the fused weight chosen on
    validation; columns METRICS), best epoch (with the metric that chose it) and run dir."""
    test = summary.get("test", {})
    rows = [(row, test[row], "") for row in SCORE_PARTS if row in test]
    alpha = summary.get("alpha")
    if alpha:
        rows.append((sweep_kind(alpha["chosen"]), alpha["test"],
                     f"  (alpha chosen on valid {alpha['selection']}: the model serves it)"))
    width = max(len(c) for c in METRICS) + 2
    first = max([6] + [len(r[0]) + 1 for r in rows])
    lines = [f"{'test':<{first}}" + "".join(f"{c:>{width}}" for c in METRICS)]
    for row, vals, note in rows:
        cells = []
        for c in METRICS:
            v = vals.get(c)
            cells.append(f"{v:>{width}.4f}" if isinstance(v, (int, float)) else f"{'-':>{width}}")
        lines.append(f"{row:<{first}}" + "".join(cells) + note)
    # the run's own selection (a one-network method is chosen on its own score, whatever eval.metric says)
    chosen = f" (selected on valid {summary['selection']})" if "selection" in summary else ""
    lines.append(f"best epoch: {summary.get('best_epoch', '?')}{chosen}")
    lines.append(f"run dir: {run_dir}")
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m alterrec_dist.train",
        description="Train an AlterRec session recommender (or a baseline) and print its test metrics.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (e.g. configs/default.toml); without it, the embedded default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set train.m_max=3)")
    p.add_argument("--out", metavar="RUN_DIR",
                   help="run directory (default: <trainer.storage_path>/<trainer.name or method-timestamp>)")
    p.add_argument("--launcher", choices=("ray", "torchrun"),
                   help="overrides trainer.launcher (default ray)")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue RUN_DIR from its newest intact checkpoint, with its config.toml (--set may "
                        "change e.g. trainer.num_workers); 'auto': continue the run dir of --out or trainer.name "
                        "if one was started there, else start it (for retried jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the epoch lines stay)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"  # read at each bar (`progress_bar`), and handed to Ray's workers
    cfg, resume_dir = load_run_config(args)
    check_dataset(cfg)
    check_resources(cfg)
    check_mlflow()
    if cfg.trainer.launcher == "torchrun":
        done = launch_torchrun(cfg, args.out, resume_dir)
        if done is None:
            return 0
        summary, run_dir = done
    else:
        check_ray_train_v2()
        with ExitStack() as held:
            run_dir = open_run_dir(cfg, args.out, resume_dir, held)
            print(f"run dir: {run_dir}", flush=True)
            try:
                summary = launch_ray(cfg, run_dir)
            except TrainingError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    print(format_summary(summary, run_dir), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
