"""Batch scoring: the top-N items for every session of Parquet session files, and the engine's metrics.

    python -m alterrec_dist.batch_score --run RUN_DIR (--split test | --input P [P ...]) --out FILE.parquet
        [--overwrite] [--top 20] [--ray | --no-ray] [--ray-workers N] [--metrics-out FILE.json]

Input: session files in the dataset layout (`history` list<int> of item_idx, oldest first; optional
`target`, `user`, `session`), read in bounded batches of `eval.batch_size` rows, never whole.
Output (written to a temp file, renamed into place): `example` (the row's index in the input, file
order), `user`/`session` when present, `target` and `rank_<kind>` (1 = first) when targets are
present, and the fused top-N: `items` (item_idx), `item_ids`, `scores` (fused), `id_scores`,
`text_scores` (the two component scores, scaled, before the alpha weighting; NFRec: its two parts).

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
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from alterrec_dist import ray_watchdog
from alterrec_dist.cli import run_cli
from alterrec_dist.dataset import SPLITS, Dataset, gather_ranges
from alterrec_dist.errors import ConfigError, DataError
from alterrec_dist.export import Bundle, add_device_argument, encode_sessions, load_bundle
from alterrec_dist.files import Staged, atomic_write_json, check_out, read_json
from alterrec_dist.metrics import METRICS, MetricSums, popularity_groups
from alterrec_dist.reader import Rows, local_batch, rank_slice

SESSION_COLUMNS = ("history", "target", "user", "session")
PASSTHROUGH = ("user", "session")


# -- reading ----------------------------------------------------------------------------------------

def input_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise DataError(f"{p}: no .parquet files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: input not found")
    return files


def session_columns(files: list[Path]) -> list[str]:
    """The session columns the files have (the same in every file); `history` is required."""
    cols = None
    for f in files:
        try:
            names = pq.ParquetFile(f).schema_arrow.names
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read Parquet metadata ({e})") from None
        have = [c for c in SESSION_COLUMNS if c in names]
        if "history" not in have:
            raise DataError(f"{f}: no `history` column (session files have history, target, user, session)")
        if cols is not None and have != cols:
            raise DataError(f"{f}: session columns {have} differ from {cols} of {files[0]}")
        cols = have
    return cols


SESSION_TYPES = {"history": pa.list_(pa.int64()), "target": pa.int64(), "user": pa.string(), "session": pa.string()}
CHECK_ROWS = 65_536  # rows read at a time by check_input


def check_input(files: list[Path], columns: list[str], num_items: int) -> int:
    """Every row of the input is a session the engine can score: a non-empty history of item
    indices in 0..V-1 and, where there is a target column, a target in that range. Read once,
    streamed, before any scoring (and before Ray starts), so bad input is one line naming the
    file and its row (1-based), not a failure after most of the file was scored. Returns the rows."""
    total = 0
    checked = [c for c in ("history", "target") if c in columns]
    for f in files:
        first = 0
        try:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=CHECK_ROWS, columns=checked):
                _check_rows(rb, f, first, num_items)
                first += rb.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: cannot read its sessions ({' '.join(str(e).split())})") from None
        total += first
    if total == 0:
        raise DataError(f"{', '.join(map(str, files))}: no input rows")
    return total


def _check_rows(rb: pa.RecordBatch, f: Path, first: int, num_items: int) -> None:
    def fail_at(mask, what: str, rows: np.ndarray | None = None) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            i = int(np.argmax(mask))
            raise DataError(f"{f}: row {first + 1 + int(rows[i] if rows is not None else i)}: {what}")

    try:
        history = rb.column("history").cast(SESSION_TYPES["history"])
        target = rb.column("target").cast(SESSION_TYPES["target"]) if "target" in rb.schema.names else None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{f}: history/target are not lists of item indices / item indices "
                        f"({rb.schema.field('history').type}; {' '.join(str(e).split())})") from None
    fail_at(pc.is_null(history).to_numpy(zero_copy_only=False), "null history")
    fail_at(pc.equal(pc.list_value_length(history), 0).fill_null(False).to_numpy(zero_copy_only=False),
            "empty history")
    items = pc.list_flatten(history)
    parent = pc.list_parent_indices(history).to_numpy()
    fail_at(pc.is_null(items).to_numpy(zero_copy_only=False), "null item in the history", parent)
    values = items.to_numpy(zero_copy_only=False)
    fail_at((values < 0) | (values >= num_items), f"history item outside 0..{num_items - 1}", parent)
    if target is not None:
        fail_at(pc.is_null(target).to_numpy(zero_copy_only=False), "null target")
        t = target.to_numpy(zero_copy_only=False)
        fail_at((t < 0) | (t >= num_items), f"target outside 0..{num_items - 1}")


def iter_tables(files: list[Path], columns: list[str], rows: int):
    """The input as consecutive tables of `rows` rows (the last may be shorter), streamed: at most
    about 2 * `rows` rows are held at a time."""
    schema = pa.schema([(c, SESSION_TYPES[c]) for c in columns])
    pending, held = [], 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns):
            try:
                pending.append(pa.Table.from_batches([rb]).select(columns).cast(schema))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{f}: session columns do not have the session types ({e})") from None
            held += rb.num_rows
            while held >= rows:
                table = pa.concat_tables(pending)
                yield table.slice(0, rows)
                pending, held = [table.slice(rows)], held - rows
    if held:
        yield pa.concat_tables(pending)


def table_to_rows(table: pa.Table, first: int, max_len: int, num_items: int, where: str) -> Rows:
    """Session rows, histories cut to their last max_len items (as `reader.read_row_group`)."""
    history = table["history"].combine_chunks()
    if history.null_count or history.flatten().null_count:
        raise DataError(f"{where}: null history or history item")
    offsets = history.offsets.to_numpy().astype(np.int64)
    lens = np.diff(offsets)
    if (lens == 0).any():
        raise DataError(f"{where}, row {first + int(np.argmax(lens == 0))}: empty history")
    keep = np.minimum(lens, max_len)
    values = history.values.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets, values = gather_ranges(values, offsets[1:] - keep, keep)
    if len(values) and (values.min() < 0 or values.max() >= num_items):
        raise DataError(f"{where}: history item outside 0..{num_items - 1}")
    if "target" in table.column_names:
        target = table["target"]
        if target.null_count:
            raise DataError(f"{where}: null target")
        target = target.to_numpy().astype(np.int64)
        if len(target) and (target.min() < 0 or target.max() >= num_items):
            raise DataError(f"{where}: target outside 0..{num_items - 1}")
    else:
        target = np.zeros(len(table), dtype=np.int64)
    return Rows(np.arange(first, first + len(table), dtype=np.int64), offsets, values, target)


def local_batches(rows: Rows, batch_size: int, world: int) -> list:
    """One global eval batch (<= batch_size rows) as the engine's per-rank batches, the reader's way
    (`reader.local_batch`: a short last batch padded, marked invalid)."""
    return [local_batch(rows, rank_slice(r, batch_size, world)) for r in range(world)]


# -- scoring ------------------------------------------------------------------------------------------

def score_rows(bundle: Bundle, rows: Rows, top: int, has_target: bool) -> dict:
    """Ranks (per kind) and the fused top-N of `rows`, one engine global batch at a time."""
    B = bundle.eval_batch_size
    out = {"ranks": [], "items": [], "scores": [], "parts": []}
    for s in range(0, len(rows), B):
        chunk = rows.take(np.arange(s, min(s + B, len(rows))))
        n = len(chunk)
        batches = local_batches(chunk, B, bundle.world)
        queries = encode_sessions(bundle, batches)
        target = torch.cat([b.target for b in batches]).to(bundle.device) if has_target else None
        counts, best = bundle.scoring().run(queries.parts, top, target)
        if counts is not None:
            out["ranks"].append((1 + counts[:n]).cpu().numpy())
        out["items"].append(best.items[:n].cpu().numpy())
        out["scores"].append(best.scores[:n].cpu().numpy())
        out["parts"].append(np.stack([p[:n].cpu().numpy() for p in best.parts]))
    return {k: (np.concatenate(v, axis=1 if k == "parts" else 0) if v else None) for k, v in out.items()}


def _lists(values: np.ndarray, typ) -> pa.ListArray:
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)),
                                    pa.array(values.reshape(-1), type=typ))


def output_table(bundle: Bundle, table: pa.Table, rows: Rows, res: dict, has_target: bool) -> pa.Table:
    """The output columns (without `example`, which the caller numbers)."""
    cols = {c: table[c].cast(pa.string()) for c in PASSTHROUGH if c in table.column_names}
    if has_target:
        cols["target"] = pa.array(rows.target.astype(np.int32))
        for i, kind in enumerate(bundle.kinds):
            cols[f"rank_{kind}"] = pa.array(res["ranks"][:, i].astype(np.int32))
    items = res["items"]
    ids = _item_id_array(bundle)
    cols["items"] = _lists(items.astype(np.int32), pa.int32())
    cols["item_ids"] = pa.ListArray.from_arrays(cols["items"].offsets, ids.take(pa.array(items.reshape(-1))))
    cols["scores"] = _lists(res["scores"].astype(np.float32), pa.float32())
    cols["id_scores"] = _lists(res["parts"][0].astype(np.float32), pa.float32())
    cols["text_scores"] = _lists(res["parts"][1].astype(np.float32), pa.float32())
    return pa.table(cols)


def _item_id_array(bundle: Bundle) -> pa.Array:
    if not hasattr(bundle, "_item_id_array"):
        bundle._item_id_array = pa.array(bundle.item_ids, type=pa.string())
    return bundle._item_id_array


class OrderedMetrics:
    """`MetricSums` fed exactly as `evaluate.evaluate` feeds them: ranks in input order, in global
    batches of `batch_size` rows (the last padded with invalid rows), so the float sums match."""

    def __init__(self, kinds: list[str], batch_size: int, popularity: np.ndarray, bins: list[int]):
        group_of_item, labels = popularity_groups(popularity, bins)
        self.group_of_item = torch.from_numpy(group_of_item).to("cpu")  # ranks arrive as host arrays
        self.kinds, self.batch_size = kinds, batch_size
        self.sums = {k: MetricSums(labels) for k in kinds}
        self.ranks: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.held = 0
        self.count = 0

    def add(self, ranks: np.ndarray, target: np.ndarray) -> None:
        self.count += len(target)
        self.ranks.append(ranks)
        self.targets.append(target)
        self.held += len(target)
        while self.held >= self.batch_size:
            self._flush(self.batch_size)

    def _flush(self, n: int) -> None:
        ranks, target = np.concatenate(self.ranks), np.concatenate(self.targets)
        self.ranks, self.targets, self.held = [ranks[n:]], [target[n:]], len(target) - n
        B = self.batch_size
        valid = torch.arange(B, device="cpu") < n
        pad = B - n
        r = np.concatenate([ranks[:n], np.ones((pad, ranks.shape[1]), dtype=ranks.dtype)])
        t = torch.from_numpy(np.concatenate([target[:n], np.full(pad, target[0], dtype=target.dtype)])
                             .astype(np.int64)).to("cpu")
        for i, kind in enumerate(self.kinds):
            self.sums[kind].add(torch.from_numpy(np.ascontiguousarray(r[:, i]).astype(np.int64)).to("cpu"), valid,
                                self.group_of_item[t])

    def finish(self) -> dict:
        if self.held:
            self._flush(self.held)
        return {"metrics": {k: self.sums[k].result() for k in self.kinds},
                "longtail": {k: self.sums[k].group_results() for k in self.kinds}}


class ParquetOut:
    """Streamed Parquet output: a temp file beside `path`, renamed into place by `commit`."""

    def __init__(self, path: Path, overwrite: bool = False):
        self.path = check_out(path, overwrite)
        if self.path.is_dir():
            raise DataError(f"{self.path}: --out is a directory (give a .parquet file name)")
        self.staged = Staged(self.path)
        self.tmp = self.staged.tmp
        self.writer = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        self.rows += len(table)

    def commit(self) -> None:
        if self.writer is None:
            raise DataError(f"{self.path}: nothing to write (no input rows)")
        self.writer.close()
        self.staged.commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.staged.abort()


def _with_example(table: pa.Table, first: int) -> pa.Table:
    return table.add_column(0, "example", pa.array(np.arange(first, first + len(table), dtype=np.int64)))


def _rank_matrix(table: pa.Table, kinds: list[str]) -> np.ndarray:
    return np.stack([table[f"rank_{k}"].to_numpy() for k in kinds], 1).astype(np.int64)


# -- the two runners ----------------------------------------------------------------------------------

def run_local(bundle: Bundle, files: list[Path], out: ParquetOut, top: int, metrics: OrderedMetrics | None) -> None:
    columns = session_columns(files)
    has_target = "target" in columns
    first = 0
    for table in iter_tables(files, columns, bundle.eval_batch_size):
        rows = table_to_rows(table, first, bundle.max_len, bundle.num_items,
                             f"{files[0] if len(files) == 1 else 'input'} rows {first}..{first + len(table) - 1}")
        res = score_rows(bundle, rows, top, has_target)
        result = _with_example(output_table(bundle, table, rows, res, has_target), first)
        out.write(result)
        if metrics is not None and has_target:
            metrics.add(res["ranks"], rows.target)
        first += len(table)


class _RayScorer:
    """Ray Data map_batches UDF: loads the model once per actor, scores each batch of sessions."""

    def __init__(self, spec: dict, top: int, has_target: bool):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.bundle = load_bundle(**spec)
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


def run_ray(spec: dict, bundle: Bundle, files: list[Path], out: ParquetOut, top: int, metrics: OrderedMetrics | None,
            workers: int) -> None:
    import logging

    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**common)
        else:  # a private local Ray, never some other cluster found in /tmp/ray; the scoring actors
            # hold one CPU each, so keep one more for the read tasks (else they wait forever)
            ray_watchdog.start()  # tears it down should this process die without ray.shutdown()
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers + 1), include_dashboard=False,
                     **common)
        started = True
    try:
        columns = session_columns(files)
        has_target = "target" in columns
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the output and the metric batches follow input order
        ctx.enable_progress_bars = False
        ds = ray.data.read_parquet([str(f.absolute()) for f in files]).select_columns(columns)
        ds = ds.map_batches(_RayScorer, fn_constructor_kwargs={"spec": spec, "top": top, "has_target": has_target},
                            batch_size=bundle.eval_batch_size, batch_format="pyarrow", concurrency=workers, num_cpus=1,
                            num_gpus=1 if bundle.device.type == "cuda" else 0)  # --device cuda: a GPU per actor
        first = 0
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not len(table):
                continue
            out.write(_with_example(table, first))
            if metrics is not None and has_target:
                metrics.add(_rank_matrix(table, bundle.kinds), table["target"].to_numpy().astype(np.int64))
            first += len(table)
    finally:
        if started:
            ray.shutdown()
            ray_watchdog.stop()


# -- CLI ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m alterrec_dist.batch_score", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="training run directory")
    p.add_argument("--export", help="export directory (from `python -m alterrec_dist.export`), instead of --run")
    p.add_argument("--data", help="dataset directory (default: the one the run's model names)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="session Parquet files or directories of them")
    src.add_argument("--split", choices=SPLITS, help="a split of the run's dataset")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--top", type=int, default=20, help="items per session (default 20)")
    ray_group = p.add_mutually_exclusive_group()
    ray_group.add_argument("--ray", dest="ray", action="store_true", default=None,
                           help="score on Ray Data (default: only when RAY_ADDRESS is set or Ray is initialised)")
    ray_group.add_argument("--no-ray", dest="ray", action="store_false", help="score in this process")
    p.add_argument("--ray-workers", type=int, default=2, help="Ray Data actors (default 2)")
    p.add_argument("--metrics-out", help="also write the metrics (and the summary.json comparison) to this JSON file")
    add_device_argument(p)
    return p.parse_args(argv)


def summary_for(bundle: Bundle, split: str | None) -> tuple[dict | None, str]:
    """The run's summary.json metrics of `split` (test/valid), if this model is the one it describes."""
    run = bundle.provenance.get("run") or {}
    if split not in ("test", "valid") or not run.get("path"):
        return None, ""
    path = Path(run["path"]) / "summary.json"
    if not path.is_file():
        return None, f"{path}: not found"
    summary = read_json(path)
    if summary.get("best_epoch") != run.get("model_epoch"):
        return None, f"{path}: best epoch {summary.get('best_epoch')} is not the saved model's epoch {run.get('model_epoch')}"
    return summary, ""


