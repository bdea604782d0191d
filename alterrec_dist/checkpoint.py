"""The trained model on disk: per-rank ID-table shards, the dense networks, and a manifest.

    RUN_DIR/model/manifest.json          epoch, world size, partition rule, files with sha256
    RUN_DIR/model/networks.pt            {name: state_dict} of every network (rank 0 writes it)
    RUN_DIR/model/shard-00000-of-00002.pt {"items": global ids, "x": ID rows or None}, one per rank

Rank r holds items r, r+W, r+2W, ... (the modulo rule of `ShardedItemTable`), so the full ID table
is reassembled by scattering each shard's rows to its `items`; no distributed set-up is needed to
read it back (`load_model`). A save writes a fresh temp directory and swaps it in by rename, so a
reader never sees a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from alterrec_dist.dataset import DataError, atomic_write_json, file_sha256

PARTITION = "item i on rank i mod world_size, local row i div world_size"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.pt"


def save_model(comm, networks: dict, table, model_dir: Path, meta: dict) -> None:
    """Every rank writes its ID rows; rank 0 the networks and the manifest, then swaps the directory in."""
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    x = table.x.detach().clone() if table.x is not None else None
    torch.save({"items": table.global_ids.clone(), "x": x}, tmp / shard_name(comm.rank, comm.world))
    comm.barrier()
    if comm.rank == 0:
        torch.save({name: net.state_dict() for name, net in networks.items()}, tmp / "networks.pt")
        files = sorted(p.name for p in tmp.iterdir())
        atomic_write_json(tmp / "manifest.json", {
            **meta, "world_size": comm.world, "partition": PARTITION, "num_items": table.num_items,
            "files": {name: file_sha256(tmp / name) for name in files},
        })
        old = model_dir.with_name(f".{model_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if model_dir.exists():
            os.replace(model_dir, old)
        os.replace(tmp, model_dir)
        shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def verify_files(directory: Path, digests: dict[str, str], manifest_path: Path) -> None:
    """DataError naming the first file of `digests` that is missing or whose sha256 differs."""
    for name, digest in digests.items():
        path = Path(directory) / name
        if not path.is_file() or file_sha256(path) != digest:
            raise DataError(f"{path}: missing or corrupt (sha256 does not match {manifest_path})")


def load_model(model_dir: Path) -> tuple[dict, dict, torch.Tensor | None]:
    """(manifest, {name: state_dict}, the full (V, d) ID table or None), checksums verified."""
    model_dir = Path(model_dir)
    manifest_path = model_dir / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"{manifest_path}: no saved model (train a run first; the model is saved at its best epoch)")
    manifest = json.loads(manifest_path.read_text())
    verify_files(model_dir, manifest["files"], manifest_path)
    states = torch.load(model_dir / "networks.pt", weights_only=True)
    W, V = manifest["world_size"], manifest["num_items"]
    x = None
    for rank in range(W):
        shard = torch.load(model_dir / shard_name(rank, W), weights_only=True)
        if shard["x"] is not None:
            if x is None:
                x = torch.empty(V, shard["x"].shape[1], dtype=shard["x"].dtype)
            x[shard["items"]] = shard["x"]
    return manifest, states, x
