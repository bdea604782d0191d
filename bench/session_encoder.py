"""The causal Transformer session encoder, packed (the model's) against the stock padded layers it replaced,
one training step (forward + backward) side by side on batches drawn from Scientific's real history lengths:
the stock padded layers, the packed tokens with attention on one padded (batch, window) grid (the encoder
until 2026-12-02), and the packed tokens with attention per length group (`networks.length_groups`, now).

    python -m bench.session_encoder [--data ../shared/data/scientific] [--steps 6] [--out bench/ENCODER.md]

Both run the same nn.TransformerEncoderLayer weights (d = 300, 2 layers, 2 heads, window 50, batch 512,
the grid's transformer switch); "padded" is what SessionEncoder.hidden ran before: every per-token step
on all 50 positions. One torch thread; the ratio is what counts (absolute times only from a GPU).
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from alterrec_dist.common.files import atomic_write_bytes
from alterrec_dist.model import networks
from alterrec_dist.model.networks import LengthGroup, SessionEncoder

DIM, LAYERS, HEADS, WINDOW, BATCH = 300, 2, 2, 50, 512


def history_lengths(data: Path) -> list[int]:
    """Each training row's history length (RecBole's item_id_list), capped at the window."""
    path = data / "Scientific.train.inter"
    with open(path) as f:
        next(f)
        return [min(WINDOW, len(line.rstrip("\n").split("\t")[1].split())) for line in f]


def padded_forward(enc: SessionEncoder, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The replaced path: nn.TransformerEncoder over the whole padded window, output at the last real item."""
    L = rows.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    h = enc.layers(enc.drop(enc.norm(rows + enc.pos.weight[:L])), mask=causal, src_key_padding_mask=~mask,
                   is_causal=True)
    return h[torch.arange(len(h)), mask.sum(1) - 1]


def one_grid(mask: torch.Tensor) -> list[LengthGroup]:
    """Every session in one attention grid as long as the window: what the encoder did before length groups."""
    real = mask.nonzero(as_tuple=True)
    return [LengthGroup(tuple(mask.shape), real, torch.arange(len(real[0])))]


def one_grid_forward(enc: SessionEncoder, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    grouped, networks.length_groups = networks.length_groups, one_grid
    try:
        return enc(rows, mask)
    finally:
        networks.length_groups = grouped


def step_seconds(forward, enc, batches) -> float:
    """Median seconds of one forward + backward over the batches (the first is a warm-up)."""
    times = []
    for rows, mask in batches:
        enc.zero_grad(set_to_none=True)
        start = time.perf_counter()
        forward(enc, rows, mask).square().sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/scientific")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ENCODER.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lengths, rng = history_lengths(a.data), random.Random(0)
    batches = []
    for _ in range(a.steps + 1):
        n = torch.tensor(rng.sample(lengths, BATCH))
        batches.append((torch.randn(BATCH, WINDOW, DIM) * 0.02, torch.arange(WINDOW) < n.unsqueeze(1)))
    enc = SessionEncoder(DIM, "transformer", WINDOW, LAYERS, HEADS, dropout=0.5).train()
    padded = step_seconds(padded_forward, enc, batches)
    one = step_seconds(one_grid_forward, enc, batches)
    packed = step_seconds(SessionEncoder.forward, enc, batches)
    real = sum(int(m.sum()) for _, m in batches) / (len(batches) * BATCH * WINDOW)
    command = shlex.join(["python", "-m", "bench.session_encoder", *(argv if argv is not None else sys.argv[1:])])
    atomic_write_bytes(a.out, (
        "# Session encoder: packed against padded (one training step, CPU, one thread)\n\n"
        f"Made by `{command}` on {os.path.relpath(a.data)}/Scientific.train.inter's history lengths "
        f"(mean {sum(lengths) / len(lengths):.1f}, window {WINDOW}: {real:.1%} of the positions are real).\n"
        f"d = {DIM}, {LAYERS} layers, {HEADS} heads, batch {BATCH}, dropout 0.5; median of {a.steps} steps "
        "after a warm-up.\n\n"
        "| path | forward + backward (s) | ratio |\n|---|---|---|\n"
        f"| padded (stock nn.TransformerEncoder) | {padded:.3f} | 1.00 |\n"
        f"| packed, attention on one padded grid (before 2026-12-02) | {one:.3f} | {padded / one:.2f}x faster |\n"
        f"| packed, attention per length group (SessionEncoder now) | {packed:.3f} | {padded / packed:.2f}x faster "
        f"({one / packed:.2f}x the one grid) |\n").encode())
    print(a.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
