"""The training recipe: AlterRec's Algorithm 1 on row-sharded item tables, read top to bottom.

    for each epoch of the plan (random warm-up for ID then text, then alternate every m_gap):
        A = the network trained this epoch, B = the other one, frozen
        once per phase: B's item matrix on this shard
        for each global batch:
            queries of A (autograd) and of B (frozen), all-gathered
            negatives = B's ranks k1..k2 (mined per shard, merged) or uniform random items
            positives = the target (+ B's top-p, weighted beta, when augmented)
            band loss over A's scores on this shard; step A (and its ID rows)
            every train.log_every steps: the loss to TensorBoard (and MLflow)
            every train.checkpoint_every steps: a training checkpoint
        evaluate id, text and fused on validation; test and save the model when validation improves
        at the end of each epoch: a training checkpoint

A run starts from the newest intact checkpoint in RUN_DIR/checkpoints, if any (see `resume`).

Runs on every worker after the default process group exists (Ray Train or torchrun set it up).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from alterrec_dist.common import run_layout, storage
from alterrec_dist.common.cli import progress_bar
from alterrec_dist.common.code_version import code_version
from alterrec_dist.common.config import Config
from alterrec_dist.common.device import configure_kernels, worker_device
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import atomic_write_bytes, atomic_write_json, writing
from alterrec_dist.common.methods import selection, selection_name, sweep_kind
from alterrec_dist.common.storage import Location
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.reader import SessionReader
from alterrec_dist.eval.evaluate import evaluate, item_matrix, kind_weights
from alterrec_dist.model.networks import Network, build_networks, text_init_rows
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.mining import capped_k2
from alterrec_dist.parallel.saved import save_model
from alterrec_dist.parallel.table import Placement, ShardedItemTable
from alterrec_dist.training.checkpoint import (checked_on_rank0, checkpoint_name, find_resume_point, intact_manifest,
                                               load_checkpoint, restore_model, save_checkpoint)
from alterrec_dist.training.metric_sinks import MetricSinks
from alterrec_dist.training.schedule import (Phase, lr_factor, lr_ramp_epochs, own_step, patience_exhausted,
                                             phase_first_epoch, phase_index, phase_rejected, phase_starts, plan,
                                             stop_reason, warmup_epochs)
from alterrec_dist.training.step import train_step
from alterrec_dist.training.stepper import Stepper, build_stepper

OTHER = {"id": "text", "text": "id"}


@dataclass
class Run:
    """Everything one worker holds: its shard of the tables, the networks, their steppers and readers."""
    comm: Comm
    cfg: Config
    networks: dict[str, Network]
    table: ShardedItemTable
    steppers: dict[str, Stepper]
    train_reader: SessionReader
    eval_readers: dict[str, SessionReader]
    popularity: np.ndarray
    k2: int

    @property
    def device(self) -> torch.device:
        return self.table.global_ids.device

    def evaluate(self, split: str, epoch: int) -> dict:
        r, e = self.eval_readers[split], self.cfg.eval
        return evaluate(self.comm, self.networks, self.table, (b.to(self.device) for b in r.epoch(0)),
                        r.steps_per_epoch(), self.popularity,
                        kind_weights(self.cfg.train.method, e.alpha, tuple(e.alpha_sweep)), e.longtail_bins,
                        e.tile_rows, desc=f"{split} e{epoch}")

    def lr_factor(self, epoch: int, step: int) -> float:
        """train.lr_schedule's factor at this step of `epoch`, over the trained network's own steps."""
        t = self.cfg.train
        if t.lr_schedule == "constant":
            return 1.0
        done, total = own_step(plan(t.method, t.m_random, t.m_gap, t.m_max), epoch, step,
                               self.train_reader.steps_per_epoch())
        return lr_factor(t.lr_schedule, done, total, t.lr_warmup)


def build_run(cfg: Config, comm: Comm) -> Run:
    """This worker's part of a run on the dataset of `cfg`, on its device (`trainer.use_gpu`: the
    launcher's current GPU)."""
    t = cfg.train
    data = Dataset(cfg.resolve_path(cfg.data.path))

    def reader(split: str, batch: int, train: bool) -> SessionReader:
        return SessionReader(data.session_files(split), rank=comm.rank, world_size=comm.world, global_batch_size=batch,
                             max_len=cfg.data.max_len, seed=t.seed, shuffle=train, drop_last=train,
                             num_items=data.num_items)

    train_reader = reader("train", t.global_batch_size, True)
    if train_reader.steps_per_epoch() == 0:
        raise DataError(f"{data.path}: {data.num_rows('train')} train rows make no full global batch of "
                        f"train.global_batch_size={t.global_batch_size}")
    return assemble_run(cfg, comm, data.num_items, data.text_dim, data.text_features, train_reader,
                        {s: reader(s, cfg.eval.batch_size, False) for s in ("valid", "test")}, data.popularity())


