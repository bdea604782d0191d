"""A training run directory (config.toml + model/) as a `ScoringModel`, without any torch.distributed set-up."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from alterrec_dist.common import run_layout
from alterrec_dist.common.config import ModelConfig, load_saved_config
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import check_keys, file_sha256, read_json, resolve_location
from alterrec_dist.common.methods import sweep_kind
from alterrec_dist.common.storage import MANIFEST, Location
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.eval.evaluate import Scorer, kind_weights
from alterrec_dist.model.networks import Network, build_networks
from alterrec_dist.parallel.saved import load_model
from alterrec_dist.parallel.table import Placement
from alterrec_dist.serve.scoring_model import ScoringModel


def _scorer_spec(networks: dict[str, Network], x, features, world: int, tile_rows: int,
                 weights: dict[str, list[float]]) -> tuple[list[torch.Tensor], list[float], dict[str, list[float]]]:
    """The engine's Scorer, built shard by shard exactly as each rank builds it (same rows per
    shard, same tiles), scattered back into item_idx order."""
    V = len(features)
    mats, scorer = None, None
    for rank in range(world):
        rows = Placement(world).ids_of(rank, V, features.device)
        table = SimpleNamespace(num_local=len(rows), x=x[rows] if x is not None else None, features=features[rows])
        scorer = Scorer.build(networks, table, weights, tile_rows)
        if mats is None:
            mats = [torch.empty(V, m.shape[1], dtype=m.dtype, device=m.device) for m in scorer.matrices]
        for full, m in zip(mats, scorer.matrices):
            full[rows] = m
    return mats, list(scorer.scales), {k: list(map(float, w)) for k, w in scorer.weights.items()}


def _item_table(data: Dataset) -> tuple[list[str], list[str | None], np.ndarray]:
    items = data.items()
    if items["item_idx"].to_numpy().tolist() != list(range(data.num_items)):
        raise DataError(f"{data.items_path}: item_idx is not 0..V-1 in order")
    return items["item_id"].to_pylist(), items["text"].to_pylist(), items["popularity"].to_numpy()


def load_run(run_dir: str | Location, data_path: str | Location | None = None, device: torch.device | str = "cpu") -> ScoringModel:
    """A training run directory (config.toml + model/) -> ScoringModel on `device` (its item matrices computed
    there); DataError/ConfigError if unusable."""
    device = torch.device(device)
    run_dir = resolve_location(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    if not (run_dir / run_layout.CONFIG).is_file():
        raise DataError(f"{run_dir}: no config.toml (not a training run directory)")
    if not (run_dir / run_layout.MODEL).is_dir():
        raise DataError(f"{run_dir}: no model/ (the run has not saved a model: it is written at its best "
                        "validation epoch)")
    cfg = load_saved_config(run_dir / run_layout.CONFIG)
    manifest, states, x = load_model(run_dir / run_layout.MODEL)
    path = resolve_location(data_path or manifest.get("dataset") or cfg.resolve_path(cfg.data.path))
    if not path.exists():
        raise DataError(f"{path}: dataset of run {run_dir} not found (pass --data)")
    data = Dataset(path)
    data.check()
    if data.num_items != manifest["num_items"]:
        raise DataError(f"{path}: {data.num_items} items, the model of {run_dir} has {manifest['num_items']}")
    record = run_dir / run_layout.DATASET
    unlike = data.unlike(record, items_only=True)
    if unlike:
        raise DataError(f"{path}: not the items the model of {run_dir} was trained on ({record}: {unlike}); "
                        "pass --data with the run's dataset")
    if manifest.get("method", cfg.train.method) != cfg.train.method:
        raise DataError(f"{run_dir}: model/ was saved by method {manifest['method']!r}, config.toml says "
                        f"{cfg.train.method!r}")
    networks = {k: net.to(device) for k, net in load_networks(cfg.train.method, cfg.model, data.text_dim,
                                                              cfg.data.max_len, states, run_dir / run_layout.MODEL).items()}
    x = x.to(device) if x is not None else None
    features = torch.from_numpy(np.ascontiguousarray(data.text_features())).to(device)
    e = cfg.eval
    model_manifest = run_dir / run_layout.MODEL / MANIFEST
    batch_size, tile_rows = measured_shape(manifest, e.batch_size, e.tile_rows, model_manifest)
    mats, scales, weights = _scorer_spec(networks, x, features, manifest["world_size"], tile_rows,
                                         kind_weights(cfg.train.method, e.alpha, tuple(e.alpha_sweep)))
    item_ids, texts, popularity = _item_table(data)
    summary_path = run_dir / run_layout.SUMMARY
    summary = read_json(summary_path) if summary_path.is_file() else None
    # the model's own record of the alpha it was chosen with; a model saved before it kept one: the summary's
    served = (served_kind(manifest, e.alpha, weights, model_manifest)
              if "alpha" in manifest else served_kind(summary, e.alpha, weights, summary_path))
    provenance = {
        "run": {
            "path": str(run_dir.resolve()),
            "summary_best_epoch": summary.get("best_epoch") if summary else None,
            "selection": summary.get("selection") if summary else None,
            "model_epoch": manifest.get("epoch"),
            "model_manifest_sha256": file_sha256(model_manifest),
            "model_files_sha256": manifest["files"],
        },
        "dataset": {
            "path": str(path.resolve()),
            "manifest_sha256": file_sha256(path / MANIFEST),
            "items_sha256": file_sha256(data.items_path),
            "num_items": data.num_items,
        },
    }
    return ScoringModel(cfg.train.method, cfg.model, networks, x, features, mats, scales, weights, manifest["world_size"],
                  tile_rows, batch_size, cfg.data.max_len, list(e.longtail_bins), item_ids, texts, popularity,
                  provenance, served)


def measured_shape(manifest: dict, batch_size: int, tile_rows: int, where: Location) -> tuple[int, int]:
    """(eval batch size, tile rows) the model's metrics were measured in (`recipe.measured_in`): config.toml's
    after a resume that changed them made batch scoring round a tie otherwise and miss the summary. A model
    saved before it kept them: config.toml's."""
    measured = manifest.get("eval")
    if measured is None:
        return batch_size, tile_rows
    check_keys(where, measured if isinstance(measured, dict) else {}, {"batch_size": int, "tile_rows": int},
               "a damaged model: rerun the run", prefix="eval.")
    return measured["batch_size"], measured["tile_rows"]


