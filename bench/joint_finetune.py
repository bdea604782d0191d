"""Training-time fusion, measured: fine-tune both of a finished AlterRec run's networks together on the fused
score, from its saved best model, and see whether validation moves. Beyond the paper (which trains the two
networks apart and fuses only at inference); a lead for the issue-14 targets, not an engine option.

    python -m bench.joint_finetune RUN_DIR [--lr 1e-4 3e-4] [--epochs 3] [--out bench/JOINT.md]

For each learning rate, from the run's saved model: `--epochs` epochs of one AdamW (the run's weight decay)
over both networks' dense weights and the ID rows, minimising the softmax cross-entropy over the whole catalog
of the fused logits alpha * s_id + (1 - alpha) * s_text (alpha: the run's `eval.alpha`), each network's logits
as the engine scores them (its item rows and temperature). After every epoch the engine's own evaluation
(`Run.evaluate`) scores validation and test, alpha chosen on validation among the run's candidates
(`recipe.chosen_alpha`). Epoch 0 is the saved model itself, checked against the run's summary.json (the run
is refused otherwise), so every later row is comparable with it. One process, the run's data, CPU.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.config import load_config
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import atomic_write_bytes, atomic_write_json, read_json
from alterrec_dist.common.methods import method, selection
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.saved import load_model
from alterrec_dist.training.recipe import Run, build_run, chosen_alpha

METRICS = ("hit@10", "ndcg@10")


def start_run(run_dir: Path) -> Run:
    """The run's networks and ID rows as its model/ saved them, on one worker."""
    cfg = load_config(run_dir / "config.toml", ["trainer.num_workers=1", "trainer.use_gpu=false"])
    if method(cfg.train.method).networks.keys() != {"id", "text"}:
        raise DataError(f"{run_dir / 'config.toml'}: method {cfg.train.method!r} has no two networks to fuse")
    run = build_run(cfg, Comm())
    _, states, x = load_model(run_dir / "model")
    for name, net in run.networks.items():
        net.load_state_dict(states[name])
    with torch.no_grad():
        run.table.x.copy_(x[run.table.global_ids])
    return run


def scored(run: Run, epoch: int) -> dict:
    """Validation and test at the alpha chosen on validation, and each network alone."""
    e = run.cfg.eval
    best = {"valid": run.evaluate("valid", epoch), "test": run.evaluate("test", epoch)}
    part, metric = selection(run.cfg.train.method, e.metric)
    alpha = chosen_alpha(best, e.alpha, e.alpha_sweep, part, metric)

    def pick(metrics: dict) -> dict:
        return {m: metrics[m] for m in METRICS}

    return {"epoch": epoch, "alpha": alpha["chosen"], "valid": pick(alpha["valid"]), "test": pick(alpha["test"]),
            **{f"{split}_{net}": pick(best[split][net]) for split in best for net in ("id", "text")}}


def check_start(row: dict, run_dir: Path) -> None:
    """The saved model, scored here, must be the run's best epoch as its summary.json reports it."""
    summary = read_json(run_dir / "summary.json")
    for split in ("valid", "test"):
        for m in METRICS:
            if abs(row[split][m] - summary["alpha"][split][m]) > 1e-6:
                raise DataError(f"{run_dir / 'summary.json'}: {split} {m} {summary['alpha'][split][m]:.6f} but its "
                                f"model scores {row[split][m]:.6f} here: the model and summary are not one run")


def fused_epoch(run: Run, optimizer: torch.optim.Optimizer, alpha: float, epoch: int) -> float:
    """One epoch of both networks on the fused score's full-catalog softmax; the mean loss."""
    ids, text, table = run.networks["id"], run.networks["text"], run.table
    ids.train()
    text.train()
    losses = []
    reader = run.train_reader
    for batch in tqdm(reader.epoch(epoch), total=reader.steps_per_epoch(), desc=f"joint e{epoch}", leave=False):
        x, f, inverse = table.fetch(batch.items.flatten(), True, True)

        def logits(net, x_rows, f_rows, x_all, f_all):
            rows = net.item_rows(x_rows, f_rows)
            q = net.encode(rows[inverse].view(*batch.items.shape, -1), batch.mask)
            return net.logits(q, net.item_rows(x_all, f_all))

        fused = alpha * logits(ids, x, None, table.x, None) + (1 - alpha) * logits(text, None, f, None, table.f)
        loss = torch.nn.functional.cross_entropy(fused, batch.target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def finetune(run_dir: Path, lr: float, epochs: int) -> list[dict]:
    """Rows for the saved model (epoch 0) and after each joint epoch at learning rate `lr`."""
    run = start_run(run_dir)
    rows = [scored(run, 0)]
    check_start(rows[0], run_dir)
    params = [*run.networks["id"].parameters(), *run.networks["text"].parameters(), run.table.x]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=run.cfg.train.weight_decay)
    for epoch in range(1, epochs + 1):
        loss = fused_epoch(run, optimizer, run.cfg.eval.alpha, epoch)
        rows.append({**scored(run, epoch), "loss": loss})
        tqdm.write(f"lr {lr:g} epoch {epoch}: loss {loss:.4f}, valid ndcg@10 {rows[-1]['valid']['ndcg@10']:.4f}")
    return rows


def report(run_dir: Path, results: dict[str, list[dict]], command: str, minutes: float) -> str:
    lines = ["# Training-time fusion: both networks fine-tuned together on the fused score", "",
             f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.1f} min). "
             f"Run: `{run_dir}`. Epoch 0 is its saved model (= its summary.json); each later epoch is one more pass "
             "over the training sessions of both networks on the full-catalog softmax of the fused score. α is "
             "chosen on validation at each row.", "",
             "| lr | epoch | loss | α | valid hit@10 | valid ndcg@10 | test hit@10 | test ndcg@10 | "
             "valid ndcg@10 id / text |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lr, rows in results.items():
        for r in rows:
            loss = f"{r['loss']:.4f}" if "loss" in r else "–"
            lines.append(f"| {lr} | {r['epoch']} | {loss} | {r['alpha']:g} | {r['valid']['hit@10']:.4f} | "
                         f"{r['valid']['ndcg@10']:.4f} | {r['test']['hit@10']:.4f} | {r['test']['ndcg@10']:.4f} | "
                         f"{r['valid_id']['ndcg@10']:.4f} / {r['valid_text']['ndcg@10']:.4f} |")
    best = {lr: max(rows, key=lambda r: r["valid"]["ndcg@10"]) for lr, rows in results.items()}
    lines += ["", "Best epoch on validation per lr: " + ", ".join(
        f"lr {lr}: epoch {r['epoch']} (valid {r['valid']['ndcg@10']:.4f}, test {r['test']['ndcg@10']:.4f})"
        for lr, r in best.items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.joint_finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished AlterRec run directory (config.toml, model/, summary.json)")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4], help="learning rates, each from the saved model")
    p.add_argument("--epochs", type=int, default=3, help="joint epochs per learning rate (default 3)")
    p.add_argument("--out", default="bench/JOINT.md", help="markdown report (the figures beside it as .json)")
    args = p.parse_args(argv)
    started = time.time()
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        results = {f"{lr:g}": finetune(args.run, lr, args.epochs) for lr in args.lr}
    finally:
        dist.destroy_process_group()
    command = "python -m bench.joint_finetune " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(args.run, results, command, (time.time() - started) / 60)
    atomic_write_bytes(args.out, text.encode())
    atomic_write_json(Path(args.out).with_suffix(".json"), {"command": command, "run": str(args.run), "lr": results})
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