def assemble_run(cfg: Config, comm: Comm, num_items: int, text_dim: int,
                 text_features: Callable[[np.ndarray], np.ndarray], train_reader, eval_readers: dict,
                 popularity: np.ndarray) -> Run:
    """A run from its parts: `text_features(items)` gives the rows of the given items; the readers yield
    `Batch`es (a SessionReader, or anything with `epoch(e)` and `steps_per_epoch()`)."""
    t = cfg.train
    device = worker_device(cfg.trainer.use_gpu)
    configure_kernels(device, cfg.trainer.tf32, cfg.trainer.cpu_threads)
    torch.manual_seed(t.seed)  # same dense initialisation on every rank, drawn on the CPU on every device
    networks = {name: net.to(device)
                for name, net in build_networks(t.method, cfg.model, text_dim, cfg.data.max_len).items()}
    uses_text = any(n.uses_text for n in networks.values())
    uses_id = any(n.uses_id for n in networks.values())
    local_items = Placement(comm.world).ids_of(comm.rank, num_items).numpy()
    table = ShardedItemTable(num_items, cfg.model.dim, comm, text_features(local_items) if uses_text else None,
                             cfg.model.init_std, t.seed, with_id=uses_id, device=device)
    if cfg.model.id_init == "text" and uses_id:
        with torch.no_grad():  # the centring mean over all items: one all-reduce of D floats
            table.x.copy_(text_init_rows(table.x, table.f, comm.all_reduce(table.f.sum(0)) / num_items,
                                         cfg.model.init_std, t.seed))
    return Run(comm, cfg, networks, table,
               steppers={name: build_stepper(comm, name, net, table, cfg) for name, net in networks.items()},
               train_reader=train_reader, eval_readers=eval_readers, popularity=popularity,
               k2=capped_k2(t.k2, num_items))


# How the workers hand Ray a result: report(metrics, the checkpoint just taken); None under torchrun.
Report = Callable[[dict, Location], None]


@dataclass
class Progress:
    """Where training stands; a checkpoint's manifest records it (all of it JSON)."""
    epoch: int = 0                                   # the epoch in progress, or the next one between epochs
    steps: list[dict] = field(default_factory=list)  # the logged losses of its steps done so far
    best: dict = field(default_factory=lambda: {"score": -1.0})  # best validation so far: epoch, valid, test
    log_lines: int = 0                               # lines of metrics.jsonl written
    own: dict = field(default_factory=dict)          # each network's own validation score at the last epoch
    phase_before: float | None = None                # the phase's network's own score when the phase began