def compare(result: dict, summary: dict, split: str) -> list[str]:
    """Differences between our metrics and summary.json's for `split` (empty = exactly equal)."""
    diffs = []
    theirs = summary[split]
    for kind, vals in theirs.items():
        ours = result["metrics"].get(kind)
        if ours is None:
            diffs.append(f"{kind}: missing")
            continue
        diffs += [f"{kind}/{m}: {ours.get(m)!r} != {v!r}" for m, v in vals.items() if ours.get(m) != v]
    if split == "test":
        for kind, groups in summary.get("longtail", {}).items():
            if result["longtail"].get(kind) != groups:
                diffs.append(f"longtail {kind}: differs")
    return diffs


def format_metrics(result: dict, kinds: list[str]) -> str:
    lines = [f"{'kind':<10}{'n':>7}" + "".join(f"{m:>10}" for m in METRICS)]
    for k in kinds:
        r = result["metrics"][k]
        lines.append(f"{k:<10}{r['n']:>7}" + "".join(f"{r[m]:>10.4f}" for m in METRICS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if args.ray_workers < 1:
        raise ConfigError(f"--ray-workers must be >= 1, got {args.ray_workers}")
    check_out(args.out, args.overwrite)  # before the model is loaded
    spec = {"run": args.run, "export": args.export, "data": args.data, "device": args.device}
    bundle = load_bundle(**spec)
    if args.split:
        files = Dataset(args.data or bundle.provenance["dataset"]["path"]).session_files(args.split)
    else:
        files = input_files(args.input)
    check_input(files, session_columns(files), bundle.num_items)  # bad rows: one line, before scoring or Ray
    top = min(args.top, bundle.num_items)
    metrics = OrderedMetrics(bundle.kinds, bundle.eval_batch_size, bundle.popularity, bundle.longtail_bins)
    out = ParquetOut(Path(args.out), args.overwrite)
    use_ray = ray_requested(args.ray)
    try:
        if use_ray:
            run_ray(spec, bundle, files, out, top, metrics, args.ray_workers)
        else:
            run_local(bundle, files, out, top, metrics)
        out.commit()
    except BaseException:
        out.abort()
        raise
    print(f"scored {out.rows} sessions ({'Ray Data' if use_ray else 'in-process'}), top {top} -> {out.path}")
    report = {"sessions": out.rows, "ray": use_ray, "out": str(out.path)}
    if metrics.count:
        result = metrics.finish()
        print(format_metrics(result, bundle.kinds))
        report.update(result)
        summary, why = summary_for(bundle, args.split)
        if summary is not None:
            diffs = compare(result, summary, args.split)
            report["summary_equal"] = not diffs
            report["summary_differences"] = diffs
            where = Path(bundle.provenance["run"]["path"]) / "summary.json"
            if diffs:
                print(f"NOT equal to {where} {args.split} metrics: " + "; ".join(diffs[:5]))
            else:
                extra = " and long-tail groups" if args.split == "test" else ""
                print(f"equal to {where} {args.split} metrics (best epoch {summary['best_epoch']}): "
                      f"all {len(summary[args.split])} kinds{extra}, exactly")
        elif why:
            print(f"no summary.json comparison ({why})")
    if args.metrics_out:
        atomic_write_json(args.metrics_out, report)
    return 0


if __name__ == "__main__":
    run_cli(main)
