"""Every collective of the package, with a count of the bytes each one sends from this worker.

Nothing else calls torch.distributed's collectives: what goes between ranks goes through `Comm`, so
benchmarks can report traffic per step per collective, and model code never needs a process group.
"""
from __future__ import annotations

import pickle
import warnings
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import nn


@contextmanager
def _autograd_collective():
    """torch 2.13 marks the autograd collectives deprecated in favour of the private _functional_collectives
    (still so in 2.15); they remain the public API with gloo support, so their warning is quieted, at the call
    only: a filter set at import changed the warnings of every program that imported the package (reviewer
    finding)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                                category=FutureWarning)
        yield


class Comm:
    """The process group plus a count of the bytes each collective sends from this worker.

    Bytes are what this rank contributes (its input tensor sizes), counted here rather than
    estimated, so benchmarks can report traffic per step per collective. The backward of an
    autograd collective sends the gradient of its output: counted as `<name>_backward` when
    that gradient arrives.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bytes: Counter[str] = Counter()

    def _count(self, name: str, *tensors: torch.Tensor) -> None:
        self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)

    def _count_backward(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if out.requires_grad:
            out.register_hook(lambda grad: self._count(f"{name}_backward", grad))
        return out

    def all_gather(self, t: torch.Tensor, autograd: bool = False) -> torch.Tensor:
        """Concatenate every rank's `t` along dim 0 (rank order). Backward sums grads to owners."""
        self._count("all_gather", t)
        if autograd:
            with _autograd_collective():
                parts = dist_autograd.all_gather(t, group=self.group)
            return self._count_backward("all_gather", torch.cat(parts))
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.cat(out)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order (counted as its pickled size)."""
        self.bytes["all_gather_object"] += len(pickle.dumps(obj))
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s picklable `obj` on every rank (counted on `src`, as its pickled size)."""
        if self.rank == src:
            self.bytes["broadcast_object"] += len(pickle.dumps(obj))
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, autograd: bool = False) -> torch.Tensor:
        """Reduced copy of `t`. With autograd (SUM only) the backward all-reduces the grads: correct
        when each rank's loss covers only its own queries, as in `band_loss`."""
        self._count(f"all_reduce_{op}", t)
        if autograd:
            with _autograd_collective():
                out = dist_autograd.all_reduce(t, op=op, group=self.group)
            return self._count_backward(f"all_reduce_{op}", out)
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=op, group=self.group)
        return out

    def all_to_all(self, chunks: list[torch.Tensor], out_rows: list[int], autograd: bool = False) -> list[torch.Tensor]:
        """Send chunks[j] to rank j; receive out_rows[j] rows (same trailing shape) from rank j.

        One all_to_all_single with split sizes (alltoallv): gloo's scatter-based all_to_all
        needs equal sizes, and lookups are uneven by nature.
        """
        self._count("all_to_all", *chunks)
        send = torch.cat(chunks)
        out = torch.empty((sum(out_rows), *send.shape[1:]), dtype=send.dtype, device=send.device)
        in_rows = [len(c) for c in chunks]
        if autograd:
            with _autograd_collective():
                out = dist_autograd.all_to_all_single(out, send, out_rows, in_rows, group=self.group)
            out = self._count_backward("all_to_all", out)
        else:
            dist.all_to_all_single(out, send, out_rows, in_rows, group=self.group)
        return list(out.split(out_rows))


def sum_dense_grads(comm: Comm, params: list[nn.Parameter]) -> None:
    """Data-parallel sync of the replicated parameters, as one flat all-reduce.

    A SUM, not DDP's mean: each rank's loss is already its share of the global-batch mean, so the
    sum of the ranks' grads is the gradient of the whole batch (and W=1 needs no special case).
    The sharded tables never come here: their row grads are exact where they live.
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)
