"""How a network's parameters are stepped, in one place.

Two kinds of parameters, two paths:

* the network's dense, replicated parameters (encoder, text MLP, positions) go through a
  data-parallel *engine* (`trainer.engine`): `DDPEngine` (one flat all-reduce of the grads, then
  AdamW) or `DeepSpeedEngine` (DeepSpeed: ZeRO 0-2, fp32/bf16, the optimizer state is DeepSpeed's);
* the sharded ID rows (`ShardedItemTable.x`) have their own AdamW on each rank and never enter an
  engine: their gradients are exact where the rows live, and no rank holds a copy of another's.

Both engines SUM the ranks' gradients: each rank's loss is already its share of the global-batch
mean, so the sum is the gradient of the whole batch (`sum_dense_grads`; DeepSpeed is told so).

`Stepper` puts the two together for the recipe: zero_grad / backward / step, and a state_dict
for checkpoints (the engine's state is replicated, except under ZeRO 1-2 where it is this rank's
partition; the row optimizer's is this rank's rows).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from alterrec_dist.common.config import Config
from alterrec_dist.parallel.comm import Comm, sum_dense_grads


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
        return {"engine": "ddp", "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        check_saved_engine(state, {"engine": "ddp"})
        if self.optimizer:
            self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedEngine:
    """Replicated dense parameters stepped by DeepSpeed: ZeRO stage 0-2, fp32/bf16; the AdamW state
    (and, in bf16, the fp32 master weights) belong to DeepSpeed.

    * Sum, not mean: `gradient_allreduce_op = "sum"`, as `DDPEngine` (see the module docstring).
    * The optimizer is torch's AdamW, handed to DeepSpeed: its own Adams JIT-compile C++ for minutes on CPU.
    * In bf16 DeepSpeed casts the module's weights (its optimizer keeps fp32 masters): the trained
      network's layers compute in bf16, everything around them (item tables, scores, band loss, ranks)
      stays fp32, and evaluation and mining compute in fp32 from the bf16 weights: `compute_layers_in`.
    * DeepSpeed's data-parallel group is the default group, the one `Comm()` wraps.
    """

    def __init__(self, comm: Comm, net: nn.Module, lr: float, weight_decay: float, precision: str, zero_stage: int,
                 micro_batch: int, use_gpu: bool):
        deepspeed = import_deepspeed(use_gpu)
        self.comm, self.precision, self.zero_stage = comm, precision, zero_stage
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        config = deepspeed_config(precision, zero_stage, micro_batch, bucket_elements(net))
        self.ds, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
        if precision == "bf16":
            compute_layers_in(net, torch.bfloat16)

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def _layout(self) -> dict:
        """What a saved state must match: under ZeRO 1-2 it is one rank's partition of a given world size."""
        part = {"rank": self.comm.rank, "world": self.comm.world} if self.zero_stage else {}
        return {"engine": "deepspeed", "precision": self.precision, "zero_stage": self.zero_stage, **part}

    def state_dict(self) -> dict:
        """DeepSpeed's optimizer state: replicated at stage 0, this rank's partition under ZeRO 1-2."""
        state = self.ds.optimizer.state_dict()
        # ZeRO's objects that torch.load(weights_only=True) refuses, none needed to restore: the loss scaler
        # (1 outside fp16), the stage (in _layout) and a name -> fragment map DeepSpeed rebuilds itself.
        for key in ("loss_scaler", "zero_stage", "param_slice_mappings"):
            state.pop(key, None)
        return {**self._layout(), "optimizer": state}

    def load_state_dict(self, state: dict) -> None:
        """Into an engine built as the saving one was. A ZeRO 1-2 state loads only on the rank, and at the
        world size, that saved it: DeepSpeed does not re-partition it (its own checkpoints refuse that too)."""
        check_saved_engine(state, self._layout())
        if self.zero_stage:
            # DeepSpeed's loader takes every rank's state and, at an unchanged world size, reads this rank's;
            # from the fp32 copies, not from the bf16 weights (which would lose the master precision).
            parts = [state["optimizer"]] * self.comm.world
            self.ds.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            self.ds.optimizer.load_state_dict(state["optimizer"])


def check_saved_engine(state: dict, expected: dict) -> None:
    """A clear error when a saved engine state does not fit the engine it is loaded into."""
    saved = {k: state.get(k) for k in expected}
    if saved != expected:
        raise ValueError(f"the saved dense optimizer state ({saved}) does not fit this run ({expected}): resume "
                         "with the same trainer.engine, precision and zero_stage (ZeRO 1-2: and world size)")


def import_deepspeed(use_gpu: bool):
    """DeepSpeed, attached to the process group the launcher made (gloo on CPU, nccl on GPU)."""
    # DeepSpeed picks its accelerator once, when first asked, and on a machine with a GPU it would pick
    # CUDA for a CPU run too (and move the networks away from the CPU item tables). Its CPU accelerator
    # then talks over the existing gloo group (ccl only if oneCCL's torch bindings are installed).
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed asserts LOCAL_RANK (torchrun and Ray Train set it); it only names the device, so a
    # group made without them (the one-process torchrun launcher, tests) can say 0.
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    # ZeRO's all-gathers call a collective torch 2.13 marks deprecated: once per process, not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    # The first CPU init_distributed JIT-builds a shared-memory op (~1 min) into TORCH_EXTENSIONS_DIR.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return deepspeed


# DeepSpeed's default ZeRO buckets, in elements: sized for models of billions of parameters.
DEEPSPEED_BUCKET = 500_000_000


