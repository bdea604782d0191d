"""How a network's parameters are stepped, in one place.

Two kinds of parameters, two paths:

* the network's dense, replicated parameters (encoder, text MLP, positions) go through a
  data-parallel *engine*: `DDPEngine` (one flat all-reduce of the grads, then AdamW);
* the sharded ID rows (`ShardedItemTable.x`) have their own AdamW on each rank and never enter an
  engine: their gradients are exact where the rows live, and no rank holds a copy of another's.

`Stepper` puts the two together for the recipe: zero_grad / backward / step, and a state_dict
for checkpoints (the engine's state is replicated; the row optimizer's is this rank's rows).
"""
from __future__ import annotations

import torch
from torch import nn

from alterrec_dist.sharded import Comm, sum_dense_grads


class DDPEngine:
    """Replicated dense parameters: grads summed over ranks (see `sum_dense_grads`), then AdamW."""

    def __init__(self, comm: Comm, params: list[nn.Parameter], lr: float, weight_decay: float):
        self.comm, self.params = comm, params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None

    def zero_grad(self) -> None:
        if self.optimizer:
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        sum_dense_grads(self.comm, self.params)

    def step(self) -> None:
        if self.optimizer:
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer:
            self.optimizer.load_state_dict(state["optimizer"])


class Stepper:
    """One network's optimisation: its dense engine plus, if it scores ID rows, the row optimizer."""

    def __init__(self, engine, rows: nn.Parameter | None, lr: float, weight_decay: float):
        self.engine = engine
        self.rows = torch.optim.AdamW([rows], lr=lr, weight_decay=weight_decay) if rows is not None else None

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        if self.rows:
            self.rows.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()
        if self.rows:
            self.rows.step()

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict(), "rows": self.rows.state_dict() if self.rows else None}

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        if self.rows:
            self.rows.load_state_dict(state["rows"])


def build_stepper(comm: Comm, name: str, net, table, t) -> Stepper:
    """The trained network's stepper: lr_text for the text network's dense part, lr_id otherwise;
    the ID rows always at lr_id."""
    lr = t.lr_text if name == "text" else t.lr_id
    engine = DDPEngine(comm, net.dense_parameters(), lr, t.weight_decay)
    return Stepper(engine, table.x if net.uses_id else None, t.lr_id, t.weight_decay)
