"""Typed run configuration: dataclasses, loaded from TOML, overridden by `--set a.b=c`.

Every knob has a default here, so `python -m alterrec_dist.train` with no file runs the
embedded default. The resolved config is written next to the results (`config.toml`).
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOGIT_FORMS = ("dot", "cosine")
TEXT_ADAPTERS = ("mlp", "whitening", "moe")
METHODS = ("alterrec", "alterrec_aug", "alterrec_random", "id_only", "text_only", "nfrec_sum", "nfrec_concat")


class ConfigError(Exception):
    """A config value or override that cannot be used; the message says which and why."""


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
    patience: int = 0              # stop after this many epochs past the warm-up without a better eval.metric; 0: off
    k1: int = 20                   # hard negatives are the other network's ranks k1..k2 (0-based, k2 exclusive)
    k2: int = 500
    hard_fraction: float = 1.0     # share of the k2-k1 negatives that are hard; the rest uniform random
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
    checkpoint_every: int = 0      # steps between training checkpoints (also one at each phase end); 0: none


@dataclass
class EvalConfig:
    alpha: float = 0.5             # fused score = alpha * id + (1 - alpha) * text
    alpha_sweep: list[float] = field(default_factory=list)  # extra fused kinds "fused@<a>" (sensitivity)
    metric: str = "fused/ndcg@10"  # model selection on validation: "<id|text|fused>/<metric>"
    batch_size: int = 512          # eval sessions per step over all workers
    tile_rows: int = 65_536        # item rows scored at once per shard: bounds the score tile in memory
    longtail_bins: list[int] = field(default_factory=lambda: [30, 100])  # [0,30], (30,100], (100,inf)


@dataclass
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    launcher: str = "ray"          # "ray" (TorchTrainer) or "torchrun" (GPU machines without Ray)
    storage_path: str = "runs"     # where run directories go; relative to the project root
    name: str = ""                 # run directory name; empty means <method>-<timestamp>
    max_failures: int = 2          # ray: restarts of the workers, each from the newest checkpoint; -1: no limit
    engine: str = "ddp"            # dense parameters: "ddp" (all-reduce + AdamW) or "deepspeed" (README: Engines)
    precision: str = "fp32"        # dense weights: "fp32", "bf16" (deepspeed; CPU too) or "fp16" (deepspeed on GPU)
    zero_stage: int = 0            # deepspeed ZeRO: 0 replicated, 1 optimizer state, 2 + gradients partitioned


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> "Config":
        t, m, e, r = self.train, self.model, self.eval, self.trainer
        checks = [
            (t.method in METHODS, f"train.method must be one of {', '.join(METHODS)}, got {t.method!r}"),
            (m.encoder in ("mean", "transformer"), f"model.encoder must be mean or transformer, got {m.encoder!r}"),
            (t.merge in ("threshold", "allgather"), f"train.merge must be threshold or allgather, got {t.merge!r}"),
            (0 <= t.k1 < t.k2, f"need 0 <= train.k1 < train.k2, got k1={t.k1} k2={t.k2}"),
            (t.method != "alterrec_aug" or t.p < t.k1, f"augmentation needs train.p < train.k1, got p={t.p} k1={t.k1}"),
            (0.0 <= t.hard_fraction <= 1.0, "train.hard_fraction must be in [0, 1]"),
            (t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}"),
            (t.patience >= 0, f"train.patience must be >= 0, got {t.patience}"),
            (t.lr_schedule in ("constant", "warmup_cosine"),
             f"train.lr_schedule must be constant or warmup_cosine, got {t.lr_schedule!r}"),
            (0.0 <= t.lr_warmup < 1.0, f"train.lr_warmup must be in [0, 1), got {t.lr_warmup}"),
            (self.trainer.max_failures >= -1, f"trainer.max_failures must be >= -1, got {self.trainer.max_failures}"),
            (t.m_random >= 0 and t.m_gap >= 1 and t.m_max >= 1, "need m_random >= 0, m_gap >= 1, m_max >= 1"),
            (t.global_batch_size % self.trainer.num_workers == 0,
             f"train.global_batch_size={t.global_batch_size} must be divisible by trainer.num_workers={self.trainer.num_workers}"),
            (e.batch_size % self.trainer.num_workers == 0,
             f"eval.batch_size={e.batch_size} must be divisible by trainer.num_workers={self.trainer.num_workers}"),
            (all(0.0 <= a <= 1.0 for a in [e.alpha, *e.alpha_sweep]), "eval.alpha and eval.alpha_sweep must be in [0, 1]"),
            (self.trainer.launcher in ("ray", "torchrun"), "trainer.launcher must be ray or torchrun"),
            (r.engine in ("ddp", "deepspeed"), f"trainer.engine must be ddp or deepspeed, got {r.engine!r}"),
            (r.precision in ("fp32", "bf16", "fp16"), f"trainer.precision must be fp32, bf16 or fp16, got {r.precision!r}"),
            (r.precision == "fp32" or r.engine == "deepspeed",
             f"trainer.precision={r.precision} needs trainer.engine=deepspeed (the ddp engine trains in fp32)"),
            (r.precision != "fp16" or r.use_gpu, "trainer.precision=fp16 needs trainer.use_gpu=true (bf16 runs on CPU)"),
            (r.zero_stage in (0, 1, 2), f"trainer.zero_stage must be 0, 1 or 2, got {r.zero_stage}"),
            (r.zero_stage == 0 or r.engine == "deepspeed",
             f"trainer.zero_stage={r.zero_stage} needs trainer.engine=deepspeed"),
            (m.text_temperature > 0, "model.text_temperature must be > 0"),
            (m.id_temperature > 0, "model.id_temperature must be > 0"),
            (m.id_logits in LOGIT_FORMS and m.text_logits in LOGIT_FORMS,
             f"model.id_logits and model.text_logits must be dot or cosine, got {m.id_logits!r}, {m.text_logits!r}"),
            (m.id_logits == m.text_logits == "dot" or not t.method.startswith("nfrec"),
             "cosine logits apply to the separate id and text networks, not to NFRec's fused one"),
            (m.text_adapter in TEXT_ADAPTERS, f"model.text_adapter must be one of {', '.join(TEXT_ADAPTERS)}, got {m.text_adapter!r}"),
            (m.text_adapter == "mlp" or m.text_hidden == 0, "model.text_hidden applies to model.text_adapter = mlp"),
            (m.id_init in ("random", "text"), f"model.id_init must be random or text, got {m.id_init!r}"),
            (m.encoder != "transformer" or m.dim % m.heads == 0,
             f"model.dim={m.dim} must be divisible by model.heads={m.heads} for the transformer encoder"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        part, _, metric = e.metric.partition("/")
        if part not in ("id", "text", "fused") or metric not in ("hit@10", "hit@20", "ndcg@10", "ndcg@20", "mrr@20"):
            raise ConfigError(f"eval.metric must look like fused/ndcg@10, got {e.metric!r}")
        return self

    def resolve_path(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else PROJECT_ROOT / path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, where: str):
    """Convert a TOML value or an override string to the field's declared type."""
    origin = typing.get_origin(typ)
    if origin is list:
        (elem,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, elem, where) for v in value]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except ValueError:
        pass
    raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")


def _apply(cfg: Config, section: str, key: str, value, where: str) -> None:
    if section not in {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"{where}: unknown section [{section}]")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"{where}: unknown key {section}.{key}")
    setattr(sub, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict; ConfigError naming the file if it is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then each `section.key=value` override, then validation."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        doc = read_toml(path, "config")
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for item in overrides:
        name, eq, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _apply(cfg, section, key.strip(), value.strip(), f"--set {item}")
    return cfg.validate()


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


def _config_from_dict(cls, doc: dict) -> Config:
    """Inverse of `Config.to_dict` (how the resolved config travels to Ray workers); validated."""
    cfg = cls()
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config dict: {section!r} must map to a section table")
        for key, value in table.items():
            _apply(cfg, section, key, value, "config dict")
    return cfg.validate()


Config.from_dict = classmethod(_config_from_dict)
