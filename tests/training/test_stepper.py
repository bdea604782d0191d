"""The DeepSpeed engine of the dense parameters against the DDP engine, in real gloo processes.

fp32 DeepSpeed computes what DDP computes (the ranks' gradients summed, the ID rows untouched by
DeepSpeed); bf16 under ZeRO 1 and 2 stays within bf16 tolerance of DDP fp32; the engine's state_dict
restores the optimizer; and through the real driver a bf16 DeepSpeed run ends with DDP's metrics.

The first DeepSpeed start in a fresh TORCH_EXTENSIONS_DIR JIT-builds a shared-memory op (~1 min);
.ci/run points it at a cached directory.
"""
import io
import json

import pytest
import torch

from alterrec_dist.common.config import load_config
from alterrec_dist.data.synth import write_synth
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.training.recipe import build_run, frozen_item_rows, train_epoch
from alterrec_dist.training.step import train_step
from alterrec_dist.training.schedule import plan
from tests.dist_harness import run_world
from tests.e2e.test_resume import sets, torchrun
from tests.tiny_data import tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Both networks own dense parameters (transformer encoder, item LayerNorm, text MLP), so both get an
# engine; epochs: ID on random negatives, text on random negatives, ID on the text network's hard ones.
COMMON = ["train.method=alterrec", "train.m_random=1", "train.m_gap=1", "train.m_max=3", "train.global_batch_size=16",
          "train.k1=6", "train.k2=20", "model.dim=8", "model.dropout=0.0", "model.encoder=transformer",
          "model.item_layernorm=true", "eval.batch_size=8", "eval.tile_rows=7"]
LR, STEPS = 1e-3, 3 * 6  # the default lr; 3 epochs of 96 train rows in batches of 16
DS = ["trainer.engine=deepspeed"]
FP32 = {f"zero{s}": DS + [f"trainer.zero_stage={s}"] for s in (1, 2)}
BF16 = {f"zero{s}-bf16": DS + [f"trainer.zero_stage={s}", "trainer.precision=bf16"] for s in (1, 2)}
ROUND_TRIP = {"zero0-bf16": DS + ["trainer.precision=bf16"], "zero1-bf16": BF16["zero1-bf16"]}


# -- in the worker processes ------------------------------------------------------------------

def build(data, world, overrides):
    cfg = load_config(None, [f"data.path={data}", f"trainer.num_workers={world}", *COMMON, *overrides])
    return build_run(cfg, Comm())


def train(run, epochs) -> list[float]:
    t, losses = run.cfg.train, []
    for phase in plan(t.method, t.m_random, t.m_gap, t.m_max):
        if phase.epoch in epochs:
            losses += [s["loss"] for s in train_epoch(run, phase, frozen_item_rows(run, phase))]
    return losses


def weights(run) -> dict:
    """Every dense weight (as fp32) and this rank's ID rows."""
    dense = {f"{n}.{k}": v.detach().float().clone() for n, net in run.networks.items() for k, v in net.state_dict().items()}
    return dense | {"x": run.table.x.detach().clone()}


def first_step(run) -> tuple[dict, dict]:
    """One step of the recipe on the first batch: the gradients after backward, the weights after the step."""
    phase = next(iter(plan(run.cfg.train.method, 1, 1, 1)))
    net, stepper = run.networks[phase.network], run.steppers[phase.network]
    stepper.zero_grad()
    loss, _ = train_step(run.comm, run.cfg, phase, net, None, None, run.table,
                         next(iter(run.train_reader.epoch(phase.epoch))), 0, run.k2)
    stepper.backward(loss)
    grads = {k: full_grad(p).clone() for k, p in net.named_parameters()} | {"x": run.table.x.grad.clone()}
    stepper.step()
    return grads, weights(run)


def full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """The reduced gradient of a dense parameter, also where ZeRO keeps it partitioned (then a collective)."""
    if p.grad is not None:
        return p.grad
    from deepspeed.utils import safe_get_full_grad
    return safe_get_full_grad(p)


