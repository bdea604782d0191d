"""An export directory: written from a `ScoringModel` (`write_export`), read back as one (`load_export`)."""
from __future__ import annotations

import dataclasses
import warnings
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alterrec_dist.common import storage
from alterrec_dist.common.config import Config, ModelConfig
from alterrec_dist.common.errors import ConfigError, DataError, one_line
from alterrec_dist.common.files import (Staged, atomic_write_json, check_keys, check_out, file_sha256, load_unreplaced,
                                        read_manifest, resolve_location)
from alterrec_dist.common.methods import METHODS
from alterrec_dist.common.run_layout import served_paths
from alterrec_dist.common.storage import MANIFEST, Location
from alterrec_dist.data.dataset import dataset_files, read_parquet
from alterrec_dist.eval.evaluate import COMPONENTS
from alterrec_dist.model.networks import Network
from alterrec_dist.parallel.saved import load_cpu, on_cpu, save_file, verify_files
from alterrec_dist.serve.from_run import inference_device, load_networks, load_run
from alterrec_dist.serve.scoring_model import ScoringModel


FORMAT_VERSION = 1
# The files of an export (export.py's docstring says what each holds), written by `write_export`, read by `load_export`.
ITEMS = "items.parquet"
ITEM_COLUMNS = ("item_id", "text", "popularity", "id_vec", "text_vec")
ENCODERS = "encoders.pt"
TABLES = "tables"
ID_ROWS = f"{TABLES}/id_rows.npy"
TEXT_FEATURES = f"{TABLES}/text_features.npy"


# -- writing and reading an export ----------------------------------------------------------------

def _vectors(m: torch.Tensor) -> pa.FixedSizeListArray:
    m = m.detach().cpu().contiguous().numpy().astype(np.float32, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def write_export(bundle: ScoringModel, out: str | Location, overwrite: bool = False) -> Location:
    """Write `bundle` to `out` through a temp directory renamed into place (in a store: uploaded, manifest last)."""
    prov = bundle.provenance  # what the bundle was read from: a run and its dataset, or an export
    out = check_out(out, overwrite, [*served_paths(prov.get("run", {}).get("path")),
                                     *dataset_files(prov.get("dataset", {}).get("path")),
                                     *export_files(prov.get("export"))])
    with Staged(out) as staged:
        tmp = staged.tmp
        staged.make_dirs(TABLES)
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
        pq.write_table(table, tmp / ITEMS)
        save_file(tmp / ENCODERS, {"method": bundle.method, "model": dataclasses.asdict(bundle.model_cfg),
                                   "text_dim": int(bundle.features.shape[1]), "max_len": bundle.max_len,
                                   "states": on_cpu({k: n.state_dict() for k, n in bundle.networks.items()})})
        if bundle.x is not None:
            np.save(tmp / ID_ROWS, bundle.x.detach().cpu().numpy())
        np.save(tmp / TEXT_FEATURES, bundle.features.cpu().numpy())
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": bundle.method,
            **bundle.provenance,
            # kinds as a list: their order is the column order of the engine's weight matrix
            "scoring": {"components": list(COMPONENTS), "scales": bundle.scales, "kinds": bundle.kinds,
                        "weights": [bundle.weights[k] for k in bundle.kinds], "served": bundle.served,
                        "fused": "fused_vec . [w_id*s_id*q_id, w_text*s_text*q_text]",
                        "dims": {"id_vec": int(bundle.matrices[0].shape[1]), "text_vec": int(bundle.matrices[1].shape[1]),
                                 "fused_vec": int(fused.shape[1])}},
            "engine": {"world_size": bundle.world, "tile_rows": bundle.tile_rows,
                       "eval_batch_size": bundle.eval_batch_size, "max_len": bundle.max_len,
                       "longtail_bins": bundle.longtail_bins},
            "files": {name: file_sha256(tmp / name) for name in files},
        })
    return out


ENCODER_KEYS = {"method": str, "model": dict, "text_dim": int, "max_len": int, "states": dict}


def load_encoders(path: Location, text_dim: int, max_len: int) -> tuple[str, ModelConfig, dict[str, Network]]:
    """encoders.pt -> (method, model config, {name: Network} in eval mode); plain torch, no process group.
    What it says is checked before a network is built: its settings as a config's (ranges included), its
    text_dim and max_len those of the export's text features and manifest (a 10 kB file declaring text_dim
    12,000,000 took 3.3 GB before anything failed; a setting this version does not know was a TypeError)."""
    blob = load_cpu(path)
    if not isinstance(blob, dict):
        raise DataError(f"{path}: not an export's encoders file")
    check_keys(path, blob, ENCODER_KEYS, "not an export's encoders file: export again")
    if blob["method"] not in METHODS:
        raise DataError(f"{path}: method {blob['method']!r} is none this version knows ({', '.join(METHODS)})")
    try:
        cfg = Config.from_dict({"model": blob["model"]}, saved=True).model  # as the run was trained: it serves
    except ConfigError as e:
        raise DataError(f"{path}: its model settings: {e}") from None
    if (blob["text_dim"], blob["max_len"]) != (text_dim, max_len):
        raise DataError(f"{path}: text_dim {blob['text_dim']} and max_len {blob['max_len']} are not the export's "
                        f"({text_dim}: its text features' width, {max_len}: its manifest's)")
    return blob["method"], cfg, load_networks(blob["method"], cfg, text_dim, max_len, blob["states"], path)


