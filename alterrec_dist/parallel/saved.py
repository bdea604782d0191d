"""Directories of per-rank files plus a manifest, written by every rank at once (`publish`), and
the saved model, the one such directory that serving reads back (`load_model`).

    manifest.json      world size, partition rule, item count, the sha256 of every file, and the meta
    networks.pt        {name: state_dict} of every network (rank 0 writes it)
    <one file a rank>  with a rank-unique name

The best model, RUN_DIR/model/ (meta: epoch, method, selection, valid score, dataset):

    shard-RRRRR-of-WWWWW.pt   {"items": global ids, "x": ID rows or None}

Locally a directory is written under a temp name and swapped into place whole (`files.Staged`). In
an object store (`storage.StorePath`), which has no rename and which every rank reaches on its own,
each rank uploads its file straight into the directory, whose old manifest rank 0 removed first, and
rank 0 uploads manifest.json last, once every file is there: a directory without one is never read.
The checksums catch what neither can (a disk or an upload that lost or damaged data).
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil

import torch

from alterrec_dist.common import storage
from alterrec_dist.common.errors import DataError, one_line
from alterrec_dist.common.files import (Staged, atomic_write_json, file_sha256, load_unreplaced, read_manifest,
                                        writing)
from alterrec_dist.common.storage import MANIFEST, Location, StorePath
from alterrec_dist.parallel.table import Placement


PARTITION = "item i on rank i mod world_size, local row i div world_size"  # `Placement`, as words for the manifest
MODEL_KEYS = {"files": dict, "world_size": int, "num_items": int}  # what loading a model relies on


NETWORKS = "networks.pt"  # rank 0's file of the dense networks' state_dicts, in a saved model and a checkpoint
LINKED_MODEL = "model"  # the best model as a checkpoint holds it (`publish`'s model_dir)


def rank_file_name(kind: str, rank: int, world: int) -> str:
    """The file rank `rank` of `world` writes: "shard" in a saved model, "rank" in a checkpoint."""
    return f"{kind}-{rank:05d}-of-{world:05d}.pt"


def network_states(networks: dict) -> dict:
    """The shared file of every saved directory: {NETWORKS: {name: state_dict}}."""
    return {NETWORKS: {name: net.state_dict() for name, net in networks.items()}}


# -- writing a directory of per-rank files -----------------------------------------------------

def on_cpu(obj):
    """`obj` with every tensor in it (through dicts, lists and tuples) copied to the CPU: what is saved
    loads on any machine, a CPU-only one included, whatever device trained it."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def load_cpu(path: Location, mmap: bool = False):
    """A file `publish` wrote, as CPU tensors (`map_location`: whatever the writer's device was);
    memory-mapped when local and asked for, read whole from a store. Tensors and plain containers only
    (`weights_only`: a pickle that would run code is refused), and a file torch cannot read so is a
    DataError naming it (a crafted or foreign file was a 40-line UnpicklingError traceback)."""
    try:
        if isinstance(path, StorePath):
            return torch.load(io.BytesIO(path.read_bytes()), weights_only=True, map_location="cpu")
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except OSError:
        raise
    except pickle.UnpicklingError:
        raise DataError(f"{path}: holds objects other than tensors and plain containers, which are never "
                        "unpickled (not a file this project saved)") from None
    except Exception as e:  # RuntimeError (not a zip), EOFError, ...: what the file holds, whatever it is
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e):  # torch's CPU allocator: a RuntimeError
            raise MemoryError(f"{path}: {one_line(e)}") from None  # a machine too small, not a foreign file
        raise DataError(f"{path}: not a file this project saved ({type(e).__name__}: {one_line(e)})") from None


def save_file(path: Location, obj) -> str:
    """`torch.save(obj)` to `path`, local or in a store (one upload); the file's sha256. A write that fails is an
    OSError, as from any other writer."""
    if isinstance(path, StorePath):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        path.write_bytes(buffer.getbuffer())
        return hashlib.sha256(buffer.getbuffer()).hexdigest()
    try:
        torch.save(obj, path)
    except RuntimeError as e:  # torch's zip writer says only "unexpected pos" where a write fell short
        raise OSError(f"a write fell short: a full disk? (torch: {one_line(e)})") from None
    return file_sha256(path)  # hashed while it is still in the page cache


def publish(comm, target: Location, own: tuple[str, object], shared: dict[str, object], meta: dict,
            model_dir: Location | None = None) -> None:
    """Write directory `target` from every rank: each saves `own` (name, object), rank 0 also the
    `shared` files and, if `model_dir` holds a model, links it in as model/; then rank 0 writes
    manifest.json (meta, world size, partition rule, sha256 of every file) and renames the directory
    into place (in a store: see the module docstring). Collective: every rank calls it. Every tensor is
    saved from the CPU (`on_cpu`)."""
    staged = None
    if isinstance(target, StorePath):
        if comm.rank == 0:
            target.remove_tree()  # its old manifest first: from here on no reader trusts it
        comm.barrier()
        tmp = target
    else:
        staged = Staged(target) if comm.rank == 0 else None
        if staged is not None:
            staged.tmp.mkdir()
        tmp = comm.broadcast_object(staged.tmp if staged is not None else None)  # rank 0's temp directory
    with writing(target):
        try:
            _write_staged(comm, tmp, own, shared, meta, model_dir)
        except BaseException:  # a full disk, another rank's failure: the half-written directory goes (it stayed)
            if staged is not None:
                staged.abort()
            raise
    if staged is not None:
        staged.commit()
    comm.barrier()


