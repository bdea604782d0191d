"""The per-step approach of the paper's code, as a bench-only reference: our code, the same math.

Per step, on one process: the frozen network scores every item for every session (a dense B x V
matrix), the scores move to the CPU and the top-k2 is taken there, and the k2-k1 negative rows
are gathered per session (B x (k2-k1) x d) and scored against the trained network's queries. The
loss is the engine's band cross-entropy, so on the same batch both give the same loss (checked in
`compare`); only the way of getting there differs. `compare` times the two side by side, step for
step, in one worker process, so background load hits both alike.
"""
from __future__ import annotations

import time
from collections import Counter
from itertools import islice

import numpy as np
import torch

from alterrec_dist.common.config import load_config
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.training.recipe import build_run, frozen_item_rows, train_epoch
from alterrec_dist.training.step import train_step
from alterrec_dist.training.schedule import Phase
from bench.scale_worker import FixedBatches, Profiler, overrides


class ReferenceStep:
    """ID network trained on the frozen text network's ranks k1..k2, the per-step way."""

    def __init__(self, run, lr: float):
        if run.comm.world != 1:
            raise ValueError("the reference holds the whole table: run it on one worker")
        self.trained, self.frozen = run.networks["id"], run.networks["text"]
        self.x, self.f16 = run.table.x, run.table.features  # W=1: local row == item id
        self.k1, self.k2 = run.cfg.train.k1, run.k2
        self.optimizer = torch.optim.AdamW([self.x, *self.trained.dense_parameters()], lr=lr)
        self.mining_s = 0.0

    def loss(self, batch, frozen_rows: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.no_grad():
            history = self.frozen.item_rows(None, self.f16[batch.items].float())
            scores = self.frozen.logits(self.frozen.encode(history, batch.mask), frozen_rows)  # dense B x V
            top = torch.topk(scores.cpu(), self.k2, dim=1).indices  # on the host, as the paper's code does
            negatives = top[:, self.k1:].to(self.x.device)
        self.mining_s += time.perf_counter() - start
        t = self.trained
        q = t.encode(t.item_rows(self.x[batch.items], None), batch.mask)
        rows = t.item_rows(self.x[negatives], None)  # B x (k2-k1) x d, gathered per session
        neg = torch.einsum("bd,bkd->bk", q, rows) * t.logit_scale
        neg = neg.masked_fill(negatives == batch.target[:, None], float("-inf"))  # the target is never a negative
        pos = (q * t.item_rows(self.x[batch.target], None)).sum(1) * t.logit_scale
        return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()

    def step(self, batch, frozen_rows: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch, frozen_rows).backward()
        self.optimizer.step()


def compare(spec: dict) -> dict:
    """Engine (hard phase, threshold merge, W=1) and reference on the same batches, alternating
    step by step; the first pair is an untimed warm-up. Also the loss of both on the first batch,
    before any update."""
    comm = Comm()
    cfg = load_config(None, overrides(spec, comm.world) + ["train.merge=threshold"])
    run = build_run(cfg, comm)
    device = run.device
    phase = Phase(1, "id", "hard", False)
    frozen = frozen_item_rows(run, phase)
    batches = [b.to(device) for b in islice(run.train_reader.epoch(0), spec["steps"] + 1)]
    reference = ReferenceStep(run, cfg.train.lr_id)
    engine_loss = train_step(comm, cfg, phase, run.networks["id"], run.networks["text"], frozen, run.table,
                             batches[0], 0, run.k2)[1]["loss"].item()
    with torch.no_grad():
        reference_loss = reference.loss(batches[0], frozen).item()
    engine_s, reference_s, reference_mining_s, engine_sections = [], [], [], Counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    with Profiler(comm) as prof:
        prof.install(run)
        for i, batch in enumerate(batches):
            run.train_reader = reader = FixedBatches([batch], device)
            before = prof.seconds.copy()  # the reference calls some wrapped methods too: keep the engine's part
            train_epoch(run, phase, frozen)
            engine_part = prof.seconds - before
            reference.mining_s = 0.0
            start = time.perf_counter()
            reference.step(batch, frozen)
            sync()
            if i:
                engine_s += reader.step_seconds()
                engine_sections += engine_part
                reference_s.append(time.perf_counter() - start)
                reference_mining_s.append(reference.mining_s)
    return {"items": run.table.num_items, "batch": cfg.train.global_batch_size, "dim": cfg.model.dim,
            "k1": cfg.train.k1, "k2": run.k2, "engine_s": engine_s, "reference_s": reference_s,
            "reference_mining_s": reference_mining_s, "engine_loss": engine_loss, "reference_loss": reference_loss,
            "engine_sections": {k: v / len(engine_s) for k, v in engine_sections.items()},
            "ratio": float(np.median(reference_s) / np.median(engine_s))}