def checkpoint(run) -> dict:
    """What a checkpoint keeps, through torch.save and torch.load(weights_only=True) as checkpoint.py does."""
    buf = io.BytesIO()
    torch.save({"networks": {n: net.state_dict() for n, net in run.networks.items()}, "x": run.table.x.detach(),
                "steppers": {n: s.state_dict() for n, s in run.steppers.items()}}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def restore(run, saved: dict, optimizer: bool) -> None:
    for name, net in run.networks.items():
        net.load_state_dict(saved["networks"][name])
    with torch.no_grad():
        run.table.x.copy_(saved["x"])
    if optimizer:
        for name, stepper in run.steppers.items():
            stepper.load_state_dict(saved["steppers"][name])


def round_trip(data, world, overrides) -> dict:
    """Train 2 epochs, keep the state, train the 3rd; a fresh run restored from the state trains the 3rd
    again, and one restored without the optimizer state (the control: the state matters)."""
    run = build(data, world, overrides)
    train(run, {0, 1})
    saved = checkpoint(run)
    train(run, {2})
    out = {"continued": weights(run)}
    for name, optimizer in (("restored", True), ("fresh_optimizer", False)):
        again = build(data, world, overrides)
        restore(again, saved, optimizer)
        train(again, {2})
        out[name] = weights(again)
    return out


def evaluated_as_fp32(run, data, world) -> tuple[dict, dict]:
    """The valid metrics of a bf16-trained run, and of fp32 DDP networks given its weights (as export,
    recommend and batch_score load a saved model)."""
    copy = build(data, world, [])
    restore(copy, checkpoint(run), optimizer=False)
    return run.evaluate("valid", 0), copy.evaluate("valid", 0)


def refusals(run) -> list[str]:
    """Loading a ZeRO state saved on another rank, at another world size, or by the DDP engine."""
    engine = run.steppers["id"].engine
    state, errors = engine.state_dict(), []
    for wrong in ({**state, "rank": 1 - run.comm.rank}, {**state, "world": 4}, {"engine": "ddp", "optimizer": None}):
        try:
            engine.load_state_dict(wrong)
        except ValueError as e:
            errors.append(str(e))
    return errors


def scaled_first_step(run, factor: float) -> dict:
    """The largest change of the dense weights and of the ID rows in a first step at lr * factor."""
    for stepper in run.steppers.values():
        stepper.scale_lr(factor)
    before = weights(run)
    _, after = first_step(run)
    dense = max((after[k] - before[k]).abs().max().item() for k in before if k.startswith("id.") and k != "x")
    return {"dense": dense, "x": (after["x"] - before["x"]).abs().max().item()}


def buckets(run) -> dict:
    """Per network: ZeRO's reduce and all-gather bucket sizes, and the network's parameter count."""
    return {n: (s.engine.ds.optimizer.reduce_bucket_size, s.engine.ds.optimizer.allgather_bucket_size,
                sum(p.numel() for p in run.networks[n].parameters())) for n, s in run.steppers.items()}


def engines_world(rank, world, data):
    """Everything the in-process tests check, in one world (DeepSpeed's import costs seconds a process)."""
    out = {"first_step": {n: first_step(build(data, world, o)) for n, o in {"ddp": [], "zero0": DS, **FP32}.items()}}
    runs = {name: build(data, world, o) for name, o in {"ddp": [], **FP32, **BF16}.items()}
    out["trained"] = {name: {"losses": train(run, {0, 1, 2}), "weights": weights(run)} for name, run in runs.items()}
    out["buckets"] = {name: buckets(run) for name, run in runs.items() if name != "ddp"}
    out["evaluated"] = evaluated_as_fp32(runs["zero2-bf16"], data, world)
    out["round_trip"] = {name: round_trip(data, world, o) for name, o in ROUND_TRIP.items()}
    out["refusals"] = refusals(build(data, world, BF16["zero1-bf16"]))
    out["scaled_lr"] = {name: scaled_first_step(build(data, world, o), 0.25) for name, o in {"ddp": [], **FP32}.items()}
    return out


# -- the tests --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_world(engines_world, 2, str(tiny_dataset(tmp_path_factory.mktemp("engine") / "data")))


@pytest.mark.parametrize("name", ["zero0", *FP32])
def test_deepspeed_sums_gradients_like_ddp(world2, name):
    """fp32, one step: the same summed dense gradients (DeepSpeed's default would average them; Adam
    hardly notices a scale, so the gradients themselves are compared), the same ID-row gradients
    (outside DeepSpeed), the same weights after the step."""
    for r in world2:
        ddp, ds = r["first_step"]["ddp"], r["first_step"][name]
        for got, want in ((ds[0], ddp[0]), (ds[1], ddp[1])):
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-8, msg=k)


