"""Which device a worker computes on, and the few defaults that differ between a CPU and a GPU.

Everything else takes its device from its inputs (the item table, the batch), so the recipe, mining,
the loss and evaluation run the same code on both; this module is asked once per worker.
"""
from __future__ import annotations

import contextlib

import torch

CPU_TILE_ROWS = 65_536     # a score tile that stays small on the CPU: (G, 65,536) floats per step
GPU_TILE_BYTES = 4 << 30   # on a GPU one fp32 (G, tile) score tile of up to 4 GiB: 1M rows at G = 1024


def worker_device(use_gpu: bool) -> torch.device:
    """cuda:<the current device> (the launcher selected it from the local rank), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def configure_kernels(device: torch.device, tf32: bool, cpu_threads: int) -> None:
    """TF32 tensor-core matmuls on a GPU (fp32 in and out, 10-bit mantissa products), or exact fp32. On the CPU,
    torch's deterministic kernels: with two threads or more, two identical runs differed in the last bits of
    their losses (an accumulating index backward); these sum in one order, and ran faster here too. They sum in
    one order for a given thread count only (LayerNorm's backward sums per thread: 1 and 2 threads differed by
    7.6e-5 in its gradients), so the count is the config's, not what the launcher left: a Ray worker got 1, a
    process started by hand all the cores, and a run resumed under the other launcher trained differently.
    On a GPU they are off even after a CPU configuration in the same process (bench.gpu's CPU leg): they were
    never measured there, and they NaN-fill every torch.empty."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.use_deterministic_algorithms(False)
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(cpu_threads)


@contextlib.contextmanager
def exact_fp32_matmuls():
    """fp32 matmuls in full fp32 within the block (TF32 off), the flag as it was after. Evaluation runs in it, so
    its ranks (metrics, model selection) are the ones export, recommend and batch_score compute, which never set
    TF32 (torch's default: off), wherever a run trained; `trainer.tf32` is the training's and mining's."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def tile_rows(setting: int, device: torch.device, num_queries: int) -> int:
    """Item rows scored at once per shard: `setting` when positive; else (0, auto) 65,536 on the CPU, and on a
    GPU as many as keep one fp32 (num_queries, tile) score tile within 4 GiB, so a 1M-row shard is one tile."""
    if setting > 0:
        return setting
    if device.type == "cpu":
        return CPU_TILE_ROWS
    return max(CPU_TILE_ROWS, GPU_TILE_BYTES // (4 * max(num_queries, 1)))


def trained_autocast(device: torch.device, engine: str, precision: str):
    """The ddp engine's bf16: autocast around the trained network's layers (their outputs are cast back to
    fp32 by the caller: scores, the band loss and ranks stay fp32). DeepSpeed casts its weights itself
    (stepper.compute_layers_in), and fp32 needs nothing."""
    if engine == "ddp" and precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
