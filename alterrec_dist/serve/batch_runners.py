"""The two ways batch scoring runs: in this process, or on Ray Data (order preserved)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from alterrec_dist.common.errors import ConfigError
from alterrec_dist.common.ray_local import ray_session
from alterrec_dist.common.storage import Location
from alterrec_dist.serve.batch_input import iter_tables, session_columns, table_to_rows
from alterrec_dist.serve.batch_output import (OrderedMetrics, ParquetOut, output_table, rank_matrix, score_rows,
                                              with_example)
from alterrec_dist.serve.export_dir import load_scoring_model
from alterrec_dist.serve.from_run import device_named
from alterrec_dist.serve.scoring_model import ScoringModel


# -- the two runners ----------------------------------------------------------------------------------

def run_local(bundle: ScoringModel, files: list[Location], out: ParquetOut, top: int, metrics: OrderedMetrics | None,
              bar: tqdm) -> None:
    columns = session_columns(files)
    has_target = "target" in columns
    first = 0
    for table in iter_tables(files, columns, bundle.eval_batch_size):
        rows = table_to_rows(table, first, bundle.max_len, bundle.num_items,
                             f"{files[0] if len(files) == 1 else 'input'} rows {first}..{first + len(table) - 1}")
        res = score_rows(bundle, rows, top, has_target)
        result = with_example(output_table(bundle, table, rows, res, has_target), first)
        out.write(result)
        if metrics is not None and has_target:
            metrics.add(res["ranks"], rows.target)
        first += len(table)
        bar.update(len(table))


class _RayScorer:
    """Ray Data map_batches UDF: loads the model once per actor, scores each batch of sessions."""

    def __init__(self, spec: dict, top: int, has_target: bool):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.bundle = load_scoring_model(**spec)
        self.top, self.has_target = top, has_target

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table_to_rows(table, 0, self.bundle.max_len, self.bundle.num_items, "input")
        res = score_rows(self.bundle, rows, self.top, self.has_target)
        return output_table(self.bundle, table, rows, res, self.has_target)


def ray_requested(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def ray_model_specs(spec: dict) -> tuple[dict, dict]:
    """The model `spec` (`load_scoring_model`'s arguments) for Ray scoring: (this process's, each actor's).

    This process reads what the model says of itself (items, kinds, batch shape) and scores nothing: on the CPU,
    where a copy on --device cuda sat unused on GPU 0. An actor scores on --device's type alone: Ray gives it one
    GPU (num_gpus=1) as its only visible device, so the cuda:1 of --device cuda:1 did not exist in any actor."""
    device = device_named(spec["device"])  # a bad name in one line here, not in every actor
    return {**spec, "device": "cpu"}, {**spec, "device": device.type}


def run_ray(spec: dict, bundle: ScoringModel, files: list[Location], out: ParquetOut, top: int, metrics: OrderedMetrics | None,
            workers: int, bar: tqdm) -> None:
    import ray.data

    # The scoring actors hold one CPU each: keep one more for the read tasks (else they wait forever).
    with ray_session(num_cpus=max(os.cpu_count() or 1, workers + 1)):
        # Ray Data waits for GPU actors that no node can hold, without a word (measured: a CPU-only local Ray).
        if spec["device"] == "cuda" and not ray.cluster_resources().get("GPU"):
            raise ConfigError("--device cuda: the Ray cluster has no GPU for the scoring actors (--device cpu scores "
                              "on its CPUs)")
        columns = session_columns(files)
        has_target = "target" in columns
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the output and the metric batches follow input order
        ctx.enable_progress_bars = False
        ds = ray.data.read_parquet([str(f.absolute()) for f in files]).select_columns(columns)
        ds = ds.map_batches(_RayScorer, fn_constructor_kwargs={"spec": spec, "top": top, "has_target": has_target},
                            batch_size=bundle.eval_batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                            num_gpus=1 if spec["device"] == "cuda" else 0)  # --device cuda: a GPU per actor
        first = 0
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not len(table):
                continue
            out.write(with_example(table, first))
            if metrics is not None and has_target:
                metrics.add(rank_matrix(table, bundle.kinds), table["target"].to_numpy().astype(np.int64))
            first += len(table)
            bar.update(len(table))


def score_files(spec: dict, bundle: ScoringModel, files: list[Location], sessions: int, out_path: str | Location,
                overwrite: bool, top: int, use_ray: bool, workers: int) -> tuple[ParquetOut, OrderedMetrics]:
    """Score every session of `files` (`sessions` of them, for the progress bar) into the Parquet file `out_path`,
    swapped in whole (nothing is left on a failure), on Ray Data (its actors load `spec`: `ray_model_specs`) or
    here: (the output, the metrics summed in the engine's order)."""
    metrics = OrderedMetrics(bundle.kinds, bundle.eval_batch_size, bundle.popularity, bundle.longtail_bins)
    out = ParquetOut(out_path, overwrite)
    try:
        # on a terminal only (disable=None): a job's log and its one-line errors stay as they were
        with tqdm(total=sessions, desc="scoring", unit="session", unit_scale=True, disable=None) as bar:
            if use_ray:
                run_ray(spec, bundle, files, out, top, metrics, workers, bar)
            else:
                run_local(bundle, files, out, top, metrics, bar)
        out.commit()
    except BaseException:
        out.abort()
        raise
    return out, metrics
