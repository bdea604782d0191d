"""Export a trained run for serving, and the model API that recommend and batch scoring share.

`python -m alterrec_dist.export --run RUN_DIR --out DIR [--data DATASET] [--overwrite]` writes:

    DIR/manifest.json              format, the run (path, summary best epoch, model manifest sha256 and
                                   its file checksums), the dataset (path, sha256 of its manifest and
                                   items.parquet), the scoring spec and the engine layout, files with sha256
    DIR/items.parquet              item_idx, item_id, text, popularity, id_vec, text_vec, fused_vec
    DIR/encoders.pt                {method, model config, text_dim, max_len, states}: plain state_dicts
    DIR/tables/id_rows.npy         the learnable ID table X (V, d) float32 (what the ID encoder reads)
    DIR/tables/text_features.npy   the frozen text features F (V, D) float16 (what the text MLP reads)

`load_export(DIR)` (or `load_run(RUN_DIR)`) gives a `Bundle` without any torch.distributed set-up.

Scores. Per component c (AlterRec: c = id, text; NFRec: the id and text parts of its one network)
the engine scores `y_c = s_c * M_c[i] . q_c` (s = the text logit scale, 1 for id) and a kind weights
them: fused = alpha*y_id + (1-alpha)*y_text. `id_vec`/`text_vec` are the M_c rows and
`fused_vec = [id_vec, text_vec]`, so the fused score is ONE inner product of `fused_vec` with
`fused_query = [w_id*s_id*q_id, w_text*s_text*q_text]` (`Queries.fused`), which is what an inner-product
index (FAISS) serves. That equals the engine's score up to float rounding only: the engine forms the
component products first and then the weighted sum. `Scoring` reproduces the engine's exact float
operations (same shapes: its shard layout, tiles and global eval batch) for exact ranks and top-N.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alterrec_dist.checkpoint import load_model, on_cpu, verify_files
from alterrec_dist.cli import run_cli
from alterrec_dist.config import ModelConfig, load_config
from alterrec_dist.dataset import Dataset
from alterrec_dist.device import tile_rows as device_tile_rows
from alterrec_dist.errors import ConfigError, DataError
from alterrec_dist.evaluate import Scorer, component_scores, kind_scores, rank_tiles, session_queries
from alterrec_dist.files import Staged, atomic_write_json, check_out, file_sha256, read_json, read_manifest
from alterrec_dist.model import Network, build_networks
from alterrec_dist.reader import Batch, Rows, to_batch
from alterrec_dist.sharded import Placement

FORMAT_VERSION = 1
COMPONENTS = ("id", "text")


# -- the bundle: everything scoring needs, from a run or from an export ------------------------

@dataclass
class Bundle:
    """A trained model ready to score, on one process. Item arrays are in item_idx order."""
    method: str
    model_cfg: ModelConfig
    networks: dict[str, Network]
    x: torch.Tensor | None            # (V, d) learnable ID table (None: the method has none)
    f16: torch.Tensor                 # (V, D) float16 frozen text features
    matrices: list[torch.Tensor]      # per component, (V, d_c): the engine's Scorer rows
    scales: list[float]               # per component logit scale
    weights: dict[str, list[float]]   # kind -> weight per component, as evaluate.Scorer
    world: int                        # training world size: the engine's shard layout
    tile_rows: int                    # eval.tile_rows as configured (0: per device, device.tile_rows)
    eval_batch_size: int
    max_len: int
    longtail_bins: list[int]
    item_ids: list[str]
    texts: list[str | None]
    popularity: np.ndarray
    provenance: dict = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def device(self) -> torch.device:
        return self.f16.device

    def to(self, device: torch.device | str) -> "Bundle":
        """Everything that scores on `device` (networks, tables, item matrices); loading is always on the CPU."""
        device = torch.device(device)
        for net in self.networks.values():
            net.to(device)
        self.x = self.x.to(device) if self.x is not None else None
        self.f16 = self.f16.to(device)
        self.matrices = [m.to(device) for m in self.matrices]
        self.__dict__.pop("_scoring", None)
        return self

    @property
    def kinds(self) -> list[str]:
        return list(self.weights)

    def fused_vectors(self) -> torch.Tensor:
        """(V, sum d_c): [id_vec, text_vec] per item; fused score = fused_vec . Queries.fused."""
        return torch.cat(self.matrices, dim=1)

    def index_of(self) -> dict[str, int]:
        if not hasattr(self, "_index_of"):
            self._index_of = {item: i for i, item in enumerate(self.item_ids)}
        return self._index_of

    def scoring(self) -> "Scoring":
        if not hasattr(self, "_scoring"):
            self._scoring = Scoring(self)
        return self._scoring


class LocalTable:
    """The whole item table on one process, shaped like `ShardedItemTable` for the engine's
    `session_queries` (fetch: distinct ids, their rows, the inverse) and `item_matrix`."""

    def __init__(self, x: torch.Tensor | None, f16: torch.Tensor):
        self.x, self.f16 = x, f16
        self.num_local = len(f16)

    def fetch(self, ids: torch.Tensor, need_x: bool, need_f: bool):
        uniq, inverse = torch.unique(ids, return_inverse=True)
        x = self.x[uniq] if need_x else None
        f = self.f16[uniq].float() if need_f else None
        return x, f, inverse


def _scorer_spec(networks: dict[str, Network], x, f16, world: int, tile_rows: int, alpha: float,
                 alpha_sweep) -> tuple[list[torch.Tensor], list[float], dict[str, list[float]]]:
    """The engine's Scorer, built shard by shard exactly as each rank builds it (same rows per
    shard, same tiles), scattered back into item_idx order."""
    V = len(f16)
    mats, scorer = None, None
    for rank in range(world):
        rows = Placement(world).ids_of(rank, V, f16.device)
        table = SimpleNamespace(num_local=len(rows), x=x[rows] if x is not None else None, f16=f16[rows])
        scorer = Scorer.build(networks, table, alpha, tile_rows, tuple(alpha_sweep))
        if mats is None:
            mats = [torch.empty(V, m.shape[1], dtype=m.dtype, device=m.device) for m in scorer.matrices]
        for full, m in zip(mats, scorer.matrices):
            full[rows] = m
    return mats, list(scorer.scales), {k: list(map(float, w)) for k, w in scorer.weights.items()}


def _item_table(data: Dataset) -> tuple[list[str], list[str | None], np.ndarray]:
    items = data.items()
    if items["item_idx"].to_numpy().tolist() != list(range(data.num_items)):
        raise DataError(f"{data.path / 'items.parquet'}: item_idx is not 0..V-1 in order")
    return items["item_id"].to_pylist(), items["text"].to_pylist(), items["popularity"].to_numpy()


def load_run(run_dir: str | Path, data_path: str | Path | None = None, device: torch.device | str = "cpu") -> Bundle:
    """A training run directory (config.toml + model/) -> Bundle on `device` (its item matrices computed
    there); DataError/ConfigError if unusable."""
    device = torch.device(device)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    if not (run_dir / "config.toml").is_file():
        raise DataError(f"{run_dir}: no config.toml (not a training run directory)")
    if not (run_dir / "model").is_dir():
        raise DataError(f"{run_dir}: no model/ (the run has not saved a model: it is written at its best "
                        "validation epoch)")
    cfg = load_config(run_dir / "config.toml")
    manifest, states, x = load_model(run_dir / "model")
    path = Path(data_path) if data_path else Path(manifest.get("dataset") or cfg.resolve_path(cfg.data.path))
    if not path.exists():
        raise DataError(f"{path}: dataset of run {run_dir} not found (pass --data)")
    data = Dataset(path)
    data.check()
    if data.num_items != manifest["num_items"]:
        raise DataError(f"{path}: {data.num_items} items, the model of {run_dir} has {manifest['num_items']}")
    if manifest.get("method", cfg.train.method) != cfg.train.method:
        raise DataError(f"{run_dir}: model/ was saved by method {manifest['method']!r}, config.toml says "
                        f"{cfg.train.method!r}")
    networks = {k: net.to(device) for k, net in
                _networks(cfg.train.method, cfg.model, data.text_dim, cfg.data.max_len, states, run_dir / "model").items()}
    x = x.to(device) if x is not None else None
    f16 = torch.from_numpy(np.ascontiguousarray(data.text_features())).to(device)
    e = cfg.eval
    mats, scales, weights = _scorer_spec(networks, x, f16, manifest["world_size"], e.tile_rows, e.alpha, e.alpha_sweep)
    item_ids, texts, popularity = _item_table(data)
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else None
    provenance = {
        "run": {
            "path": str(run_dir.resolve()),
            "summary_best_epoch": summary.get("best_epoch") if summary else None,
            "selection": summary.get("selection") if summary else None,
            "model_epoch": manifest.get("epoch"),
            "model_manifest_sha256": file_sha256(run_dir / "model" / "manifest.json"),
            "model_files_sha256": manifest["files"],
        },
        "dataset": {
            "path": str(path.resolve()),
            "manifest_sha256": file_sha256(path / "manifest.json"),
            "items_sha256": file_sha256(path / "items.parquet"),
            "num_items": data.num_items,
        },
    }
    return Bundle(cfg.train.method, cfg.model, networks, x, f16, mats, scales, weights, manifest["world_size"],
                  e.tile_rows, e.batch_size, cfg.data.max_len, list(e.longtail_bins), item_ids, texts, popularity,
                  provenance)


def _networks(method: str, model_cfg: ModelConfig, text_dim: int, max_len: int, states: dict,
              where: Path) -> dict[str, Network]:
    networks = build_networks(method, model_cfg, text_dim, max_len)
    if set(states) != set(networks):
        raise DataError(f"{where}: networks {sorted(states)} do not match method {method!r} ({sorted(networks)})")
    for name, net in networks.items():
        try:
            net.load_state_dict(states[name])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise DataError(f"{where}: network {name!r} does not fit the config ({first})") from None
        net.eval()
    return networks


# -- the query side: one function for recommend, batch scoring and serving ----------------------

@dataclass
class Queries:
    parts: list[torch.Tensor]         # per component (G, d_c)
    scales: list[float]
    fused_weights: list[float]

    @property
    def fused(self) -> torch.Tensor:
        """(G, sum d_c): [w_id*s_id*q_id, w_text*s_text*q_text]; fused_vec . this = the fused score."""
        return fused_query(self.parts, self.scales, self.fused_weights)


def fused_query(parts: list[torch.Tensor], scales: list[float], weights: list[float]) -> torch.Tensor:
    return torch.cat([(w * s) * q for q, s, w in zip(parts, scales, weights)], dim=1)


@torch.no_grad()
def encode_sessions(bundle: Bundle, batches: list[Batch]) -> Queries:
    """The session queries of the rows of `batches` (concatenated in order), by the engine's own
    `evaluate.session_queries` on a one-process table. Pass the engine's per-rank slices of a
    global eval batch (see batch_score.local_batches) to reproduce its queries bit for bit."""
    table = LocalTable(bundle.x, bundle.f16)
    per_batch = [session_queries(bundle.networks, table, b.to(bundle.device)) for b in batches]
    parts = [torch.cat(qs) for qs in zip(*per_batch)]
    return Queries(parts, bundle.scales, bundle.weights["fused"])


def session_batch(histories: list[list[int]], max_len: int) -> Batch:
    """Left-aligned batch of item_idx histories (each cut to its last max_len items), as the reader: on the
    host, as the reader's (`Batch.to` moves it)."""
    hist = [h[-max_len:] for h in histories]
    if any(not h for h in hist):
        raise DataError("empty session")
    n = len(hist)
    offsets = np.cumsum([0] + [len(h) for h in hist], dtype=np.int64)
    values = np.fromiter((i for h in hist for i in h), dtype=np.int64, count=int(offsets[-1]))
    return to_batch(Rows(np.arange(n, dtype=np.int64), offsets, values, np.zeros(n, dtype=np.int64)),
                    np.ones(n, dtype=bool))


