"""Algorithm 1 of AlterRec as a plan: which network trains each epoch, and on which negatives.

alterrec: m_random epochs of the ID network on random negatives, m_random of the text network,
then alternate every m_gap epochs, ID first, on hard negatives mined by the frozen other network,
until m_max epochs in all. The baselines are the degenerate plans of the same engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from alterrec_dist.common.methods import ALTERNATE, method as method_of


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
    """One Phase per epoch, m_max of them (`methods.Method.schedule`)."""
    m = method_of(method)
    if m.schedule != ALTERNATE:  # one network, every epoch, on random negatives
        return [Phase(e, m.schedule, "random", False) for e in range(m_max)]
    hard = "hard" if m.hard else "random"
    phases = []
    for e in range(m_max):
        if e < 2 * m_random:  # warm-up: each network alone on random negatives, ID first
            phases.append(Phase(e, "id" if e < m_random else "text", "random", False))
        else:
            turn = (e - 2 * m_random) // m_gap
            phases.append(Phase(e, "id" if turn % 2 == 0 else "text", hard, m.augmented))
    return phases


def phase_starts(phases: list[Phase], epoch: int) -> bool:
    """Whether `epoch` is the first of its phase (a run of consecutive epochs with one key)."""
    return epoch == 0 or phases[epoch].key != phases[epoch - 1].key


def phase_first_epoch(phases: list[Phase], epoch: int) -> int:
    """The first epoch of the phase `epoch` is in."""
    while not phase_starts(phases, epoch):
        epoch -= 1
    return epoch


def phase_index(phases: list[Phase], epoch: int) -> int:
    """The 0-based phase (a run of epochs with one key) of `epoch`; past the plan counts as a new one."""
    return sum(a.key != b.key for a, b in zip(phases, phases[1:epoch + 1])) + (epoch >= len(phases))


def warmup_epochs(method: str, m_random: int, m_max: int) -> int:
    """AlterRec's random warm-up (each network alone, ID then text): before its end the fused score
    still has an untrained text network, so early stopping does not count these epochs."""
    return min(2 * m_random, m_max) if method_of(method).schedule == ALTERNATE else 0


def lr_ramp_epochs(phases: list[Phase], schedule: str, warmup: float, steps_per_epoch: int) -> int:
    """The epochs until every network's lr has ended warmup_cosine's ramp (`lr_factor` over `own_step`).
    Early stopping does not count them either: while a network's lr still climbs, its first low-lr epoch
    can score above the next ones (text only, seed 0: 0.042 at epoch 0, 0.027 at epoch 2, then rising),
    and patience counted from there stopped a run that was still improving."""
    if schedule == "constant":
        return 0

    def starts_in_ramp(epoch: int) -> bool:
        done, total = own_step(phases, epoch, 0, steps_per_epoch)
        return done < ramp_steps(warmup, total)

    return max((p.epoch for p in phases if starts_in_ramp(p.epoch)), default=-1) + 1


def patience_exhausted(next_epoch: int, best_epoch: int | None, patience: int, warmup: int) -> bool:
    """Early stopping: whether `patience` epochs have ended, counted after the warm-up, since the best
    validation epoch (`best_epoch`; None if none yet) once epochs 0..next_epoch-1 are done. A
    function of what a checkpoint records, so a resumed run stops where the uninterrupted one did."""
    if patience <= 0 or next_epoch <= warmup:
        return False
    since = max(best_epoch if best_epoch is not None else -1, warmup - 1)
    return next_epoch - 1 - since >= patience


def phase_rejected(reject_worse: bool, phase_ends: bool, epoch: int, warmup: int, before: float | None,
                   after: float) -> bool:
    """train.reject_worse: whether the phase that epoch `epoch` ends is undone. Only an alternating phase (past
    the warm-up) is judged, by its network's validation score at its end (`after`) against the one it started
    from (`before`; None: not known, kept); only a worse one is undone, a tie is kept."""
    return reject_worse and phase_ends and epoch >= warmup and before is not None and after < before


def stop_reason(epochs_done: int, best_epoch: int | None, patience: int, unjudged: int) -> str:
    """What ended a run after `epochs_done` epochs: "patience" when it is exhausted there (also when that
    happened with the last epoch of train.m_max: more epochs would not have run), else "m_max" (the run
    was still within patience of its best epoch, which more epochs might raise)."""
    return "patience" if patience_exhausted(epochs_done, best_epoch, patience, unjudged) else "m_max"


def own_step(phases: list[Phase], epoch: int, step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(steps the network of `epoch` has taken before this one, steps it takes in the whole plan): a
    network's schedule runs over its OWN steps, so it is not stretched by the other network's turns."""
    net = phases[epoch].network
    mine = [p.epoch for p in phases if p.network == net]
    return sum(e < epoch for e in mine) * steps_per_epoch + step, len(mine) * steps_per_epoch


def ramp_steps(warmup: float, total: int) -> int:
    """warmup_cosine's ramp: the first ceil(warmup * total) of a network's `total` own steps, in the decimal the
    config wrote (float products round up past a whole number: 0.07 * 100 = 7.000000000000001, 8 steps)."""
    return math.ceil(Fraction(repr(warmup)) * total)


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """The factor on the base lr at a network's own step (0-based) of `total`: "constant" 1;
    "warmup_cosine" linear from 1/W to 1 over the first W = ceil(warmup * total) steps, then a cosine
    to 0 at the end. Stateless, so a checkpoint needs no scheduler state."""
    if schedule == "constant":
        return 1.0
    ramp = ramp_steps(warmup, total)
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1.0 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))
