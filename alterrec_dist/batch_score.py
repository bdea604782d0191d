"""Batch scoring: the top-N items for every session of Parquet session files, and the engine's metrics.

    python -m alterrec_dist.batch_score --run RUN_DIR (--split test | --input P [P ...]) --out FILE.parquet
        [--overwrite] [--top 20] [--ray | --no-ray] [--ray-actors N] [--metrics-out FILE.json]

Input: session files in the dataset layout (`history` list<int> of item_idx, oldest first; optional
`target`, `user`, `session`; item ids, as strings, are refused: the dataset's items.parquet maps them), read in
bounded batches of `eval.batch_size` rows, never whole.
Output (written to a temp file, renamed into place): `example` (the row's index in the input, file
order), `user`/`session` when present, `target` and `rank_<kind>` (1 = first) when targets are
present, and the top-N of the served score (the fused score at the alpha the run chose on validation, the
summary's `alpha.chosen`; `eval.alpha` without a choice): `items` (item_idx), `item_ids`, `scores`, `id_scores`,
`text_scores` (the two component scores, scaled, before the alpha weighting; NFRec: its two parts; null for
the component a lone network's model gives no weight).

With targets, Hits/NDCG/MRR for every kind (id, text, fused, fused@a) are computed exactly as the
engine does: each global batch of `eval.batch_size` rows is cut into the training world size's
per-rank slices, encoded by the engine's `session_queries`, scored shard by shard in the engine's
float order and tie order, and summed into `MetricSums` batch by batch; `--split test` on a run
therefore reproduces its `summary.json` test metrics exactly (checked and printed).

Ray Data (`ray.data.read_parquet(...).map_batches(...)`, order preserved) runs when `--ray` is given,
RAY_ADDRESS is set or Ray is already initialised in this process; otherwise everything runs here.
Under Ray the batches are Ray's, not the engine's: each is padded to the engine's batch shape, so
ranks still match the engine's whenever the item MLP and the session encoder are row-independent
in float (they are for the mean encoder, measured; the transformer's padding length can differ).
"""
from __future__ import annotations

import argparse
import sys

from alterrec_dist.common.cli import ArgumentParser, add_device_argument, add_model_arguments, run_cli
from alterrec_dist.common.config import METRICS
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import cannot_write, check_file_out, within, write_file_out
from alterrec_dist.common.run_layout import served_paths
from alterrec_dist.data.dataset import Dataset, dataset_files
from alterrec_dist.data.layout import SPLITS
from alterrec_dist.serve.batch_input import check_input, input_files, session_columns
from alterrec_dist.serve.batch_output import summary_comparison
from alterrec_dist.serve.batch_runners import ray_model_specs, ray_requested, score_files
from alterrec_dist.serve.export_dir import export_files, load_scoring_model


# -- CLI ---------------------------------------------------------------------------------------------

RAY_ACTORS = 2  # Ray Data scoring actors unless --ray-actors says


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m alterrec_dist.batch_score", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="session Parquet files or directories of them: `history` a list "
                                                "of item_idx, optional `target` (item_idx), `user`, `session`")
    src.add_argument("--split", choices=SPLITS, help="a split of the run's dataset")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --metrics-out)")
    p.add_argument("--top", type=int, default=20, help="items per session (default 20)")
    ray_group = p.add_mutually_exclusive_group()
    ray_group.add_argument("--ray", dest="ray", action="store_true", default=None,
                           help="score on Ray Data (default: only when RAY_ADDRESS is set or Ray is initialised)")
    ray_group.add_argument("--no-ray", dest="ray", action="store_false", help="score in this process")
    p.add_argument("--ray-actors", "--ray-workers", dest="ray_actors", type=int, metavar="N",
                   help=f"with Ray: scoring actors (default {RAY_ACTORS}); the name prepare gives its encoding actors")
    p.add_argument("--metrics-out", help="also write the metrics (and the summary.json comparison) to this JSON file")
    add_device_argument(p)
    return p.parse_args(argv)