def _write_staged(comm, tmp: Location, own: tuple[str, object], shared: dict[str, object], meta: dict,
                  model_dir: Location | None) -> None:
    name, obj = own
    # each rank hashes its own file, in parallel
    digests = comm.all_gather_object((name, save_file(tmp / name, on_cpu(obj))))
    if comm.rank == 0:
        files = dict(digests)
        for shared_name, shared_obj in shared.items():
            files[shared_name] = save_file(tmp / shared_name, on_cpu(shared_obj))
        if model_dir is not None and (model_dir / MANIFEST).is_file():
            files |= _link_model(model_dir, tmp / LINKED_MODEL)
        atomic_write_json(tmp / MANIFEST, {**meta, "world_size": comm.world, "partition": PARTITION,
                                           "files": dict(sorted(files.items()))})


def link_dir(src: Location, dst: Location) -> None:
    """Every file of `src` into the new directory `dst`: hard links, so nothing is written twice (the
    model's files are never modified in place: a new model is a new directory), copies where the
    file system has no links (in a store, the store copies them)."""
    if isinstance(src, StorePath) or isinstance(dst, StorePath):
        for name in storage.files_under(src):
            storage.copy_file(src / name, dst / name)
        return
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def _link_model(model_dir: Location, dst: Location) -> dict[str, str]:
    """Link the model in `model_dir` into `dst`; its files' sha256 under dst's name, carried over from
    the model's manifest (not recomputed), plus that of the manifest itself."""
    digests = saved_manifest(model_dir)["files"]
    link_dir(model_dir, dst)
    return {f"{dst.name}/{n}": d for n, d in digests.items()} | {
        f"{dst.name}/{MANIFEST}": file_sha256(dst / MANIFEST)}


# -- the best model ----------------------------------------------------------------------------

def save_model(comm, networks: dict, table, model_dir: Location, meta: dict) -> None:
    """Every rank writes its ID rows; rank 0 the networks and the manifest, then swaps the directory in."""
    own = (rank_file_name("shard", comm.rank, comm.world), {"items": table.global_ids, "x": table.x})
    publish(comm, model_dir, own, network_states(networks), {**meta, "num_items": table.num_items})


def verify_files(directory: Location, digests: dict[str, str], manifest_path: Location) -> None:
    """DataError naming the first file of `digests` that is missing or whose sha256 differs."""
    for name, digest in digests.items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != digest:
            raise DataError(f"{path}: missing or corrupt (sha256 does not match {manifest_path})")


def load_model(model_dir: str | Location) -> tuple[dict, dict, torch.Tensor | None]:
    """(manifest, {name: state_dict}, the full (V, d) ID table or None), checksums verified. Training replaces
    the model at each new best epoch: a load it overlaps is read again (`load_unreplaced`), where it had paired
    one epoch's manifest with another's networks."""
    model_dir = storage.location(model_dir)
    return load_unreplaced(model_dir, _model_manifest, lambda manifest: _load_model_files(model_dir, manifest))


def _model_manifest(model_dir: Location) -> dict:
    manifest_path = model_dir / MANIFEST
    manifest = saved_manifest(model_dir, "no saved model (train a run first; the model is saved at its best epoch)",
                              MODEL_KEYS)
    for key in ("world_size", "num_items"):
        if manifest[key] < 1:
            raise DataError(f"{manifest_path}: {key} must be >= 1, got {manifest[key]}")
    return manifest


def _load_model_files(model_dir: Location, manifest: dict) -> tuple[dict, dict, torch.Tensor | None]:
    verify_files(model_dir, manifest["files"], model_dir / MANIFEST)
    states = load_cpu(model_dir / NETWORKS)
    W, V = manifest["world_size"], manifest["num_items"]
    if W > V:
        raise DataError(f"{model_dir / MANIFEST}: world_size {W} is more than its num_items {V}")
    shards = [checked_shard(model_dir / rank_file_name("shard", rank, W), rank, W, V) for rank in range(W)]
    x = None  # allocated once every shard is known to hold its rows: V is the manifest's word until then
    for shard in shards:
        if shard["x"] is not None:
            if x is None:
                x = torch.empty(V, shard["x"].shape[1], dtype=shard["x"].dtype, device="cpu")
            x[shard["items"]] = shard["x"]
    return manifest, states, x


def checked_shard(path: Location, rank: int, world: int, num_items: int) -> dict:
    """A saved model's shard of `rank`: its items the placement's and its rows one per item (DataError naming
    the file otherwise: a list, or items past the catalog, were a TypeError or IndexError traceback)."""
    shard = load_cpu(path)
    if not isinstance(shard, dict) or not {"items", "x"} <= shard.keys():
        raise DataError(f"{path}: not a saved model shard (no items and x)")
    items, x, placement = shard["items"], shard["x"], Placement(world)
    count = placement.rows_of(rank, num_items)
    if not (torch.is_tensor(items) and items.dim() == 1 and len(items) == count
            and torch.equal(items, placement.ids_of(rank, num_items))):
        raise DataError(f"{path}: its items are not the {count} that rank {rank} of {world} holds")
    if x is not None and (not torch.is_tensor(x) or x.dim() != 2 or len(x) != len(items)):
        raise DataError(f"{path}: its rows are not one per item ({len(items)})")
    return shard


def saved_manifest(directory: Location, absent: str = "missing", keys: dict[str, type] | None = None) -> dict:
    """The manifest.json of a checkpoint or a saved model, with its file checksums (and `keys`)."""
    return read_manifest(directory, absent, {"files": dict, **(keys or {})},
                         remedy="a damaged checkpoint or model: save it again")