def run_worker(cfg: Config, run_dir: str | Location, report: Report | None = None) -> dict:
    """Train by the plan, validate every epoch, test and save the model at the best; rank 0 writes the
    run files and the metrics (`MetricSinks`). Starts from the newest intact checkpoint in
    RUN_DIR/checkpoints when there is one (a `--resume`, or Ray restarting the workers after a failure)
    and takes one at the end of every epoch and every `train.checkpoint_every` steps."""
    run = build_run(cfg, Comm())
    comm, t = run.comm, cfg.train
    run_dir = storage.location(run_dir)
    part, metric = selection(t.method, cfg.eval.metric)
    phases = plan(t.method, t.m_random, t.m_gap, t.m_max)
    warmup = warmup_epochs(t.method, t.m_random, t.m_max)
    steps_per_epoch = run.train_reader.steps_per_epoch()
    unjudged = max(warmup, lr_ramp_epochs(phases, t.lr_schedule, t.lr_warmup, steps_per_epoch))  # by patience
    progress = resume(run, run_dir)

    def steps_done() -> int:
        return progress.epoch * steps_per_epoch + len(progress.steps)

    def checkpoint(metrics: dict) -> None:  # progress.steps read and checked by the caller
        done = len(progress.steps)
        # the checkpoint the phase in progress began from outlives the newer ones: reject_worse goes back to it;
        # under reject_worse at the end too, as a resume with a larger train.m_max may go on with the last phase
        ended = progress.epoch >= len(phases)
        phase_start = (phase_start_checkpoint(phases, min(progress.epoch, len(phases) - 1))
                       if not ended or t.reject_worse else None)
        path = save_checkpoint(comm, run_dir / run_layout.CHECKPOINTS, checkpoint_name(progress.epoch, done),
                               run.networks, run.table, run.steppers,
                               {**asdict(progress), "step": done, "phase": phase_index(phases, progress.epoch),
                                "global_step": steps_done(), "method": t.method},
                               run_dir / run_layout.MODEL, pinned=phase_start)
        if report is not None:
            report(metrics, path)

    def due(every: int) -> bool:  # the global step just done is one of every `every` (0: none is)
        return bool(every) and steps_done() % every == 0

    def after_step(network: str) -> None:  # `sinks`: rank 0's, bound by the `with` below (None elsewhere)
        log_now, save_now = due(t.log_every), due(t.checkpoint_every)
        if log_now or save_now:
            # the interval's one host read: its steps' losses, still on the device, come over together. On every
            # rank, the same global losses: all stop at a NaN alike (rank 0 alone left the others to die in the
            # next collective), and none saves NaN weights over good checkpoints
            refuse_diverged(progress.epoch, network, read_logs(progress.steps))
        if log_now and sinks is not None:
            sinks.step(network, progress.steps[-1], steps_done())
        if save_now:
            checkpoint({"epoch": progress.epoch, "step": len(progress.steps)})

    prev_key, frozen_rows = None, None
    # A checkpoint at an epoch's last step comes before that epoch's end is scored and logged: a resume from it logs
    # the end again, at the same step, so the earlier attempt's events of that step go, its loss among them
    # (TensorBoard showed the step's metrics twice: reviewer finding), and the loss is logged again here.
    end_redone = len(progress.steps) == steps_per_epoch
    with MetricSinks(run_dir, cfg, steps_done(), end_redone) if comm.rank == 0 else contextlib.nullcontext() as sinks:
        if end_redone and sinks is not None and due(t.log_every):
            sinks.step(phases[progress.epoch].network, progress.steps[-1], steps_done())
        for phase in tqdm(phases[progress.epoch:], desc="epochs", initial=progress.epoch, total=len(phases),
                          **progress_bar(comm.rank)):
            # checked before each epoch, a resumed run included: the checkpoint holds the epoch and the best
            if patience_exhausted(progress.epoch, progress.best.get("epoch"), t.patience, unjudged):
                if comm.rank == 0:
                    tqdm.write(f"early stop: no better valid {part}/{metric} in the {t.patience} epochs after epoch "
                               f"{max(progress.best['epoch'], unjudged - 1)}")
                break
            if phase.key != prev_key:
                prev_key = phase.key
                # B is frozen for the whole phase: its item matrix is computed once, here.
                frozen_rows = frozen_item_rows(run, phase)
            if phase_starts(phases, phase.epoch) and not progress.steps:  # (a resumed phase has it already)
                progress.phase_before = progress.own.get(phase.network)
            start, resumed_steps = time.perf_counter(), len(progress.steps)
            steps = train_epoch(run, phase, frozen_rows, progress.steps, lambda: after_step(phase.network))
            seconds = time.perf_counter() - start
            refuse_diverged(phase.epoch, phase.network, steps)  # before anything is scored, saved or logged
            losses = {k: float(np.mean([s[k] for s in steps])) for k in steps[0]}
            valid = run.evaluate("valid", phase.epoch)
            line = {
                "epoch": phase.epoch, "phase": phase_index(phases, phase.epoch), "network": phase.network,
                "negatives": phase.negatives, "augmented": phase.augmented, **losses,
                "valid": {k: overall(valid[k]) for k in valid},
                # this attempt's steps; None where it ran none (resumed at the epoch's end): not a rate of 0
                "sessions_per_s": (len(steps) - resumed_steps) * t.global_batch_size / seconds
                if len(steps) > resumed_steps else None,
                "train_seconds": seconds,
            }
            phase_ends = phase_index(phases, phase.epoch + 1) != line["phase"]
            rejected = phase_rejected(t.reject_worse, phase_ends, phase.epoch, warmup, progress.phase_before,
                                      valid[phase.network][metric])
            if t.reject_worse:
                line["rejected"] = rejected
                progress.own = {n: valid[n][metric] for n in run.networks}
            if valid[part][metric] > progress.best["score"]:
                progress.best = {"score": valid[part][metric], "epoch": phase.epoch, "valid": line["valid"],
                                 "test": run.evaluate("test", phase.epoch)}
                # the alpha it serves goes with it: summary.json, which says it too, is gone while a resume runs
                save_model(comm, run.networks, run.table, run_dir / run_layout.MODEL,
                           {"epoch": phase.epoch, "method": t.method, "selection": selection_name(part, metric),
                            "valid_score": progress.best["score"], "dataset": str(cfg.resolve_path(cfg.data.path)),
                            "alpha": chosen_alpha(progress.best, cfg.eval.alpha, cfg.eval.alpha_sweep, part, metric),
                            "eval": measured_in(cfg)})
            if comm.rank == 0:
                sinks.epoch(line, steps_done())
                tqdm.write(f"epoch {phase.epoch:3d} {phase.network:5s} {phase.negatives:6s} loss {losses['loss']:.4f} "
                           f"valid {part}/{metric} {valid[part][metric]:.4f} ({rate_text(line['sessions_per_s'])})")
            if rejected:
                undo_phase(run, run_dir / run_layout.CHECKPOINTS / phase_start_checkpoint(phases, phase.epoch))
                progress.own[phase.network] = progress.phase_before
                if comm.rank == 0:
                    tqdm.write(f"phase rejected: valid {phase.network}/{metric} {valid[phase.network][metric]:.4f} "
                               f"< {progress.phase_before:.4f} at its start; {phase.network} goes back to it")
            progress.epoch, progress.steps, progress.log_lines = phase.epoch + 1, [], progress.log_lines + 1
            # every epoch, not at phase ends only: a lone network's run is one phase of m_max epochs
            checkpoint({k: v for k, v in line.items() if k != "valid"}
                       | {f"valid_{part}_{metric}": valid[part][metric]})
        stopped_by = stop_reason(progress.epoch, progress.best["epoch"], t.patience, unjudged)
        summary = run_summary(progress, cfg, part, metric, stopped_by)
        if comm.rank == 0:
            sinks.summary(summary, cfg)
    # written once the sinks have closed (their last upload done): summary.json is what makes the run finished
    if comm.rank == 0:
        with writing(run_dir / run_layout.SUMMARY):
            atomic_write_json(run_dir / run_layout.SUMMARY, summary)
    return summary