def served_kind(record: dict | None, alpha: float, weights: dict[str, list[float]], where: Location) -> str:
    """The kind a run's model serves: the fused score at the alpha chosen on validation (`eval.alpha` without a
    choice: no sweep, or a method with no alpha) as `record` (model/manifest.json, or summary.json, at `where`)
    holds it, so what recommend and batch scoring rank by is what the run reported as its result."""
    record = (record or {}).get("alpha")
    if record is None:
        return "fused"
    chosen = record.get("chosen") if isinstance(record, dict) else None
    if isinstance(chosen, bool) or not isinstance(chosen, (int, float)):  # what training writes: a number
        raise DataError(f"{where}: alpha.chosen is {chosen!r}, not a number (damaged: rerun the run)")
    if chosen == alpha:
        return "fused"
    if sweep_kind(chosen) not in weights:
        raise DataError(f"{where}: chosen alpha {chosen} is not among config.toml's eval.alpha_sweep")
    return sweep_kind(chosen)


def load_networks(method: str, model_cfg: ModelConfig, text_dim: int, max_len: int, states: dict,
              where: Location) -> dict[str, Network]:
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


def inference_device(name: str) -> torch.device:
    """--device as a torch device; ConfigError in one line for a name `device_named` refuses or a GPU not there."""
    device = device_named(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible")
    return device


def device_named(name: str) -> torch.device:
    """--device as a torch device, wherever it is: ConfigError in one line for a name torch does not know, or a
    device other than cpu and cuda."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device
