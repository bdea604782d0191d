"""Algorithm 1 of AlterRec as a plan: which network trains each epoch, and on which negatives.

alterrec: m_random epochs of the ID network on random negatives, m_random of the text network,
then alternate every m_gap epochs, ID first, on hard negatives mined by the frozen other network,
until m_max epochs in all. The baselines are the degenerate plans of the same engine.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    epoch: int
    network: str    # "id" | "text" | "fused"
    negatives: str  # "random" | "hard"
    augmented: bool  # add the other network's top-p as extra positives

    @property
    def key(self) -> tuple[str, str, bool]:
        """Equal keys on consecutive epochs = same phase (the frozen network's state can be reused)."""
        return self.network, self.negatives, self.augmented


def plan(method: str, m_random: int, m_gap: int, m_max: int) -> list[Phase]:
    """One Phase per epoch, m_max of them."""
    if method in ("id_only", "text_only"):
        net = method.removesuffix("_only")
        return [Phase(e, net, "random", False) for e in range(m_max)]
    if method in ("nfrec_sum", "nfrec_concat"):
        return [Phase(e, "fused", "random", False) for e in range(m_max)]
    if method not in ("alterrec", "alterrec_aug", "alterrec_random"):
        raise ValueError(f"unknown method {method!r}")
    hard = "random" if method == "alterrec_random" else "hard"
    phases = []
    for e in range(m_max):
        if e < 2 * m_random:  # warm-up: each network alone on random negatives, ID first
            phases.append(Phase(e, "id" if e < m_random else "text", "random", False))
        else:
            turn = (e - 2 * m_random) // m_gap
            phases.append(Phase(e, "id" if turn % 2 == 0 else "text", hard, method == "alterrec_aug"))
    return phases