def measured_in(cfg: Config) -> dict:
    """The evaluation shape a saved model's metrics were measured in, which batch scoring repeats to reproduce
    them: a resume may change eval.batch_size and eval.tile_rows (a tie in float goes by the tiles' rounding)."""
    return {"batch_size": cfg.eval.batch_size, "tile_rows": cfg.eval.tile_rows}


def run_summary(progress: Progress, cfg: Config, part: str, metric: str, stopped_by: str) -> dict:
    """summary.json: the best epoch's validation and test scores, and the fusion weight chosen at it."""
    best = progress.best
    summary = {
        "best_epoch": best["epoch"],
        "epochs_trained": progress.epoch,  # below m_max when train.patience stopped the run
        "stopped_by": stopped_by,
        "selection": selection_name(part, metric),
        "valid": best["valid"],
        "test": {k: overall(best["test"][k]) for k in best["test"]},
        "longtail": {k: best["test"][k]["longtail"] for k in best["test"]},
        "code": code_version(),  # a rerun by other code may differ (README, Run directory)
    }
    alpha = chosen_alpha(best, cfg.eval.alpha, cfg.eval.alpha_sweep, part, metric)
    return summary if alpha is None else summary | {"alpha": alpha}


def overall(metrics: dict) -> dict:
    """One score's metrics without their per-popularity-group breakdown ("longtail"), which the summary keeps apart."""
    return {m: v for m, v in metrics.items() if m != "longtail"}