def bucket_elements(net: nn.Module) -> int:
    """ZeRO 1-2's reduce and all-gather bucket: the whole network, at most DeepSpeed's default.

    ZeRO allocates a reduce buffer of the bucket's size every step (two with overlap_comm), whatever the
    network's: at the default, 2 GB of fp32 for a network of two million parameters, which on CPU took
    3-6x the step time of a network-sized bucket and 1.7-2.6 GiB peak RSS a rank against 0.74, with the
    same losses (bench/DEEPSPEED.md). One bucket also means one reduction a step.
    DeepSpeed wants the all-gather bucket even (4-byte alignment of 2-byte elements)."""
    elements = sum(p.numel() for p in net.parameters())
    return min(DEEPSPEED_BUCKET, elements + elements % 2)


def deepspeed_config(precision: str, zero_stage: int, micro_batch: int, bucket: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,  # bookkeeping only: the recipe feeds the batches
        "gradient_accumulation_steps": 1,
        "gradient_allreduce_op": "sum",
        "gradient_clipping": 0.0,  # DeepSpeed's default clips to norm 1.0; the DDP engine does not clip
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "zero_allow_untested_optimizer": True,  # torch's AdamW
        "bf16": {"enabled": precision == "bf16"},
    }


def compute_layers_in(net: nn.Module, dtype: torch.dtype) -> None:
    """Make each child layer of `net` that owns weights (now `dtype`) compute in `dtype` where gradients
    flow (the trained network's forward) and in fp32 from the same weights where they do not (the
    frozen network's mining, evaluation); its output is fp32 either way.

    The network is called through its methods (item_rows, encode, logits), not one forward, and its
    inputs are fp32 rows from the sharded tables: so the casts sit at its layers' edges, and the
    recipe, mining and evaluation run unchanged. Scores come from fp32 layer outputs: in bf16 (8
    mantissa bits) many items would tie with the target in full ranking. Evaluating in fp32 from the
    bf16 weights is what the saved model does once loaded into fp32 networks (export, batch_score),
    so it reproduces the run's metrics exactly."""
    held: dict[nn.Module, list[torch.Tensor]] = {}

    def before(layer, args):
        if torch.is_grad_enabled():
            return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        # Swap in fp32 copies and put DeepSpeed's own tensors back after: they are views into its flat
        # buffers, which `layer.float()` would cut the module loose from.
        held[layer] = [p.data for p in layer.parameters()]
        for p in layer.parameters():
            p.data = p.data.float()

    def after(layer, args, out):
        for p, data in zip(layer.parameters(), held.pop(layer, ())):
            p.data = data
        return out.float()

    for layer in net.children():
        if list(layer.parameters()):
            layer.register_forward_pre_hook(before)
            layer.register_forward_hook(after)


class Stepper:
    """One network's optimisation: its dense engine plus, if it scores ID rows, the row optimizer.

    The rows' AdamW is torch's fused one: a step over every local row is one pass (over a 10M x 32 table
    on one CPU thread, 0.84 s against 3.65 s for the default multi-tensor AdamW, measured side by side;
    bench/RESULTS.md's optimizer column at V = 10M, W = 1 fell from 4.5 s to 0.72 s a step). Every row is
    stepped, touched by the batch or not: at the paper's shape (B = 1024, k2 = 20,000, V = 1M) a random
    step touches every row and a hard one 41 % of them (bench/ROWS.md), so a touched-rows-only update
    would save at most a factor 2.4 on the hard steps, and would be another optimizer (AdamW moves
    untouched rows too). Its state is row-aligned (exp_avg, exp_avg_sq), which is what re-partitioning moves."""

    def __init__(self, engine, rows: nn.Parameter | None, lr: float, weight_decay: float):
        self.engine = engine
        self.rows = torch.optim.AdamW([rows], lr=lr, weight_decay=weight_decay, fused=True) \
            if rows is not None else None
        self.base_lrs = [g["lr"] for g in self._param_groups()]

    def _param_groups(self) -> list[dict]:
        """Every optimizer param group this stepper steps: the engine's (DDP's AdamW, or DeepSpeed's
        optimizer, whose groups are the ones its step reads) and the rows'."""
        dense = getattr(self.engine, "optimizer", None) or getattr(getattr(self.engine, "ds", None), "optimizer", None)
        return [*(dense.param_groups if dense is not None else []), *(self.rows.param_groups if self.rows else [])]

    def scale_lr(self, factor: float) -> None:
        """Set every group's lr to its base lr times `factor` (train.lr_schedule), before a step."""
        for group, base in zip(self._param_groups(), self.base_lrs):
            group["lr"] = base * factor

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        if self.rows:
            self.rows.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        # The rows step whatever the engine did: DeepSpeed (bf16: no loss scale) skips a step only on non-finite
        # dense gradients, a divergence that the ddp engine steps into too and the NaN loss stops (`refuse_diverged`).
        self.engine.step()
        if self.rows:
            self.rows.step()

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict(), "rows": self.rows.state_dict() if self.rows else None}

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        if self.rows:
            self.rows.load_state_dict(state["rows"])


def build_stepper(comm: Comm, name: str, net, table, cfg: Config) -> Stepper:
    """The network's stepper on `cfg.trainer.engine`: lr_text for the text network's dense part, lr_id
    otherwise; the ID rows always at lr_id."""
    t, r = cfg.train, cfg.trainer
    lr = t.lr_text if name == "text" else t.lr_id
    params = net.dense_parameters()
    if r.engine == "deepspeed" and params:  # DeepSpeed needs parameters; without any there is nothing to step
        engine = DeepSpeedEngine(comm, net, lr, t.weight_decay, r.precision, r.zero_stage,
                                 t.global_batch_size // comm.world, r.use_gpu)
    else:
        engine = DDPEngine(comm, params, lr, t.weight_decay)
    return Stepper(engine, table.x if net.uses_id else None, t.lr_id, t.weight_decay)
