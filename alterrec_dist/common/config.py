"""Typed run configuration: dataclasses, loaded from TOML, overridden by `--set a.b=c`.

Every knob has a default here, so `python -m alterrec_dist.train` with no file runs the
embedded default. The resolved config is written next to the results (`config.toml`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from alterrec_dist.common import storage
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.common.storage import Location
from alterrec_dist.common.methods import ALTERNATE, METHODS, score_and_metric, sweep_kind

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # alterrec_dist/common/config.py -> the project
LOGIT_FORMS = ("dot", "cosine")
TEXT_ADAPTERS = ("mlp", "whitening", "moe")
METRICS = ("hit@10", "hit@20", "ndcg@10", "ndcg@20", "mrr@20")  # the ranking metrics (eval.metrics), in report order
SCORE_PARTS = ("id", "text", "fused")  # the scores every method is evaluated on


def shown(path: Path) -> Path:
    """A path as a user would type it: relative to the project root when inside it."""
    return path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path


@dataclass
class DataConfig:
    path: str = "shards/default"   # a dataset made by `prepare` or `synth`; relative to the project root
    max_len: int = 50              # histories are cut to their most recent max_len items


@dataclass
class ModelConfig:
    dim: int = 64                  # d: item and session embedding size of both networks
    encoder: str = "mean"          # session encoder g: "mean" or "transformer"
    layers: int = 2                # transformer layers
    heads: int = 2                 # transformer attention heads
    dropout: float = 0.1
    text_hidden: int = 0           # hidden width of the text MLP; 0 means a single linear layer
    text_temperature: float = 1.0  # text logits are divided by this (the official code uses 0.07)
    id_temperature: float = 1.0    # ID logits are divided by this (with id_logits = "cosine", e.g. 0.07)
    id_logits: str = "dot"         # ID network's scores: "dot" (the paper) or "cosine" (unit rows and queries)
    text_logits: str = "dot"       # text network's scores: "dot" (the paper) or "cosine"
    text_adapter: str = "mlp"      # text features -> rows: "mlp" (the paper; text_hidden), "whitening" ((f - b) W) or "moe" (UniSRec's 8 gated whitenings)
    id_init: str = "random"        # ID table start: "random" N(0, init_std) or "text" (fixed random projection of the text features)
    item_layernorm: bool = True    # LayerNorm over the item rows of both tables (the official code's; off: the paper's text)
    init_std: float = 0.02         # std of the ID table initialisation


@dataclass
class TrainConfig:
    method: str = "alterrec"       # one of METHODS
    m_random: int = 2              # Algorithm 1: epochs per network with random negatives first
    m_gap: int = 2                 # then alternate every m_gap epochs, ID first
    m_max: int = 10                # epochs in all (the paper uses 30); the ceiling with patience
    patience: int = 0              # stop after this many epochs past the warm-ups without a better eval.metric; 0: off
    reject_worse: bool = False     # beyond the paper: a phase after the warm-up that leaves its network worse on
                                   # validation (its own eval.metric) is undone, back to the phase's start
    k1: int = 20                   # hard negatives are the other network's ranks k1..k2 (0-based, k2 exclusive)
    k2: int = 500
    hard_fraction: float = 1.0     # share of the k2-k1 negatives that are hard; the rest uniform random
    random_negatives: str = "sampled"  # a random phase's negatives: "sampled" (k2-k1 uniform draws, the paper) or
                                   # "catalog" (every other item: a softmax over the whole catalog, for small ones)
    p: int = 5                     # augmented positives: the other network's top-p (alterrec_aug)
    beta: float = 0.5              # weight of the augmented positives' loss
    merge: str = "threshold"       # band merge across shards: "threshold" (bisection) or "allgather"
    global_batch_size: int = 1024  # sessions per step over all workers; each worker takes an equal slice
    lr_id: float = 1e-3
    lr_text: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "constant" (the paper) or "warmup_cosine" over each network's own steps
    lr_warmup: float = 0.1         # warmup_cosine: share of the network's own steps spent ramping up
    seed: int = 0
    checkpoint_every: int = 0      # steps between mid-epoch training checkpoints (each epoch ends with one); 0: none
    log_every: int = 10            # steps between per-step losses to TensorBoard/MLflow (one host read each); 0: none


@dataclass
class EvalConfig:
    alpha: float = 0.5             # fused score = alpha * id + (1 - alpha) * text
    alpha_sweep: list[float] = field(default_factory=list)  # extra fused kinds "fused@<a>" (sensitivity)
    metric: str = "fused/ndcg@10"  # model selection on validation: "<id|text|fused>/<metric>"
    batch_size: int = 512          # eval sessions per step over all workers
    tile_rows: int = 0             # item rows scored at once per shard (training, mining, evaluation): bounds
                                   # the score tile in memory; 0: 65,536 on a CPU, one tile of <= 4 GiB on a GPU
    longtail_bins: list[int] = field(default_factory=lambda: [30, 100])  # [0,30], (30,100], (100,inf)


@dataclass
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False          # each worker on cuda:<local rank>, collectives over nccl
    launcher: str = "ray"          # "ray" (TorchTrainer) or "torchrun" (GPU machines without Ray)
    storage_path: str = "runs"     # where run directories go; relative to the project root
    name: str = ""                 # run directory name; empty means <method>-<timestamp>
    max_failures: int = 2          # ray: restarts of the workers, each from the newest checkpoint; -1: no limit
    engine: str = "ddp"            # dense parameters: "ddp" (all-reduce + AdamW) or "deepspeed" (README: Engines)
    precision: str = "fp32"        # trained layers: "fp32" or "bf16" (ddp: autocast; deepspeed: bf16 weights);
                                   # scores, band loss and ranks stay fp32; fp16 is refused (`RANGES`)
    zero_stage: int = 0            # deepspeed ZeRO: 0 replicated, 1 optimizer state, 2 + gradients partitioned
    tf32: bool = True              # on GPU: training's and mining's fp32 matmuls on TF32 tensor cores; false:
                                   # exact fp32 (evaluation is exact fp32 either way: `device.exact_fp32_matmuls`)
    cpu_threads: int = 1           # torch threads of a CPU worker, under either launcher: results depend on it
                                   # (LayerNorm's backward sums per thread), so it is set, not inherited


# -- valid ranges: the one place that knows them ----------------------------------------------------
# "section.key" -> (predicate, what the value must be). `Config.validate` checks every entry before
# the combinations below it, so a new field needs one line here. NaN fails every float check.

def _at_least(low: int):
    return lambda v: v >= low, f">= {low}"


def _positive_float():
    return lambda v: math.isfinite(v) and v > 0, "a finite number > 0"


MIN_TEMPERATURE = 1e-4


def _temperature():
    # 1/temperature scales every logit: a tiny one (1e-300) made it inf, every score NaN and every target last
    return lambda v: math.isfinite(v) and v >= MIN_TEMPERATURE, f"a finite number >= {MIN_TEMPERATURE:g}"


def _finite_at_least_zero():
    return lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"


def _unit_interval():
    return lambda v: 0.0 <= v <= 1.0, "in [0, 1]"


def _one_of(*choices):
    return lambda v: v in choices, "one of " + ", ".join(map(str, choices))


def _increasing_bins(bins: list[int]) -> bool:
    return all(b >= 0 for b in bins) and all(a < b for a, b in zip(bins, bins[1:]))


def _valid_metric(metric: str) -> bool:
    part, name = score_and_metric(metric)
    return part in SCORE_PARTS and name in METRICS


RANGES: dict[str, tuple[typing.Callable, str]] = {
    "data.path": (lambda v: v.strip() != "", "a dataset directory, not empty"),
    "data.max_len": _at_least(1),
    "model.dim": _at_least(1),
    "model.encoder": _one_of("mean", "transformer"),
    "model.layers": _at_least(1),
    "model.heads": _at_least(1),
    "model.dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "model.text_hidden": _at_least(0),
    "model.text_temperature": _temperature(),
    "model.init_std": _positive_float(),
    "model.id_temperature": _temperature(),
    "model.id_logits": _one_of(*LOGIT_FORMS),
    "model.text_logits": _one_of(*LOGIT_FORMS),
    "model.text_adapter": _one_of(*TEXT_ADAPTERS),
    "model.id_init": _one_of("random", "text"),
    "train.method": _one_of(*METHODS),
    "train.m_random": _at_least(0),
    "train.m_gap": _at_least(1),
    "train.m_max": _at_least(1),
    "train.k1": _at_least(0),
    "train.k2": _at_least(1),
    "train.hard_fraction": _unit_interval(),
    "train.random_negatives": _one_of("sampled", "catalog"),
    "train.p": _at_least(1),
    "train.beta": _finite_at_least_zero(),
    "train.merge": _one_of("threshold", "allgather"),
    "train.global_batch_size": _at_least(1),
    "train.lr_id": _positive_float(),
    "train.lr_text": _positive_float(),
    "train.weight_decay": _finite_at_least_zero(),
    "train.seed": _at_least(0),
    "train.checkpoint_every": _at_least(0),
    "train.log_every": _at_least(0),
    "train.patience": _at_least(0),
    "train.lr_schedule": _one_of("constant", "warmup_cosine"),
    "train.lr_warmup": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "eval.alpha": _unit_interval(),
    "eval.alpha_sweep": (lambda v: all(0.0 <= a <= 1.0 for a in v) and len({sweep_kind(a) for a in v}) == len(v),
                         "distinct values in [0, 1] (as named: fused@<value> to 6 digits)"),
    "eval.metric": (_valid_metric, f"<{'|'.join(SCORE_PARTS)}>/<{'|'.join(METRICS)}>, like fused/ndcg@10"),
    "eval.batch_size": _at_least(1),
    "eval.tile_rows": (lambda v: v >= 0, ">= 0 (0: automatic, per device)"),
    "eval.longtail_bins": (_increasing_bins, "non-negative and strictly increasing, like [30, 100]"),
    "trainer.num_workers": _at_least(1),
    "trainer.name": (lambda v: v == "" or (not v.startswith("/") and "" not in (parts := v.split("/"))
                                           and "." not in parts and ".." not in parts),
                     "a directory name under trainer.storage_path (relative, like exp/a; no '..': use --out for "
                     "a path elsewhere)"),
    "trainer.launcher": _one_of("ray", "torchrun"),
    "trainer.max_failures": _at_least(-1),
    "trainer.engine": _one_of("ddp", "deepspeed"),
    # DeepSpeed 0.19.8's fp16 trained wrong at every stage: at ZeRO 0 its unfused optimizer divides by a loss scale
    # nobody multiplied by (its PR #8393), and at ZeRO 1-2 the ID rows' gradients, outside its overflow check, reach
    # |g| = 12 a step (the dense ones 2), past fp16's 65504 at a loss scale of 32768: the rows went NaN in 2-3
    # steps (simulated on the CPU). bf16 has fp32's range and needs no loss scale.
    "trainer.precision": (lambda v: v in ("fp32", "bf16"),
                          "one of fp32, bf16 (fp16 is refused: DeepSpeed's loss scaling shrinks the dense gradients "
                          "65536x at ZeRO 0 and lets the ID rows' gradients overflow at ZeRO 1-2; use bf16, which "
                          "every A100/H100/H200 has)"),
    "trainer.zero_stage": _one_of(0, 1, 2),
    "trainer.cpu_threads": _at_least(1),
}


# Ranges tightened since runs were trained under them: a run's saved config is held to these (it served, and its
# model serves as trained), new settings to RANGES'. (Also dim >= 2 with item_layernorm, in `validate`.)
EARLIER_RANGES: dict[str, tuple[typing.Callable, str]] = {
    "model.text_temperature": _positive_float(),
    "model.id_temperature": _positive_float(),
    "eval.alpha_sweep": (lambda v: all(0.0 <= a <= 1.0 for a in v), "values in [0, 1]"),
    "trainer.precision": _one_of("fp32", "bf16", "fp16"),  # fp16 until it was refused: its runs' models serve
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self, saved: bool = False) -> "Config":
        """ConfigError with one line on the first value out of its range (`RANGES`), then on the
        first invalid combination. Runs on the driver, before anything starts. `saved`: a run's own config,
        held to the ranges of the version that trained it (`EARLIER_RANGES`)."""
        for name, (ok, what) in (RANGES | EARLIER_RANGES if saved else RANGES).items():
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if not ok(value):
                raise ConfigError(f"{name} must be {what}, got {value!r}")
        for path in (self.data.path, self.trainer.storage_path):  # used or not (--out): a run writes both down
            self.resolve_path(path)
        t, m, e, r = self.train, self.model, self.eval, self.trainer
        checks = [
            (t.k1 < t.k2, f"need 0 <= train.k1 < train.k2, got k1={t.k1} k2={t.k2}"),
            (not METHODS[t.method].augmented or t.p < t.k1, f"augmentation needs train.p < train.k1, got p={t.p} k1={t.k1}"),
            (t.global_batch_size % r.num_workers == 0,
             f"train.global_batch_size={t.global_batch_size} must be divisible by trainer.num_workers={r.num_workers}"),
            (e.batch_size % r.num_workers == 0,
             f"eval.batch_size={e.batch_size} must be divisible by trainer.num_workers={r.num_workers}"),
            (r.zero_stage == 0 or r.engine == "deepspeed",
             f"trainer.zero_stage={r.zero_stage} needs trainer.engine=deepspeed"),
            (m.id_logits == m.text_logits == "dot" or not METHODS[t.method].fused,
             "cosine logits apply to the separate id and text networks, not to NFRec's fused one: set "
             "model.id_logits=dot and model.text_logits=dot"),
            (m.text_adapter == "mlp" or m.text_hidden == 0, "model.text_hidden applies to model.text_adapter = mlp"),
            (not t.reject_worse or METHODS[t.method].schedule == ALTERNATE,
             f"train.reject_worse applies to methods that alternate two networks, not {t.method}: set "
             "train.reject_worse=false"),
            (saved or m.dim >= 2 or not m.item_layernorm,  # a LayerNorm of one value gives its bias: all items tie
             f"model.dim={m.dim} with model.item_layernorm=true makes every item row the same: dim must be >= 2"),
            (m.encoder != "transformer" or m.dim % m.heads == 0,
             f"model.dim={m.dim} must be divisible by model.heads={m.heads} for the transformer encoder"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    def resolve_path(self, p: str) -> Location:
        """A config path as an absolute location: a store URI as it is, a relative path from the project root."""
        try:
            path = storage.location(p)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return path if path.is_absolute() else PROJECT_ROOT / path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, where: str, text: bool = False):
    """Convert a value to the field's declared type: a TOML (or config dict) value as typed, or (`text`) a
    `--set` string, which is parsed. A TOML string where a number, a bool or a list goes (m_max = "3") is
    refused, as is a `--set` list without both of its brackets ([10, was read as [10])."""
    origin = typing.get_origin(typ)
    if origin is list:
        (elem,) = typing.get_args(typ)
        if isinstance(value, str) and text:
            inner = value.strip()
            if inner.startswith("[") != inner.endswith("]"):
                raise ConfigError(f"{where}: expected a list like [1, 2], got {value!r}")
            value = [v for v in inner.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, elem, where, text) for v in value]
    try:
        if isinstance(value, str) and typ is not str and not text:
            raise ValueError
        if typ is bool:
            if isinstance(value, bool):
                return value
            if text and value.lower() in ("true", "1", "yes"):
                return True
            if text and value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value) if not isinstance(value, str) else int(value.replace("_", ""))
            if not -2**63 <= number < 2**64:  # torch and numpy take 64 bits (a seed up to 2**64 - 1): past them,
                raise ConfigError(f"{where}: {number} is out of range (past 64 bits)")  # a worker's traceback
            return number
        if typ is float:
            if isinstance(value, bool):  # TOML's true is not 1.0
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (list, dict)):
                raise ValueError
            control = next((c for c in str(value) if c < " " or c == "\x7f"), None)
            if control is not None:  # config.toml could not hold it: the run would not resume or export
                raise ConfigError(f"{where}: a control character ({control!r}) in {str(value)!r}")
            return str(value)
    except (ValueError, TypeError):  # TypeError: a TOML list or table where a number goes
        pass
    raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")


def setting_type(section: str, key: str, where: str) -> type:
    """The declared type of the setting `section.key`; ConfigError naming `where` for a name that is none."""
    sections = typing.get_type_hints(Config)
    if section not in sections:
        raise ConfigError(f"{where}: unknown section [{section}]"
                          f"{_did_you_mean(difflib.get_close_matches(section, list(sections), n=3, cutoff=0.5))}")
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        # the key in another section (model.m_max: train.m_max), else this section's keys spelt alike
        elsewhere = [f"{s}.{key}" for s, table in sections.items() if key in typing.get_type_hints(table)]
        alike = [f"{section}.{k}" for k in difflib.get_close_matches(key, list(hints), n=3, cutoff=0.5)]
        raise ConfigError(f"{where}: unknown key {section}.{key}{_did_you_mean(elsewhere or alike)}")
    return hints[key]


def _did_you_mean(names: list[str]) -> str:
    return f" (did you mean {' or '.join(names)}?)" if names else ""


def _apply(cfg: Config, section: str, key: str, value, where: str, text: bool = False) -> None:
    typ = setting_type(section, key, where)
    setattr(getattr(cfg, section), key, _coerce(value, typ, f"{where}: {section}.{key}", text))


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict; ConfigError naming the file if it is missing or not TOML."""
    try:
        return tomllib.loads(storage.location(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} file is a directory") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} file is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                launching: typing.Callable[[Config], None] | None = None) -> Config:
    """Defaults, then the TOML file, then each `section.key=value` override, then `launching` (what the command
    line and the launcher decide, e.g. torchrun's world size), then validation, whose error names where the
    values it names were set (`bad.toml: train.m_max must be >= 1, got 0`)."""
    sources: dict[str, str] = {}
    cfg = _read_config(path, overrides, launching, sources)
    try:
        return cfg.validate()
    except ConfigError as e:
        # every validation message names its settings as section.key; those set in the file or by a --set say so
        named = dict.fromkeys(sources[n] for n in SETTING_NAME.findall(str(e)) if n in sources)
        if not named:
            raise
        raise ConfigError(f"{', '.join(named)}: {e}") from None


def load_saved_config(path: str | Path) -> Config:
    """A run's config.toml, held to the ranges it was trained under (`EARLIER_RANGES`): a run trained before a
    range tightened (a temperature of 5e-5 before the 1e-4 floor) stays servable, and a grid sees it as stale
    rather than stopping; a value no version took is refused, naming the file."""
    try:
        return _read_config(path).validate(saved=True)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


SETTING_NAME = re.compile(rf"\b(?:{'|'.join(f.name for f in dataclasses.fields(Config))})\.[a-z0-9_]+")  # sec.key


def _read_config(path: str | Path | None = None, overrides: list[str] = (),
                 launching: typing.Callable[[Config], None] | None = None,
                 sources: dict[str, str] | None = None) -> Config:
    """The config before validation; `sources`, when given, gets where each value set was set (the file, or the
    --set that set it last)."""
    sources = {} if sources is None else sources
    cfg = Config()
    if path is not None:
        try:
            path = storage.location(path)
        except ValueError as e:  # another scheme, '..' in a key: one line, as for data.path
            raise ConfigError(str(e)) from None
        doc = read_toml(path, "config")
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
                sources[f"{section}.{key}"] = str(path)
    for item in overrides:
        name, eq, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _apply(cfg, section, key.strip(), value.strip(), f"--set {item}", text=True)
        sources[f"{section}.{key.strip()}"] = f"--set {item}"
    if launching is not None:
        before = cfg.to_dict()
        launching(cfg)
        after = cfg.to_dict()  # what it changed is its own: torchrun's world size, --launcher
        sources |= {f"{s}.{k}": "the launch (--launcher, torchrun's world size)"
                    for s in after for k in after[s] if after[s][k] != before[s][k]}
    return cfg


# What `--resume` may change (`--set`, or a retried job's own config): where and how the run executes, when it
# stops, how often it saves and logs, how much it scores at once, and where its data lives (the data's content is
# checked apart, `run_dir.check_same_dataset`). Anything else would make the continuation another run than the one
# its checkpoints and best record hold: another model, plan, seed, loss or selection; the dense engine, its
# precision and ZeRO stage also shape the optimizer state a checkpoint holds (`stepper.check_saved_engine`).
RESUMABLE = ("trainer.num_workers", "trainer.use_gpu", "trainer.launcher", "trainer.storage_path", "trainer.name",
             "trainer.max_failures", "trainer.tf32", "trainer.cpu_threads", "train.m_max", "train.patience",
             "train.checkpoint_every", "train.log_every", "eval.batch_size", "eval.tile_rows", "data.path")
WHERE_A_RUN_GOES = ("trainer.storage_path", "trainer.name")  # without --out: the directory of a new run


def changed_values(before: Config, after: Config) -> dict[str, tuple]:
    """`section.key` -> (before, after) for every value that differs between two configs, in config order."""
    a, b = before.to_dict(), after.to_dict()
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}


def check_resumable(saved: Config, resumed: Config, where: str, in_place: bool = False) -> None:
    """ConfigError in one line if `resumed` changes a key of `saved` (the run's config.toml, `where`) that a
    resumed run must keep (anything outside `RESUMABLE`). `in_place` (`--resume RUN_DIR`): the run goes on in
    RUN_DIR, so neither may the keys that name a new run's directory, which `--resume auto` finds it by (a changed
    trainer.name was accepted, ignored, and recorded in config.toml)."""
    changed = changed_values(saved, resumed)
    moved = [key for key in WHERE_A_RUN_GOES if key in changed] if in_place else []
    if moved:
        raise ConfigError(f"{where}: the run goes on in its own directory, so {moved[0]} cannot change (drop that "
                          "--set)")
    may = [key for key in RESUMABLE if not (in_place and key in WHERE_A_RUN_GOES)]
    if saved.train.lr_schedule == "warmup_cosine" and "train.m_max" in changed:
        # the ramp and the cosine run over a network's steps in the whole plan: another m_max reshapes the lr of
        # the epochs already trained, so the run would match neither plan while config.toml named the new one
        was, now = changed["train.m_max"]
        raise ConfigError(f"{where}: train.m_max ({was} -> {now}) sets train.lr_schedule = warmup_cosine's "
                          "schedule, which the epochs trained followed: keep it (start a new run for another)")
    fixed = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if fixed:
        first, (was, now) = next(iter(fixed.items()))
        raise ConfigError(
            f"{where}: a resumed run keeps its settings, but {', '.join(fixed)} would change "
            f"({first}: {was!r} -> {now!r}); only {', '.join(may)} may (start a new run for another setting)")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written next to the results; loadable with --config)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def _config_from_dict(cls, doc: dict, saved: bool = False) -> Config:
    """Inverse of `Config.to_dict` (how the resolved config travels to Ray workers); validated (`saved`: as a
    run's own config, `validate`)."""
    cfg = cls()
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config dict: {section!r} must map to a section table")
        for key, value in table.items():
            _apply(cfg, section, key, value, "config dict")
    return cfg.validate(saved)


Config.from_dict = classmethod(_config_from_dict)
