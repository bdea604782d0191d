"""The training checkpoints a run resumes from, and the best model brought back with them.

A checkpoint is a directory of per-rank files plus a manifest, written by `parallel.saved.publish`
(which also documents the best model, RUN_DIR/model/). RUN_DIR/checkpoints/eEEEEE-sSSSSSSS/ (epoch E
in progress, S of its steps done; the names sort in training order). Its meta is the recipe's
`Progress` (epoch, steps done with their logged losses, best validation so far with its test
metrics, lines of metrics.jsonl) plus the phase index and global step:

    rank-RRRRR-of-WWWWW.pt    {"items": global ids,
                               "rows": {"x": ID rows, "<net>.exp_avg": ..., "<net>.exp_avg_sq": ...}  row-aligned,
                               "row_optim": {net: the ID rows' AdamW state without its row tensors},
                               "engines": {net: the dense engine's state}, "rng": {"torch", "cuda"}}
    model/                    the best model as it was then: hard links to RUN_DIR/model's files (a copy where
                              links are impossible), restored on resume with the `best` record it goes with

Rank r holds items r, r+W, r+2W, ... (`Placement`), so a table is reassembled, or re-cut for
another world size (`Placement.repartition`), from each file's `items`; no process group is
needed for that.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, TypeVar

import torch

from alterrec_dist.common import storage
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import Staged, sibling_out
from alterrec_dist.common.storage import MANIFEST, Location, StorePath
from alterrec_dist.parallel.saved import (LINKED_MODEL, NETWORKS, link_dir, load_cpu, network_states, publish,
                                         rank_file_name, saved_manifest, verify_files)
from alterrec_dist.parallel.table import Placement


KEEP = 2  # training checkpoints kept: the newest, and one to fall back on if it turns out damaged
CHECKPOINT_NAME = re.compile(r"e\d{5}-s\d{7}")
T = TypeVar("T")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"e{epoch:05d}-s{step:07d}"


def restore_model(checkpoint: Location | None, model_dir: Location) -> None:
    """Make `model_dir` the best model that `checkpoint` recorded, or remove it if there was none yet:
    a model saved after the checkpoint belongs to training that is being redone."""
    src = checkpoint / LINKED_MODEL if checkpoint is not None else None
    if src is None or not src.is_dir():
        storage.remove_tree(model_dir)
        return
    if isinstance(model_dir, StorePath):  # copied inside the store, manifest last
        storage.copy_tree(src, model_dir)
        return
    with Staged(model_dir) as staged:
        link_dir(src, staged.tmp)


# -- training checkpoints ----------------------------------------------------------------------

def save_checkpoint(comm, store: Location, name: str, networks: dict, table, steppers: dict, meta: dict,
                    model_dir: Location, pinned: str | None = None) -> Location:
    """Write checkpoint `name` into `store` (collective), then keep only the newest KEEP there and the
    one named `pinned`. Returns its directory."""
    target = store / name
    publish(comm, target, (rank_file_name("rank", comm.rank, comm.world), _rank_state(table, steppers)),
            network_states(networks),
            {**meta, "num_items": table.num_items}, model_dir)
    if comm.rank == 0:
        prune(store, KEEP, pinned)
    return target


def _rank_state(table, steppers: dict) -> dict:
    rows = {"x": table.x.detach()} if table.x is not None else {}
    row_optim, engines = {}, {}
    for name, stepper in steppers.items():
        state = stepper.state_dict()
        # Every rank's own engine state: replicated for DDP, but a sharding engine's would not be.
        engines[name] = state["engine"]
        if state["rows"] is not None:
            row_optim[name], moments = split_row_state(state["rows"])
            rows |= {f"{name}.{k}": v for k, v in moments.items()}
    # the CPU generator, and the GPU's of this rank's device when it trains on one
    cuda = table.global_ids.device.type == "cuda"
    rng = {"torch": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(table.global_ids.device)] if cuda else []}
    return {"items": table.global_ids, "rows": rows, "row_optim": row_optim, "engines": engines, "rng": rng}


def split_row_state(state: dict) -> tuple[dict, dict]:
    """(AdamW state over the one ID-rows parameter without its per-row tensors, those tensors).

    exp_avg and exp_avg_sq are row-aligned with the rows and move with them to their new owner; the
    step count is the same on every rank (all ranks step their rows together) and stays put."""
    per_param = state["state"].get(0, {})  # empty before the first step
    moments = {k: v for k, v in per_param.items() if v.dim() > 0}
    rest = {k: v for k, v in per_param.items() if v.dim() == 0}
    return {**state, "state": {0: rest} if per_param else {}}, moments


def join_row_state(rest: dict, moments: dict) -> dict:
    """The inverse of `split_row_state`."""
    return {**rest, "state": {0: {**rest["state"][0], **moments}}} if moments else rest


def prune(store: Location, keep: int, pinned: str | None = None) -> None:
    """Remove the checkpoints in `store` but its newest `keep` and the one named `pinned` (the recipe pins
    the checkpoint its phase in progress began from, which `train.reject_worse` goes back to): older ones,
    the temp directories of saves that were killed and, in a store, checkpoints whose upload was cut short.
    Other names are left alone: a prune that removed every other entry emptied whatever directory
    `checkpoints` had been linked to (reviewer finding)."""
    # an upload cut short has no manifest (written last): it never counts among the newest, which would
    # leave fewer intact ones than `keep` (a resume with another train.checkpoint_every names other steps)
    found = [p for p in checkpoints(store) if (p / MANIFEST).is_file()]
    kept = set(found[-keep:] + [p for p in found if p.name == pinned])
    for p in store.iterdir():  # only checkpoints and their temp siblings: anything else in it is not ours
        if p not in kept and CHECKPOINT_NAME.fullmatch(sibling_out(p.name) or p.name):
            storage.remove_tree(p)


def checkpoints(store: Location) -> list[Location]:
    """The checkpoint directories in `store`, oldest first."""
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name))


# what is read of a checkpoint's manifest besides its files (a manifest is not signed itself): by
# `load_checkpoint`, and for a resume also the progress it records
LOAD_KEYS = {"world_size": int, "num_items": int}
RESUME_KEYS = LOAD_KEYS | {"epoch": int, "steps": list, "best": dict, "log_lines": int}


def intact_manifest(checkpoint: Location, keys: dict[str, type] = LOAD_KEYS) -> dict:
    """The checkpoint's manifest once it holds `keys` and its every file matches the manifest's sha256 (else
    DataError)."""
    manifest = saved_manifest(checkpoint, keys=keys)
    verify_files(checkpoint, manifest["files"], checkpoint / MANIFEST)
    return manifest


_WARNED: set[str] = set()  # the damaged-checkpoint warnings this process has printed


def newest_good(store: Location) -> tuple[Location, dict] | None:
    """The newest intact checkpoint in `store`, with its manifest; None if the store holds no checkpoint.
    Each newer one that fails is a one-line warning on stderr naming the bad file; DataError if they all fail."""
    problems = []
    for checkpoint in reversed(checkpoints(store)):
        try:
            manifest = intact_manifest(checkpoint, RESUME_KEYS)
        except DataError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            warning = f"warning: {problem}; resuming from the older checkpoint {checkpoint.name}"
            if warning not in _WARNED:  # the driver's check and rank 0's are one process under torchrun
                _WARNED.add(warning)
                print(warning, file=sys.stderr, flush=True)
        return checkpoint, manifest
    if problems:
        raise DataError(f"{store}: none of its {len(problems)} checkpoints is intact; newest: {problems[0]}")
    return None


def checked_on_rank0(comm, check: Callable[[], T]) -> T:
    """`check()` run on rank 0 alone (every file is read once, not once per rank) and its result handed to
    every rank; its DataError is raised on every rank, so none is left waiting in a collective."""
    found, error = None, None
    if comm.rank == 0:
        try:
            found = check()
        except DataError as e:
            error = str(e)
    found, error = comm.broadcast_object((found, error))
    if error is not None:
        raise DataError(error)
    return found


def find_resume_point(comm, store: Location) -> tuple[Location, dict] | None:
    """`newest_good(store)`, decided once on rank 0 for every rank."""
    return checked_on_rank0(comm, lambda: newest_good(store))


def load_checkpoint(comm, checkpoint: Location, manifest: dict, networks: dict, table, steppers: dict) -> None:
    """Load a checkpoint into this rank's networks, ID rows and steppers, at any world size.

    At the saved world size every rank reads its own file and gets back exactly its state, RNG
    included. At another world size each rank takes its rows (and their AdamW moments) from the old
    shards that hold them, the dense engine state of old rank 0 (the DDP engine's is replicated), and
    keeps the RNG of a fresh start: per-rank RNG streams do not map across world sizes, so with
    dropout the continuation differs from an uninterrupted run (without dropout it is the same)."""
    old = manifest["world_size"]
    if manifest["num_items"] != table.num_items:
        raise DataError(f"{checkpoint / MANIFEST}: {manifest['num_items']} items, the dataset has "
                        f"{table.num_items}")
    states = load_cpu(checkpoint / NETWORKS)
    for name, net in networks.items():
        net.load_state_dict(states[name])

    def shard(r: int) -> dict:  # memory-mapped (locally): only the rows taken from it are read
        return load_cpu(checkpoint / rank_file_name("rank", r, old), mmap=True)

    holders = {r: shard(r) for r in torch.unique(Placement(old).owner(table.global_ids)).tolist()}
    mine = table.placement.repartition(list(holders.values()), comm.rank)
    if not torch.equal(mine["items"], table.global_ids.cpu()):
        raise DataError(f"{checkpoint}: its shards do not hold every item of rank {comm.rank}")
    with torch.no_grad():
        if table.x is not None:
            table.x.copy_(mine["rows"]["x"])
    same = old == comm.world
    own = holders[comm.rank] if same else holders.get(0) or shard(0)
    for name, stepper in steppers.items():
        rest = own["row_optim"].get(name)
        moments = {k.removeprefix(f"{name}."): v for k, v in mine["rows"].items() if k.startswith(f"{name}.")}
        stepper.load_state_dict({"engine": own["engines"][name],
                                 "rows": join_row_state(rest, moments) if rest is not None else None})
    if same:
        torch.set_rng_state(own["rng"]["torch"])
        if own["rng"]["cuda"] and table.global_ids.device.type == "cuda":  # a CPU run's, or a GPU run's on a CPU: fresh
            torch.cuda.set_rng_state(own["rng"]["cuda"][0], table.global_ids.device)
