"""Batch scoring's results: ranks and the fused top-N per session (the engine's), the output Parquet
written beside its place, the metrics summed in the engine's order, and their comparison with summary.json.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alterrec_dist.common import run_layout
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import Staged, check_out, read_json, resolve_location, writing
from alterrec_dist.common.storage import Location
from alterrec_dist.data.reader import Rows
from alterrec_dist.eval.evaluate import COMPONENTS
from alterrec_dist.eval.metrics import MetricSums, popularity_groups
from alterrec_dist.serve.batch_input import local_batches
from alterrec_dist.serve.queries import encode_sessions
from alterrec_dist.serve.scoring_model import ScoringModel


PASSTHROUGH = ("user", "session")


# -- scoring ------------------------------------------------------------------------------------------

def score_rows(bundle: ScoringModel, rows: Rows, top: int, has_target: bool) -> dict:
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


def output_table(bundle: ScoringModel, table: pa.Table, rows: Rows, res: dict, has_target: bool) -> pa.Table:
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
    for c, part, weight in zip(COMPONENTS, res["parts"], bundle.served_weights):
        # null where the served score gives a component no weight (a lone network's never-trained other one)
        cols[f"{c}_scores"] = (_lists(part.astype(np.float32), pa.float32()) if weight
                               else pa.nulls(len(items), pa.list_(pa.float32())))
    return pa.table(cols)


def _item_id_array(bundle: ScoringModel) -> pa.Array:
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

    def __init__(self, path: str | Location, overwrite: bool = False):
        self.path = check_out(path, overwrite)
        if self.path.is_dir():
            raise DataError(f"{self.path}: --out is a directory (give a .parquet file name)")
        self.staged = Staged(self.path)
        self.tmp = self.staged.tmp
        self.writer = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        with writing(self.path):  # a read-only or full disk: the checks before scoring cannot know
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


def with_example(table: pa.Table, first: int) -> pa.Table:
    return table.add_column(0, "example", pa.array(np.arange(first, first + len(table), dtype=np.int64)))


def rank_matrix(table: pa.Table, kinds: list[str]) -> np.ndarray:
    return np.stack([table[f"rank_{k}"].to_numpy() for k in kinds], 1).astype(np.int64)


def summary_for(bundle: ScoringModel, split: str | None) -> tuple[dict | None, str]:
    """The run's summary.json metrics of `split` (test/valid), if this model is the one it describes."""
    run = bundle.provenance.get("run") or {}
    if split not in ("test", "valid") or not run.get("path"):
        return None, ""
    path = resolve_location(run["path"]) / run_layout.SUMMARY
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


def summary_comparison(bundle: ScoringModel, result: dict, split: str | None) -> tuple[dict, str | None]:
    """Whether `result` equals the run's summary.json metrics of `split`: (the report's fields, the
    line that says so; None where there is nothing to say)."""
    summary, why = summary_for(bundle, split)
    if summary is None:
        return {}, (f"no summary.json comparison ({why})" if why else None)
    diffs = compare(result, summary, split)
    where = resolve_location(bundle.provenance["run"]["path"]) / run_layout.SUMMARY
    if diffs:
        line = f"NOT equal to {where} {split} metrics: " + "; ".join(diffs[:5])
    else:
        extra = " and long-tail groups" if split == "test" else ""
        line = (f"equal to {where} {split} metrics (best epoch {summary['best_epoch']}): "
                f"all {len(summary[split])} kinds{extra}, exactly")
    return {"summary_equal": not diffs, "summary_differences": diffs}, line
