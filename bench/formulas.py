"""docs/SCALING.md's per-step formulas, executable: what the bench checks its counts against, and the
projections the document quotes (`python -m bench.formulas` prints them).

Notation: B global batch (sessions per step, all workers), W workers, b = B/W, G = B gathered
queries, V catalog, d embedding size, D text-feature size, k1..k2 the band, p augmented positives.
Counted bytes are what one worker hands to each collective per step (`Comm.bytes`).
"""
from __future__ import annotations

import torch

from alterrec_dist.common.device import tile_rows

MAX_ROUNDS = 32      # bisection over the ordered int32 image of a float32 score (mining.thresholds_by_bisection)
BRACKET_FLOATS = 5  # the bracket's one all-reduce MAX per query (mining.bracket)
INT64, INT32, FP32 = 8, 4, 4


def count_bytes(W: int, k1: int, k2: int) -> int:
    """Bytes per query per bisection round: the counts at ranks k1 and k2, clamped and packed into one
    integer (mining.CountPacker): int32 while (W(k1+1)+1)(W(k2+1)+1) <= 2^31, else int64."""
    return INT32 if (W * (k1 + 1) + 1) * (W * (k2 + 1) + 1) <= 2**31 else INT64


def tie_check_bytes(W: int, k1: int, k2: int) -> int:
    """Bytes per query of the tie check after either merge (mining.tie_splits): the counts above ranks k1 and
    k2, clamped to k1 and k2 and packed as a round's are. An id bisection follows only where a band edge cuts a
    tie group, which random scores never do."""
    return INT32 if (W * k1 + 1) * (W * k2 + 1) <= 2**31 else INT64


def threshold_merge_bytes(G: int, W: int, k1: int, k2: int, rounds: float = MAX_ROUNDS) -> float:
    """Bytes one worker hands to the threshold merge per step: the bracket, then `rounds` rounds
    (data-dependent: the bits between the bracket's bounds; at most 32, and 0 at W = 1)."""
    return G * (BRACKET_FLOATS * FP32 + rounds * count_bytes(W, k1, k2))


def collective_bytes(negatives: str, merge: str, B: int, W: int, d: int, k2: int, p: int, k1: int = 20,
                     rounds: float = MAX_ROUNDS, value_bytes: int = FP32, dense_params: int = 0) -> dict[str, float]:
    """The collectives of one training step of the ID network, bytes per worker.

    negatives: "random" | "hard" | "augmented"; merge: "threshold" | "allgather" (ignored for random).
    rounds: the threshold merge's bisection rounds (measured; the default is the bound).
    dense_params: replicated parameters of the trained network (0 for the mean encoder without LayerNorm).
    The all-to-all of the history lookup depends on which items the batch holds and is not here.
    """
    b, G = B // W, B
    mined = negatives != "random"
    P = 1 + p if negatives == "augmented" else 1  # positives per query: target (+ the frozen network's top-p)
    gather = b * d * value_bytes + b * INT64  # trained queries, targets
    if mined:
        gather += b * d * value_bytes  # frozen queries
        if merge == "allgather":
            gather += G * (k2 + 1) * FP32  # every shard's top k2+1 scores, padded to k2+1
    if negatives == "augmented":
        gather += G * (p + 1) * INT64  # top-p positives: every shard's top p+1 keys
    reduce_sum = FP32 * G * P + FP32 * G + FP32 * dense_params  # positive logits, band sum of exp, dense grads
    reduce_max = FP32 * G  # band max (the LSE shift)
    if mined:
        reduce_sum += G * tie_check_bytes(W, k1, k2)
    if mined and merge == "threshold":
        reduce_sum += G * rounds * count_bytes(W, k1, k2)  # packed counts at ranks k1 and k2, per round
        reduce_max += G * BRACKET_FLOATS * FP32
    return {
        "all_gather": gather,
        "all_gather_backward": G * d * value_bytes,  # query gradients back to their owners
        "all_reduce_RedOpType.SUM": reduce_sum,
        "all_reduce_RedOpType.SUM_backward": FP32 * G * P + FP32 * G,
        "all_reduce_RedOpType.MAX": reduce_max,
    }


def table_bytes(V: int, W: int, d: int, D: int, frozen: bool = True) -> int:
    """Item-table memory of one worker: ID rows, their (dense) gradient, AdamW's two moments (fp32),
    float16 text features, the frozen network's item matrix (fp32)."""
    rows = -(-V // W)
    return rows * (4 * d * FP32 + 2 * D + (d * FP32 if frozen else 0))


def score_tile_bytes(B: int, V: int, W: int, tile_rows: int, value_bytes: int = FP32) -> int:
    """The band loss's (G, tile) training score tile and its gradient tile, per worker (the loss scores one
    tile of the shard's rows at a time: alterrec_dist/parallel/loss.py)."""
    return 2 * B * min(tile_rows, -(-V // W)) * value_bytes


def projection(V: int, W: int, B_per_worker: int, d: int, D: int, k2: int, floor_sessions_per_s_1m: float,
               efficiency: float) -> dict[str, float]:
    """V = 100M-style projection for GPUs: memory per GPU, traffic per step, sessions/s.

    Every GPU scores all G = W*B queries against its V/W rows, so per-GPU work is G*V/W session-items
    per step and the cluster's rate is W * floor(V) * efficiency, with floor(V) the one-GPU floor rate
    scaled from 1M items as 1/V (the score+top-k and band-loss floors are linear in V).
    """
    B = W * B_per_worker
    bf16_rows = -(-V // W) * d * 2  # frozen item matrix in bf16
    table = -(-V // W) * (4 * d * FP32 + 2 * D) + bf16_rows
    step = {m: collective_bytes("hard", m, B, W, d, k2, 0, value_bytes=2) for m in ("threshold", "allgather")}
    rate = W * floor_sessions_per_s_1m * 1e6 / V * efficiency
    gpu_tile_rows = tile_rows(0, torch.device("cuda"), B)  # the loss's default on a GPU (eval.tile_rows = 0)
    return {"table_gb": table / 1e9, "scores_untiled_gb": score_tile_bytes(B, V, W, V, 2) / 1e9,
            "scores_tiled_gb": score_tile_bytes(B, V, W, gpu_tile_rows) / 1e9,
            "merge_threshold_mb": threshold_merge_bytes(B, W, 20, k2) / 1e6, "merge_allgather_gb": B * (k2 + 1) * FP32 / 1e9,
            "step_threshold_mb": sum(step["threshold"].values()) / 1e6,
            "step_allgather_gb": sum(step["allgather"].values()) / 1e9,
            "sessions_per_s": rate, "step_s": B / rate}


if __name__ == "__main__":
    floor_1m = 1024 / ((12.9 + 51.0) / 1e3)  # H100, bf16, B=1024, d=300, k2=20,000 (see bench/RESULTS.md)
    for W in (8, 64):
        p = projection(100_000_000, W, 1024, 300, 384, 20_000, floor_1m, 0.6)
        print(f"V=100M W={W}: " + ", ".join(f"{k} {v:,.3g}" for k, v in p.items()))
