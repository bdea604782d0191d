"""The methods, one entry each: what a method trains, how, and how it is judged and named.

Everything that differs between methods is read from here: the networks (`model.networks.build_networks`),
the epoch plan (`schedule.plan`), the score part its validation selects on (`recipe`) and its row
in RESULTS.md (`report`). Adding a method means adding one entry (and, for a new kind of plan or
network, the code that kind needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALTERNATE = "alternate"  # `Method.schedule`: Algorithm 1 (random warm-up per network, then alternate)
PAIR = {"id": "id", "text": "text"}  # AlterRec's two networks: name -> Network kind
SWEEP_PREFIX = "fused@"  # `sweep_kind`


@dataclass(frozen=True)
class Method:
    label: str                      # its name in RESULTS.md
    networks: dict[str, str] = field(default_factory=lambda: dict(PAIR))  # name -> Network kind, built in order
    schedule: str = ALTERNATE       # ALTERNATE, or the name of the one network trained every epoch
    hard: bool = False              # ALTERNATE: after the warm-up, the other network's ranks k1..k2 as negatives
    augmented: bool = False         # ALTERNATE: the other network's top-p as extra positives
    judged_on: str | None = None    # the score part it is selected and reported on; None: eval.metric's (fused)

    @property
    def fused(self) -> bool:
        """One network scoring fused rows (NFRec), rather than an id and a text network."""
        return list(self.networks) == ["fused"]

    @property
    def learns_from_text(self) -> bool:
        """Whether a network it trains reads the item text features (all but ID only)."""
        trained = self.networks.values() if self.schedule == ALTERNATE else [self.networks[self.schedule]]
        return any(kind != "id" for kind in trained)


METHODS: dict[str, Method] = {
    "alterrec": Method("AlterRec", hard=True),
    "alterrec_aug": Method("AlterRec + augmentation", hard=True, augmented=True),
    "alterrec_random": Method("AlterRec, random negatives"),
    "id_only": Method("ID only", schedule="id", judged_on="id"),
    "text_only": Method("Text only", schedule="text", judged_on="text"),
    "nfrec_sum": Method("NFRec (sum)", {"fused": "sum"}, schedule="fused"),
    "nfrec_concat": Method("NFRec (concat)", {"fused": "concat"}, schedule="fused"),
}


def method(name: str) -> Method:
    """The registry entry of `name`; ValueError for a name that has none."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}")
    return METHODS[name]


def selection_part(name: str, metric_part: str) -> str:
    """The score part `name` is judged on: its own network's for a lone network, else eval.metric's part."""
    return method(name).judged_on or metric_part


def sweep_kind(alpha: float) -> str:
    """The score kind of the fused score at one `eval.alpha_sweep` value: "fused@<alpha>"."""
    return f"{SWEEP_PREFIX}{alpha:g}"


def sweep_alpha(kind: str) -> float | None:
    """The alpha of a `sweep_kind`; None for any other kind."""
    return float(kind[len(SWEEP_PREFIX):]) if kind.startswith(SWEEP_PREFIX) else None


def selection_name(part: str, metric: str) -> str:
    """("fused", "ndcg@10") -> "fused/ndcg@10": eval.metric's form (`score_and_metric` reads it back)."""
    return f"{part}/{metric}"


def score_and_metric(selection: str) -> tuple[str, str]:
    """"fused/ndcg@10" -> ("fused", "ndcg@10"): eval.metric's form, which a summary's "selection" records."""
    part, _, metric = selection.partition("/")
    return part, metric


def selection(name: str, eval_metric: str) -> tuple[str, str]:
    """(score part, metric) a run of `name` is selected on: eval.metric's, e.g. ("fused", "ndcg@10"), with a lone
    network judged on its own score (`selection_part`)."""
    part, metric = score_and_metric(eval_metric)
    return selection_part(name, part), metric