def chosen_alpha(best: dict, alpha: float, sweep: list[float], part: str, metric: str) -> dict | None:
    """The fusion weight among eval.alpha and eval.alpha_sweep with the best validation `metric` at the
    best epoch, and the test metrics at it; None without a sweep, for a method without fused@ kinds
    (NFRec, ID or text only: `kind_weights`) or for a run selected on something else than the fused score
    (`part` not fused). Ties go to eval.alpha, then to the earlier sweep value."""
    kinds = {alpha: "fused"} | {a: sweep_kind(a) for a in sweep}
    if part != "fused" or not sweep or any(k not in best["valid"] for k in kinds.values()):
        return None
    chosen = max(kinds, key=lambda a: best["valid"][kinds[a]][metric])  # max keeps the first of equals
    kind = kinds[chosen]
    return {"chosen": chosen, "selection": selection_name("fused", metric), "valid": best["valid"][kind],
            "test": overall(best["test"][kind])}


def resume(run: Run, run_dir: Location) -> Progress:
    """The progress to go on from: the newest intact checkpoint in RUN_DIR/checkpoints, loaded into the
    run, or the start. Rank 0 brings the run files back to the same point (metrics.jsonl cut to the
    checkpoint's lines, RUN_DIR/model back to the best model it recorded, no summary.json until the run
    ends again): what came after the checkpoint is redone."""
    found = find_resume_point(run.comm, run_dir / run_layout.CHECKPOINTS)
    progress = Progress()
    if found is not None:
        load_checkpoint(run.comm, *found, run.networks, run.table, run.steppers)
        progress = Progress(**{f.name: found[1][f.name] for f in fields(Progress) if f.name in found[1]})
    if run.comm.rank == 0:
        keep_lines(run_dir / run_layout.METRICS, progress.log_lines)
        restore_model(found[0] if found else None, run_dir / run_layout.MODEL)
        # an earlier end's summary (a resume with a larger train.m_max) is written again when this attempt ends:
        # until then it would describe another model than model/ (an attempt killed midway left both)
        storage.remove_tree(run_dir / run_layout.SUMMARY)
        if found is not None:
            tqdm.write(f"resuming from {found[0]}: epoch {progress.epoch}, {len(progress.steps)} steps done")
    return progress