# -- the item side: the engine's exact scores, ranks and top-N -------------------------------------

class Scoring:
    """Scores in the engine's float order over the engine's shard layout and tiles: the engine's own
    ranking loop (`evaluate.rank_tiles`) run over every shard's rows in turn."""

    def __init__(self, bundle: Bundle):
        V, W = bundle.num_items, bundle.world
        self.kinds = bundle.kinds
        self.weights = bundle.weights
        self.scales = bundle.scales
        self.matrices = bundle.matrices
        self.device = bundle.device
        placement = Placement(W)
        # shard-major, as the ranks hold them
        self.ids = placement.shard_major(V, self.device)
        self.shard_matrices = [m[self.ids].contiguous() for m in bundle.matrices]
        tile = device_tile_rows(bundle.tile_rows, self.device, bundle.eval_batch_size)
        self.tiles = []  # (start, stop) in shard-major rows, never across a shard
        start = 0
        for r in range(W):
            n = len(placement.ids_of(r, V))
            self.tiles += [(start + s, start + min(s + tile, n)) for s in range(0, n, tile)]
            start += n

    @torch.no_grad()
    def run(self, queries: list[torch.Tensor], top: int, target: torch.Tensor | None = None,
            top_kind: str = "fused") -> tuple[torch.Tensor | None, "TopN"]:
        """(counts (G, K) of items ordering before each target per kind, or None without targets;
        the top-`top` items of `top_kind` with their part scores)."""
        target_scores = None
        if target is not None:
            target_scores = kind_scores(component_scores(queries, self.matrices, self.scales, target), self.weights)
        best = TopN(top, len(queries[0]), len(queries), self.device)
        counts = rank_tiles(queries, self.shard_matrices, self.scales, self.weights, self.tiles, self.ids,
                            target, target_scores, top_kind, best.add)
        return counts, best

    @torch.no_grad()
    def rescore(self, queries: list[torch.Tensor], candidates: torch.Tensor, top: int, kind: str = "fused"):
        """Re-rank candidate item indices (G, C) (-1 = none) by the engine-order score of `kind`:
        (scores (G, top), items (G, top), parts [(G, top)] per component)."""
        cand = candidates.clamp(min=0)
        parts = [torch.einsum("gd,gcd->gc", q, m[cand]) * sc for q, m, sc in zip(queries, self.matrices, self.scales)]
        scores = sum(w * p for w, p in zip(self.weights[kind], parts) if w)
        scores = torch.where(candidates >= 0, scores, float("-inf"))
        order = _order_desc(scores, candidates)[:, :top]
        return (scores.gather(1, order), candidates.gather(1, order), [p.gather(1, order) for p in parts])