def format_metrics(result: dict, kinds: list[str], served: str) -> str:
    lines = [f"{'kind':<10}{'n':>7}" + "".join(f"{m:>10}" for m in METRICS)]
    for k in kinds:
        r = result["metrics"][k]
        lines.append(f"{k:<10}{r['n']:>7}" + "".join(f"{r[m]:>10.4f}" for m in METRICS)
                     + ("  (served: the top lists' score)" if k == served else ""))
    return "\n".join(lines)


def check_out_files(args: argparse.Namespace, inputs: list) -> None:
    """--out and --metrics-out (files each) against what the command reads."""
    check_file_out(args.out, args.overwrite, inputs)
    if args.metrics_out:
        if within(args.metrics_out, args.out):  # the same file, or in the directory --out makes (or replaces)
            raise ConfigError(f"--metrics-out {args.metrics_out} is or lies in --out {args.out}: give each its own "
                              "place")
        check_file_out(args.metrics_out, args.overwrite, inputs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise ConfigError(f"--ray-actors must be >= 1, got {args.ray_actors}")
    use_ray = ray_requested(args.ray)
    if args.ray_actors is not None and not use_ray:  # it was ignored: the scores came from this process
        raise ConfigError("--ray-actors needs Ray (--ray, or RAY_ADDRESS set)")
    if args.export and args.data and not args.split:
        raise ConfigError("--data with --export names the dataset of --split: without --split it would be ignored")
    # the files read (a dataset's or an export's: an output may lie beside them, not replace one)
    inputs = [*(input_files(args.input) if args.input else []), *served_paths(args.run), *export_files(args.export),
              *dataset_files(args.data)]
    check_out_files(args, inputs)  # before the model
    spec = {"run": args.run, "export": args.export, "data": args.data, "device": args.device}
    here, actors = ray_model_specs(spec) if use_ray else (spec, spec)
    bundle = load_scoring_model(**here)
    # the dataset read besides, known now: the run's (its items), or --split's (its sessions)
    data_path = (args.data or bundle.provenance.get("dataset", {}).get("path")) if args.run or args.split else None
    check_out_files(args, dataset_files(data_path))
    if args.split:
        try:
            data = Dataset(data_path)
        except DataError as e:
            if args.export and not args.data:  # the path the export recorded: a dataset moved since
                raise DataError(f"{e}; the export {args.export} names it: pass --data with where it is now") from None
            raise
        if args.export:  # --run checks its own
            data.check()
            if data.item_ids() != bundle.item_ids:
                raise DataError(f"{data.path}: not the items of the export {args.export} (its sessions' item "
                                "indices would name other items)")
        files = data.session_files(args.split)
    else:
        files = input_files(args.input)
    sessions = check_input(files, session_columns(files), bundle.num_items)  # bad rows: one line, before scoring
    top = min(args.top, bundle.num_items)
    out, metrics = score_files(actors, bundle, files, sessions, args.out, args.overwrite, top, use_ray,
                               args.ray_actors or RAY_ACTORS)
    print(f"scored {out.rows} sessions ({'Ray Data' if use_ray else 'in-process'}), top {top} by {bundle.served} "
          f"-> {out.path}")
    # what made these scores, as a run records its config and an export its provenance
    report = {"sessions": out.rows, "ray": use_ray, "out": str(out.path),
              "command": ["python", "-m", "alterrec_dist.batch_score", *(sys.argv[1:] if argv is None else argv)],
              "input": ({"split": args.split, "data": str(data_path)} if args.split
                        else {"files": [str(f) for f in files]}),
              "top": top, "served": bundle.served, "model": bundle.provenance}
    if metrics.count:
        result = metrics.finish()
        print(format_metrics(result, bundle.kinds, bundle.served))
        fields, line = summary_comparison(bundle, result, args.split)
        report |= result | fields
        if line:
            print(line)
    if args.metrics_out:
        try:
            write_file_out(args.metrics_out, report)
        except OSError as e:
            raise DataError(f"{cannot_write(args.metrics_out, e)}; the scores are in {out.path}, "
                            "written before") from None
        print(f"metrics -> {args.metrics_out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