def _column(table: pa.Table, name: str) -> torch.Tensor:
    col = table[name].combine_chunks()
    return torch.from_numpy(col.values.to_numpy().reshape(len(col), -1).copy()).to("cpu")


MISSING_MANIFEST = ("no export manifest: not an export (make one with `python -m alterrec_dist.export`), or one "
                    "being written or replaced now (load it again when that ends)")


def export_files(export_dir: str | Location | None) -> list[Location]:
    """Every file loading the export reads: its manifest and the files that names (an output may lie beside
    them); the directory itself where the manifest cannot be read; none for no export (None, or "")."""
    if not export_dir:
        return []
    export_dir = resolve_location(export_dir)
    try:
        names = _export_manifest(export_dir)["files"]
    except DataError:
        return [export_dir]
    return [export_dir / MANIFEST, *(export_dir / name for name in names)]


def load_export(export_dir: str | Location) -> ScoringModel:
    """An export directory, local or in a store -> ScoringModel (checksums verified; one that `export
    --overwrite` replaces meanwhile is read again: `load_unreplaced`)."""
    export_dir = resolve_location(export_dir)
    return load_unreplaced(export_dir, _export_manifest, lambda manifest: _load_export_files(export_dir, manifest))


def _export_manifest(export_dir: Location) -> dict:
    remedy = "an incomplete export manifest: export again"
    manifest = read_manifest(export_dir, MISSING_MANIFEST,
                             {"files": dict, "scoring": dict, "engine": dict}, FORMAT_VERSION, remedy)
    where = export_dir / MANIFEST
    check_keys(where, manifest["scoring"], {"scales": list, "kinds": list, "weights": list}, remedy, "scoring.")
    check_keys(where, manifest["engine"], {"world_size": int, "tile_rows": int, "eval_batch_size": int, "max_len": int,
                                           "longtail_bins": list}, remedy, "engine.")
    served = _served(manifest)
    if served not in manifest["scoring"]["kinds"]:
        raise DataError(f"{where}: scoring.served {served!r} is not one of its kinds {manifest['scoring']['kinds']} "
                        f"({remedy})")
    return manifest


def _served(manifest: dict) -> str:
    return manifest["scoring"].get("served", "fused")  # exports made before the served kind was recorded: "fused"


def _load_export_files(export_dir: Location, manifest: dict) -> ScoringModel:
    verify_files(export_dir, manifest["files"], export_dir / MANIFEST)
    s, eng = manifest["scoring"], manifest["engine"]
    items = read_parquet(export_dir / ITEMS)
    missing = [c for c in ITEM_COLUMNS if c not in items.column_names]
    if missing:
        raise DataError(f"{export_dir / ITEMS}: no column {missing[0]} (export again)")
    for key in ("world_size", "eval_batch_size", "max_len"):  # before the networks: max_len sizes the positions
        if not 1 <= eng[key] <= (len(items) if key == "world_size" else 2**31):
            raise DataError(f"{export_dir / MANIFEST}: engine.{key} {eng[key]} is out of range")
    features = _item_table(export_dir / TEXT_FEATURES, len(items))
    method, cfg, networks = load_encoders(export_dir / ENCODERS, features.shape[1], eng["max_len"])
    x_path = export_dir / ID_ROWS
    x = _item_table(x_path, len(items)) if x_path.is_file() else None
    return ScoringModel(method, cfg, networks, x, features, [_column(items, "id_vec"), _column(items, "text_vec")],
                  [float(v) for v in s["scales"]], {k: [float(w) for w in v] for k, v in zip(s["kinds"], s["weights"])},
                  eng["world_size"], eng["tile_rows"], eng["eval_batch_size"], eng["max_len"], eng["longtail_bins"],
                  items["item_id"].to_pylist(), items["text"].to_pylist(), items["popularity"].to_numpy(),
                  {k: manifest[k] for k in ("run", "dataset") if k in manifest} | {"export": str(export_dir.resolve())},
                  _served(manifest))


def _item_table(path: Location, num_items: int) -> torch.Tensor:
    """An export's (V, d) float item table, of which serving reads only the rows of a query's items: memory-mapped
    where local, not read whole (at 2M items x 384 the text features were 1.4 GB in every serving process, the
    driver's and each Ray actor's of batch_score). Read-only: nothing writes it (torch warns of that, once,
    otherwise). DataError naming it unless it holds one float row per item."""
    try:
        table = storage.load_npy(path, mmap=True)
    except ValueError as e:  # a header numpy cannot read, or an object array (a pickle: never loaded)
        raise DataError(f"{path}: not a table numpy reads without pickles ({one_line(e)})") from None
    if table.ndim != 2 or len(table) != num_items or table.dtype.kind != "f":
        raise DataError(f"{path}: not a float table of one row per item ({table.dtype}, shape {table.shape}, "
                        f"{num_items} items)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(table).to("cpu")  # where it is: no copy


def load_scoring_model(run: str | None = None, export: str | None = None, data: str | None = None,
                device: str = "cpu") -> ScoringModel:
    """The CLIs' --run / --export choice, scoring on `device` (--device)."""
    if bool(run) == bool(export):
        raise ConfigError("give exactly one of --run RUN_DIR and --export EXPORT_DIR")
    device = inference_device(device)
    return load_run(run, data, device) if run else load_export(export).to(device)