@pytest.mark.parametrize("name", FP32)
def test_zero_stages_in_fp32_train_like_ddp(world2, name):
    """Three epochs (both networks, random and hard negatives): the same losses and weights."""
    for r in world2:
        ddp, ds = r["trained"]["ddp"], r["trained"][name]
        assert len(ds["losses"]) == STEPS
        torch.testing.assert_close(ds["losses"], ddp["losses"], rtol=1e-6, atol=0)
        for k, v in ddp["weights"].items():
            torch.testing.assert_close(ds["weights"][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", BF16)
def test_zero_stages_in_bf16_stay_within_bf16_tolerance_of_ddp_fp32(world2, name):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9): losses within 2 %. Adam moves a weight by
    about lr a step whatever the gradient's size, so where bf16 rounding turns a small gradient's sign
    the weights part by up to 2 lr a step: allow a quarter of that over the run, plus 2^-7 relative."""
    for r in world2:
        ddp, ds = r["trained"]["ddp"], r["trained"][name]
        torch.testing.assert_close(ds["losses"], ddp["losses"], rtol=2e-2, atol=0)
        for k, v in ddp["weights"].items():
            torch.testing.assert_close(ds["weights"][k], v, rtol=2 ** -7, atol=0.5 * STEPS * LR, msg=k)
        assert ds["losses"] != ddp["losses"], "bf16 ran in bf16"


def test_zero_buckets_hold_the_network_not_deepspeeds_default(world2):
    """DeepSpeed's default buckets (5e8 elements) made ZeRO 1-2 allocate 2 GB of fp32 every step for these
    networks of a few thousand parameters: 18x this module's training time, 2.4 GB RSS a rank against 0.6 GB."""
    for r in world2:
        for name, networks in r["buckets"].items():
            for reduce, allgather, params in networks.values():
                assert reduce == allgather == params + params % 2, name


def test_bf16_run_evaluates_as_its_weights_do_in_fp32_networks(world2):
    """Evaluation computes in fp32 from the bf16 weights: the saved model reproduces the run's metrics."""
    for r in world2:
        bf16, fp32 = r["evaluated"]
        assert bf16 == fp32


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_state_dict_round_trip_restores_the_optimizer(world2, name):
    """ZeRO 0 (replicated fp32 master weights and moments) and ZeRO 1 (this rank's partition of them)."""
    for r in world2:
        got = r["round_trip"][name]
        for k, v in got["continued"].items():
            torch.testing.assert_close(got["restored"][k], v, rtol=0, atol=0, msg=k)
        assert any(not torch.equal(got["fresh_optimizer"][k], v) for k, v in got["continued"].items())


def test_zero_state_refuses_another_rank_world_size_or_engine(world2):
    for r in world2:
        assert len(r["refusals"]) == 3
        for msg in r["refusals"]:
            assert "does not fit this run" in msg and "world size" in msg


# -- through the real driver ------------------------------------------------------------------

DRIVER = ["model.dropout=0.0", "model.dim=32", "model.item_layernorm=true", "train.m_random=1", "train.m_gap=1",
          "train.m_max=3", "train.k2=200", "trainer.num_workers=2"]
TOLERANCE = 0.03  # 6 of the 211 valid sessions crossing a cut-off; measured: at most 0.0095 (2 sessions)


def train_with_torchrun(out, data, overrides):
    # torchrun fails the test with the run's own output
    torchrun(2, ["--out", str(out), *sets([f"data.path={data}", *DRIVER, *overrides])], out.parent)
    return json.loads((out / "summary.json").read_text()), [json.loads(l) for l in open(out / "metrics.jsonl")]


def test_driver_deepspeed_bf16_ends_with_the_metrics_of_ddp_fp32(tmp_path):
    data = write_synth(tmp_path / "data", items=300, sessions=2000, text_dim=32, progress=False)
    ddp, ddp_log = train_with_torchrun(tmp_path / "ddp", data, [])
    ds, ds_log = train_with_torchrun(tmp_path / "ds", data, ["trainer.engine=deepspeed", "trainer.precision=bf16",
                                                             "trainer.zero_stage=1"])
    for a, b in zip(ddp_log, ds_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)  # measured: 4e-4
    for split in ("valid", "test"):
        for kind in ("id", "text", "fused"):
            for metric, value in ddp[split][kind].items():
                assert ds[split][kind][metric] == pytest.approx(value, abs=TOLERANCE), (split, kind, metric)


def test_scale_lr_reaches_the_engine_and_the_rows(world2):
    """train.lr_schedule sets the lr through Stepper.scale_lr: AdamW's first step moves each weight by
    about lr (|m / sqrt(v)| = 1), so the largest move shows the lr each optimizer actually used."""
    for r in world2:
        for name, moved in r["scaled_lr"].items():
            assert moved["dense"] == pytest.approx(0.25 * LR, rel=0.02), name
            assert moved["x"] == pytest.approx(0.25 * LR, rel=0.02), name


def own_lr_steps(rank, world, data, lr_id, lr_text):
    """Per network, one DDP step on its first (random) epoch's first batch: its optimizers' lrs, and the largest
    move of its dense weights and of the ID rows in that step."""
    run = build(data, world, [f"train.lr_id={lr_id}", f"train.lr_text={lr_text}"])
    t, out = run.cfg.train, {}
    for phase in plan(t.method, t.m_random, t.m_gap, t.m_max)[:2]:  # ID, then text
        net, stepper = run.networks[phase.network], run.steppers[phase.network]
        before, x_before = {k: p.detach().clone() for k, p in net.named_parameters()}, run.table.x.detach().clone()
        stepper.zero_grad()
        loss, _ = train_step(run.comm, run.cfg, phase, net, None, None, run.table,
                             next(iter(run.train_reader.epoch(phase.epoch))), 0, run.k2)
        stepper.backward(loss)
        stepper.step()
        out[phase.network] = {
            "dense_lr": [g["lr"] for g in stepper.engine.optimizer.param_groups],
            "rows_lr": [g["lr"] for g in stepper.rows.param_groups] if stepper.rows else None,
            "dense_moved": max((p.detach() - before[k]).abs().max().item() for k, p in net.named_parameters()),
            "x_moved": (run.table.x.detach() - x_before).abs().max().item()}
    return out


def test_each_network_steps_at_its_own_lr(tmp_path):
    """train.lr_id and train.lr_text are the two networks' learning rates (the ID rows always at lr_id): with
    them apart, the ID network's optimizers must run at lr_id and the text network's at lr_text. AdamW's first
    step moves each weight by about its lr, so the largest move shows the lr each one actually used."""
    lr_id, lr_text = 4e-3, 1e-3
    [got] = run_world(own_lr_steps, 1, str(tiny_dataset(tmp_path / "data")), lr_id, lr_text)
    assert got["id"]["dense_lr"] == [lr_id] and got["id"]["rows_lr"] == [lr_id]
    assert got["text"]["dense_lr"] == [lr_text] and got["text"]["rows_lr"] is None  # the text network has no ID rows
    assert got["id"]["dense_moved"] == pytest.approx(lr_id, rel=0.02)
    assert got["id"]["x_moved"] == pytest.approx(lr_id, rel=0.02)
    assert got["text"]["dense_moved"] == pytest.approx(lr_text, rel=0.02)
    assert got["text"]["x_moved"] == 0.0