def keep_lines(path: Location, n: int) -> None:
    """Cut the text file `path` (if any) to its first n lines."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        if len(lines) > n:
            with writing(path):
                atomic_write_bytes(path, "".join(lines[:n]).encode())


def phase_start_checkpoint(phases: list[Phase], epoch: int) -> str:
    """The name of the checkpoint that the phase `epoch` is in began from: the one taken at the end of the
    epoch before it (step 0 of its first epoch)."""
    return checkpoint_name(phase_first_epoch(phases, epoch), 0)


def undo_phase(run: Run, start: Location) -> None:
    """`train.reject_worse`: every rank takes back its state from `start`, the checkpoint the phase began
    from (`phase_start_checkpoint`; `checkpoint.prune` keeps it, pinned). The other network was frozen for the
    whole phase, so only the phase's network (rows, dense weights, optimizer state) changes, and the RNG goes
    back with it: a resumed run rejects the same way. Its files are checked against their sha256 first: a
    damaged one is a one-line DataError naming it, not a silently different network."""
    manifest = checked_on_rank0(run.comm, lambda: intact_manifest(start))
    load_checkpoint(run.comm, start, manifest, run.networks, run.table, run.steppers)


def frozen_item_rows(run: Run, phase: Phase) -> torch.Tensor | None:
    """B's item matrix on this shard, for a phase that mines B's ranks (None otherwise)."""
    if phase.negatives != "hard":
        return None
    frozen = run.networks[OTHER[phase.network]].eval()
    return item_matrix(frozen, run.table, run.cfg.eval.tile_rows)[0]


def train_epoch(run: Run, phase: Phase, frozen_rows: torch.Tensor | None, logs: list[dict] | None = None,
                on_step: Callable[[], None] | None = None) -> list[dict]:
    """One epoch of the phase's network; returns the logged losses of every step.

    `logs` holds the steps already done in this epoch (a resumed epoch): their batches are skipped,
    which restores the data position because the batch sequence depends only on (seed, epoch).
    Each step's log is appended to it, then `on_step()` runs (the periodic checkpoint). The logged
    losses stay on the device until they are read (`read_logs`): once per epoch, at a checkpoint, and on
    rank 0 every `train.log_every` steps (the metric sinks' per-step loss)."""
    trained = run.networks[phase.network]
    frozen = run.networks[OTHER[phase.network]] if frozen_rows is not None else None
    stepper = run.steppers[phase.network]
    trained.train()
    logs = [] if logs is None else logs
    reader = run.train_reader
    batches = itertools.islice(reader.epoch(phase.epoch), len(logs), None)
    for step, batch in enumerate(tqdm(batches, total=reader.steps_per_epoch(), initial=len(logs),
                                      desc=f"train e{phase.epoch}", leave=False, **progress_bar(run.comm.rank)),
                                 start=len(logs)):
        stepper.zero_grad()
        loss, logged = train_step(run.comm, run.cfg, phase, trained, frozen, frozen_rows, run.table,
                                  batch.to(run.device), step, run.k2)
        stepper.backward(loss)
        stepper.scale_lr(run.lr_factor(phase.epoch, step))
        stepper.step()
        logs.append(logged)
        if on_step is not None:
            on_step()
    return read_logs(logs)


def refuse_diverged(epoch: int, network: str, logs: list[dict]) -> None:
    """Stop at the epoch's first non-finite training loss (`logs` read: `read_logs`). The loss is the global
    batch's, the same on every rank, so every rank that looks stops alike."""
    for step, log in enumerate(logs):
        if not math.isfinite(log["loss"]):
            raise ConfigError(f"epoch {epoch}, step {step}: the {network} network's training loss is {log['loss']}: "
                              f"the run diverged (lower train.lr_id / train.lr_text)")


def rate_text(sessions_per_s: float | None) -> str:
    return "resumed after its last step" if sessions_per_s is None else f"{sessions_per_s:.0f} sessions/s"


def read_logs(logs: list[dict]) -> list[dict]:
    """The logged losses as floats, in place: every value still on the device comes over in one read."""
    pending = [(i, k) for i, log in enumerate(logs) for k, v in log.items() if torch.is_tensor(v)]
    if pending:
        values = torch.stack([logs[i][k] for i, k in pending]).tolist()
        for (i, k), v in zip(pending, values):
            logs[i][k] = v
    return logs