def _order_desc(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the column order by (score desc, id asc)."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_id), dim=1, descending=True, stable=True)
    return by_id.gather(1, by_score)


class TopN:
    """Running top-n per row over tiles, ordered by (score desc, item index asc): the engine's order."""

    def __init__(self, n: int, rows: int, num_parts: int, device: torch.device):
        self.n = n
        self.scores = torch.empty(rows, 0, device=device)
        self.items = torch.empty(rows, 0, dtype=torch.long, device=device)
        self.parts = [torch.empty(rows, 0, device=device) for _ in range(num_parts)]

    def add(self, scores: torch.Tensor, tile_ids: torch.Tensor, parts: list[torch.Tensor]) -> None:
        G, T = scores.shape
        k = min(self.n, T)
        threshold = scores.topk(k, dim=1).values[:, -1:]  # values are exact whatever topk's tie order
        above = scores > threshold
        tied = scores == threshold
        # fill up with the tied items of smallest index (tile ids are ascending)
        need = k - above.sum(1, keepdim=True)
        keep = above | (tied & (tied.cumsum(1) <= need))
        cols = keep.nonzero()[:, 1].view(G, k)
        self.scores = torch.cat([self.scores, scores.gather(1, cols)], 1)
        self.items = torch.cat([self.items, tile_ids[cols]], 1)
        self.parts = [torch.cat([a, p.gather(1, cols)], 1) for a, p in zip(self.parts, parts)]
        order = _order_desc(self.scores, self.items)[:, :self.n]
        self.scores, self.items = self.scores.gather(1, order), self.items.gather(1, order)
        self.parts = [p.gather(1, order) for p in self.parts]


# -- writing and reading an export ----------------------------------------------------------------

def _vectors(m: torch.Tensor) -> pa.FixedSizeListArray:
    m = m.detach().cpu().contiguous().numpy().astype(np.float32, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def write_export(bundle: Bundle, out: str | Path, overwrite: bool = False) -> Path:
    """Write `bundle` to `out` through a temp directory renamed into place."""
    out = check_out(out, overwrite)
    with Staged(out) as staged:
        tmp = staged.tmp
        (tmp / "tables").mkdir(parents=True)
        V = bundle.num_items
        fused = bundle.fused_vectors()
        table = pa.table({
            "item_idx": pa.array(np.arange(V, dtype=np.int32)),
            "item_id": pa.array(bundle.item_ids, type=pa.string()),
            "text": pa.array(bundle.texts, type=pa.string()),
            "popularity": pa.array(np.asarray(bundle.popularity, dtype=np.int64)),
            "id_vec": _vectors(bundle.matrices[0]),
            "text_vec": _vectors(bundle.matrices[1]),
            "fused_vec": _vectors(fused),
        })
        pq.write_table(table, tmp / "items.parquet")
        torch.save({"method": bundle.method, "model": dataclasses.asdict(bundle.model_cfg),
                    "text_dim": int(bundle.f16.shape[1]), "max_len": bundle.max_len,
                    "states": on_cpu({k: n.state_dict() for k, n in bundle.networks.items()})}, tmp / "encoders.pt")
        if bundle.x is not None:
            np.save(tmp / "tables" / "id_rows.npy", bundle.x.detach().cpu().numpy())
        np.save(tmp / "tables" / "text_features.npy", bundle.f16.cpu().numpy())
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(tmp / "manifest.json", {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": bundle.method,
            **bundle.provenance,
            # kinds as a list: their order is the column order of the engine's weight matrix
            "scoring": {"components": list(COMPONENTS), "scales": bundle.scales, "kinds": bundle.kinds,
                        "weights": [bundle.weights[k] for k in bundle.kinds],
                        "fused": "fused_vec . [w_id*s_id*q_id, w_text*s_text*q_text]",
                        "dims": {"id_vec": int(bundle.matrices[0].shape[1]), "text_vec": int(bundle.matrices[1].shape[1]),
                                 "fused_vec": int(fused.shape[1])}},
            "engine": {"world_size": bundle.world, "tile_rows": bundle.tile_rows,
                       "eval_batch_size": bundle.eval_batch_size, "max_len": bundle.max_len,
                       "longtail_bins": bundle.longtail_bins},
            "files": {name: file_sha256(tmp / name) for name in files},
        })
    return out


def load_encoders(path: str | Path) -> tuple[str, ModelConfig, dict[str, Network]]:
    """encoders.pt -> (method, model config, {name: Network} in eval mode); plain torch, no process group."""
    blob = torch.load(path, weights_only=True, map_location="cpu")
    cfg = ModelConfig(**blob["model"])
    return blob["method"], cfg, _networks(blob["method"], cfg, blob["text_dim"], blob["max_len"], blob["states"],
                                          Path(path))


def _column(table: pa.Table, name: str) -> torch.Tensor:
    col = table[name].combine_chunks()
    return torch.from_numpy(col.values.to_numpy().reshape(len(col), -1).copy()).to("cpu")


def load_export(export_dir: str | Path, verify: bool = True) -> Bundle:
    """An export directory -> Bundle (checksums verified)."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, "no export manifest (make one with `python -m alterrec_dist.export`)",
                             {"files": dict, "scoring": dict, "engine": dict}, FORMAT_VERSION,
                             "an incomplete export manifest: export again")
    if verify:
        verify_files(export_dir, manifest["files"], export_dir / "manifest.json")
    method, cfg, networks = load_encoders(export_dir / "encoders.pt")
    items = pq.read_table(export_dir / "items.parquet")
    x_path = export_dir / "tables" / "id_rows.npy"
    x = torch.from_numpy(np.load(x_path)).to("cpu") if x_path.is_file() else None
    f16 = torch.from_numpy(np.load(export_dir / "tables" / "text_features.npy")).to("cpu")
    s, eng = manifest["scoring"], manifest["engine"]
    return Bundle(method, cfg, networks, x, f16, [_column(items, "id_vec"), _column(items, "text_vec")],
                  [float(v) for v in s["scales"]], {k: [float(w) for w in v] for k, v in zip(s["kinds"], s["weights"])},
                  eng["world_size"], eng["tile_rows"], eng["eval_batch_size"], eng["max_len"], eng["longtail_bins"],
                  items["item_id"].to_pylist(), items["text"].to_pylist(), items["popularity"].to_numpy(),
                  {k: manifest[k] for k in ("run", "dataset") if k in manifest} | {"export": str(export_dir.resolve())})


def load_bundle(run: str | None = None, export: str | None = None, data: str | None = None,
                device: str = "cpu") -> Bundle:
    """The CLIs' --run / --export choice, scoring on `device` (--device)."""
    if bool(run) == bool(export):
        raise ConfigError("give exactly one of --run RUN_DIR and --export EXPORT_DIR")
    device = inference_device(device)
    return load_run(run, data, device) if run else load_export(export).to(device)


def inference_device(name: str) -> torch.device:
    """--device as a torch device; ConfigError in one line for a name torch does not know or a GPU not there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="where the model scores: cpu (default), cuda or cuda:N; a GPU run's model scores on a CPU too")


# -- CLI ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m alterrec_dist.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="training run directory (config.toml, summary.json, model/)")
    p.add_argument("--out", required=True, help="export directory to write (atomically)")
    p.add_argument("--data", help="dataset directory (default: the one the run's model names)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_device_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = inference_device(args.device)
    check_out(args.out, args.overwrite)  # before the model is loaded
    bundle = load_run(args.run, args.data, device)
    out = write_export(bundle, args.out, args.overwrite)
    dims = [m.shape[1] for m in bundle.matrices]
    print(f"exported {bundle.num_items} items ({bundle.method}; id_vec {dims[0]}, text_vec {dims[1]}, "
          f"fused_vec {sum(dims)}) from {args.run} (best epoch {bundle.provenance['run']['summary_best_epoch']}) "
          f"to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
