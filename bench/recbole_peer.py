#!/usr/bin/env python3
"""Peer baselines on the exact Scientific split, each from its own public code, in its own venv:
RecBole's SASRec, CORE, BERT4Rec, SR-GNN, FDSA (the item text's words as its feature) and S3-Rec (the
category path's words as its attributes, pre-trained then fine-tuned), and UniSRec (github RUCAIBox/UniSRec,
built on RecBole) trained from scratch in its transductive (ID + text) mode on the project's MiniLM item
features.

    python3 bench/recbole_peer.py --model SASRec --seed 0 --out runs/peers/scientific/SASRec-s0 \
        [--data ../shared/data/scientific] [--epochs 50] [--max-minutes 60]
    python3 bench/recbole_peer.py --model UniSRec --unisrec-src ../peers/UniSRec --features data/scientific \
        --seed 0 --out runs/peers/scientific/UniSRec-s0

Another dataset in the project's layout runs the same way once `python -m bench.recbole_files` has written it
as RecBole's files (the ID-only models: SASRec, CORE, BERT4Rec, SR-GNN), e.g. a synthetic proxy for data we
do not have.

RecBole is never a project dependency: this script (standard library only at top level) creates
`.venv-recbole/` in the repository root on first use (torch==2.13.0 first, the CPU wheel on disk,
then recbole==1.2.1 with pinned, compatible numpy/scipy/pandas), writes the RecBole config into
OUT, runs RecBole in that venv (this same file, `--_drive`, as a subprocess on one CPU thread),
and writes OUT/result.json atomically. An existing OUT/result.json is left alone (exit 0), so an
experiment runner can resume a grid; a run that was stopped half-way goes on from OUT/resume.pth, the
training state after its last validation (RecBole keeps only the best epoch's weights, which cannot
resume an interrupted run: SASRec at d = 300 takes hours here). See bench/PEER.md.

The dataset is read through RecBole's pre-split route (`benchmark_filename: [train, valid,
test]`, `item_id_list` loaded from the files, `alias_of_item_id: [item_id_list]`), so the split is
used exactly as given; the driver asserts item and user counts against the data files.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-recbole"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "scientific"
RECBOLE_VERSION = "1.2.1"
TORCH_PIN = "torch==2.13.0"  # exact pin: the CPU wheel on disk; anything looser pulls CUDA wheels
# recbole==1.2.1 is installed --no-deps with this explicit set. Left out on purpose: ray (only
# recbole.quick_start imports it; the driver below does not use quick_start) and plotly (only the
# hyper-parameter tuner). numpy < 2: recbole's Config sets np.float = np.float_ etc., which numpy 2
# removed; scipy/pandas/scikit-learn are the last releases built for numpy 1.26.
DEPS = [
    "numpy==1.26.4",
    "scipy==1.13.1",
    "pandas==2.2.3",
    "scikit-learn==1.5.2",
    "colorlog==4.7.2",  # recbole's own exact pins
    "colorama==0.4.4",
    "tqdm==4.67.1",
    "pyyaml==6.0.2",
    "tensorboard==2.18.0",  # recbole.utils imports torch.utils.tensorboard at top level
    "setuptools==80.10.2",
    "texttable==1.7.0",
    "tabulate==0.9.0",
    "psutil==6.1.1",
    "thop==0.1.1.post2209072238",
]
SETUP_STAMP = json.dumps({"torch": TORCH_PIN, "recbole": RECBOLE_VERSION, "deps": DEPS})
MODELS = ("SASRec", "CORE", "BERT4Rec", "SRGNN", "UniSRec", "FDSA", "S3Rec")
UNISREC_COMMIT = "05aa5cba2809112c32808f70d16abc61c05c6538"  # github RUCAIBox/UniSRec, the code that was run
# UniSRec's props/UniSRec.yaml + props/finetune.yaml at that commit, as its `finetune.py -d Scientific`
# (no -p: from scratch) reads them; only the text width differs: MiniLM rows are 384 wide, not BERT's 768.
UNISREC_PROPS = {
    "n_layers": 2, "n_heads": 2, "hidden_size": 300, "inner_size": 256,
    "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "initializer_range": 0.02, "loss_type": "CE",
    "item_drop_ratio": 0.2, "item_drop_coefficient": 0.9, "lambda": 1e-3,
    "plm_suffix": "feat1CLS", "plm_suffix_aug": "feat2CLS", "train_stage": "transductive_ft",
    "adaptor_dropout_prob": 0.2, "temperature": 0.07, "n_exps": 8,
    "unisrec_transform": None,
    "stopping_step": 10, "epochs": 300, "train_batch_size": 2048,  # RecBole's defaults, which UniSRec keeps
}
# FDSA's item feature: the first words of each item's text (Scientific.text) as a token_seq. RecBole's
# FeatureSeqEmbLayer embeds every word of every history item per batch (batch x 50 x words x 64): at all
# 142 words and batch 2048 that was 15 GB RSS and 60-100 s a batch here (bench/PEER.md). Cut to 32 words
# (the mean is 26) and at the peers' batch of 512 it fits beside the project's runs.
TEXT_WORDS = 32
# S3-Rec's item attributes: the words of the category path most item texts carry ("<title>. Industrial &
# Scientific <path>. <brand>. ", 4,251 of 4,385 items). Its pre-training builds a batch x 50 x attributes
# multi-hot in Python lists every batch, so the text's 16k words (410M elements at 512) are out of reach.
CATEGORY_ROOT = "Industrial & Scientific"


def text_words(text: str) -> list[str]:
    return text.split()[:TEXT_WORDS]


def category_words(text: str) -> list[str]:
    _, found, path = text.partition(CATEGORY_ROOT)
    return path.split(". ")[0].split() if found else []


ITEM_FEATURE = {"FDSA": ("text", text_words), "S3Rec": ("category", category_words)}  # model -> (field, words)
METRICS = ("hit@10", "hit@20", "ndcg@10", "ndcg@20", "mrr@20")
CATALOG = "item"  # <name>.item with an item_id column alone: every item, also those no row names
RESUME = "resume.pth"  # in OUT: the training state after the last validation, while the run is unfinished
SPLITS = ("train", "valid", "test")


class Fail(Exception):
    """The run failed (exit 1)."""


class BadInput(Fail):
    """What the user gave is wrong (exit 2), found before the venv or any training."""


# ----------------------------------------------------------------------------------------- venv
def ensure_venv(log=print) -> Path:
    """Create/complete .venv-recbole (under a file lock: runners may start seeds in parallel)."""
    py = VENV / "bin" / "python"
    stamp = VENV / ".recbole_peer_setup.json"
    VENV.mkdir(exist_ok=True)
    with open(VENV / ".setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if py.exists() and stamp.exists() and stamp.read_text() == SETUP_STAMP:
            return py
        if sys.version_info[:2] != (3, 11):  # the on-disk torch wheel is cp311; others mean CUDA GBs
            raise Fail(f"creating {VENV} needs python3.11 (the torch 2.13.0 CPU wheel), "
                       f"not {sys.version.split()[0]}")
        log(f"recbole_peer: setting up {VENV} (once) ...")
        steps = [
            [sys.executable, "-m", "venv", str(VENV)],
            [str(py), "-m", "pip", "install", "-q", TORCH_PIN],
            [str(py), "-m", "pip", "install", "-q", "--no-deps", f"recbole=={RECBOLE_VERSION}"],
            [str(py), "-m", "pip", "install", "-q", TORCH_PIN, *DEPS],  # torch again: never replaced
        ]
        for cmd in steps:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                tail = (r.stdout or "").strip().splitlines()[-1:] or ["?"]
                raise Fail(f"venv setup failed at `{shlex.join(cmd)}`: {tail[0]}")
        stamp.write_text(SETUP_STAMP)
    return py


# ----------------------------------------------------------------------------------------- data
def count_rows(path: Path) -> int:
    with open(path) as f:
        return sum(1 for _ in f) - 1  # header


def dataset_name(data: Path) -> str:
    """The files' prefix (Scientific for ../shared/data/scientific), which RecBole takes as the dataset's name."""
    names = sorted(p.name.removesuffix(".train.inter") for p in data.glob("*.train.inter"))
    if len(names) != 1:
        raise BadInput(f"data dir {data} needs one <name>.train.inter, has {len(names)}")
    return names[0]


def check_data(data: Path, model: str) -> dict:
    """What the driver checks RecBole's dataset against: the name, the item count, the rows per split, and
    whether a catalog file (<name>.item, item_id alone: bench/recbole_files.py writes one) lists the items."""
    if not data.is_dir():
        raise BadInput(f"data dir not found: {data}")
    name = dataset_name(data)
    need = [f"{name}.{s}.inter" for s in SPLITS] + [f"{name}.item2index"]
    need += [f"{name}.text"] if model in ITEM_FEATURE else []
    missing = [n for n in need if not (data / n).is_file()]
    if missing:
        raise BadInput(f"data dir {data} lacks {', '.join(missing)}")
    with open(data / f"{name}.item2index") as f:
        n_items = sum(1 for line in f if line.strip())
    return {
        "name": name,
        "items": n_items,
        "rows": {s: count_rows(data / f"{name}.{s}.inter") for s in SPLITS},
        "catalog": model not in ITEM_FEATURE and (data / f"{name}.{CATALOG}").is_file(),
    }


def stage_dataset(data: Path, stage: Path, model: str, expect: dict) -> None:
    """RecBole reads DATA_PATH/<dataset>/<dataset>.<suffix>: link the files (no copies), the catalog file
    too where there is one; FDSA and S3-Rec get their item feature from the text instead, as the .item file."""
    name = expect["name"]
    d = stage / name
    d.mkdir(parents=True, exist_ok=True)
    files = [f"{name}.{s}.inter" for s in SPLITS] + ([f"{name}.{CATALOG}"] if expect["catalog"] else [])
    for file in files:
        (d / file).symlink_to(data / file)
    if model in ITEM_FEATURE:
        write_item_feature(data, name, d / f"{name}.item", *ITEM_FEATURE[model])


def write_item_feature(data: Path, name: str, path: Path, field: str, words) -> None:
    """`field`: the words `words` finds in each item's <name>.text (keyed by ASIN), re-keyed through
    item2index into the .inter files' item tokens."""
    with open(data / f"{name}.item2index") as f:
        index = dict(line.rstrip("\n").split("\t") for line in f if line.strip())
    rows = {}
    with open(data / f"{name}.text") as f:
        next(f)
        for line in f:
            asin, _, text = line.rstrip("\n").partition("\t")
            if asin in index:
                rows[index[asin]] = " ".join(words(text))
    if len(rows) != len(index):
        raise BadInput(f"{data / (name + '.text')}: text for {len(rows)} of the {len(index)} items")
    path.write_text(f"item_id:token\t{field}:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in rows.items()))


def parse_sets(sets: list[str]) -> dict:
    """--set KEY=VALUE pairs: VALUE read as JSON (0.2, [1, 2], true), else kept as a string."""
    out = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise BadInput(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def unisrec_inputs(src: Path | None, features: Path, items: int) -> dict:
    """Where UniSRec's code and its item text features come from, checked before any training.
    The features are the project's own MiniLM rows (row i = item index i of the RecBole files)."""
    if src is None or not (src / "unisrec.py").is_file() or not (src / "data" / "dataset.py").is_file():
        raise BadInput(f"--unisrec-src {src}: not a checkout of github RUCAIBox/UniSRec "
                       "(no unisrec.py, data/dataset.py)")
    manifest = features / "manifest.json"
    if not manifest.is_file():
        raise BadInput(f"--features {features}: no manifest.json "
                       "(make it with `python -m alterrec_dist.prepare recbole`)")
    m = json.loads(manifest.read_text())
    text, source = m.get("text") or {}, m.get("source") or {}
    if m.get("num_items") != items or source.get("kind") != "recbole" or source.get("item_index_base") != 0:
        raise BadInput(f"{manifest}: not a RecBole dataset of the same {items} items indexed from 0")
    if text.get("num_with_text") != items:
        raise BadInput(f"{manifest}: {text.get('num_with_text')} of {items} items have text features")
    return {"unisrec_src": str(src.resolve()), "unisrec_code_sha256": {
                f: hashlib.sha256((src / f).read_bytes()).hexdigest() for f in ("unisrec.py", "data/dataset.py")},
            "features": str(features.resolve()), "text_model": text.get("model"), "plm_size": text["dim"],
            "feature_parts": [str((features / part["file"]).resolve()) for part in text["files"]]}


# RecBole's SASRec defaults, spelled out so result.json records them (the other RecBole models take
# their defaults from RecBole's own properties/model/<Model>.yaml, which the run's log records).
SASREC_DEFAULTS = {
    "n_layers": 2,
    "n_heads": 2,
    "hidden_size": 64,
    "inner_size": 256,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
}


def recbole_config(model: str, seed: int, epochs: int | None, batch_size: int | None, stage: Path, out: Path,
                   catalog: bool, plm_size: int = 0) -> dict:
    """The whole RecBole config of one run: shared data/eval settings, then the model's own;
    `epochs`/`batch_size` None keep the model's default here."""
    cfg = {
        # data: the pre-split atomic files, used as given
        "data_path": str(stage),
        "benchmark_filename": list(SPLITS),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "LIST_SUFFIX": "_list",
        "MAX_ITEM_LIST_LENGTH": 50,
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "alias_of_item_id": ["item_id_list"],  # history tokens share the item_id index space
        # training
        "seed": seed,
        "reproducibility": True,
        "epochs": 50,
        # RecBole's default is 2048 = 17 steps/epoch here: after 4 epochs SASRec's CE loss was still
        # 7.9 (ln 4386 = 8.4) and valid NDCG@10 0.021, hopeless inside 50 epochs; 512 (the
        # project's own global batch) gives 67 steps/epoch at the same cost per epoch.
        "train_batch_size": 512,
        "learning_rate": 0.001,
        "stopping_step": 10,
        "train_neg_sample_args": None,  # CE loss over all items
        "checkpoint_dir": str(out / "saved"),
        # evaluation: full ranking, every epoch, select on validation NDCG@10
        "eval_args": {"group_by": "user", "order": "TO", "split": {"LS": "valid_and_test"}, "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10, 20],
        "valid_metric": "NDCG@10",
        "eval_step": 1,
        "eval_batch_size": 4096,
        "metric_decimal_place": 6,
        "show_progress": False,
        "save_dataset": False,
        "save_dataloaders": False,
        "log_wandb": False,
    }
    if catalog:  # the catalog is every item listed, not only those the rows name
        cfg["load_col"]["item"] = ["item_id"]
    if model == "SASRec":
        cfg.update(SASREC_DEFAULTS)
    if model in ITEM_FEATURE:  # RecBole's defaults name a 'class' field, which this split lacks
        field = ITEM_FEATURE[model][0]
        cfg["load_col"]["item"] = ["item_id", field]
        if model == "FDSA":
            cfg["selected_features"] = [field]
        else:  # S3-Rec: the run's own stage is fine-tuning (RecBole's default is pretrain; see pretrain_s3rec)
            cfg["item_attribute"] = field
            cfg["train_stage"] = "finetune"
    if model == "UniSRec":
        cfg.update(UNISREC_PROPS, plm_size=plm_size, adaptor_layers=[plm_size, UNISREC_PROPS["hidden_size"]])
    if epochs:
        cfg["epochs"] = epochs
    if batch_size:
        cfg["train_batch_size"] = batch_size
    return cfg


def write_yaml(cfg: dict, path: Path) -> None:
    """Flow-style values are JSON, which YAML reads as is (no PyYAML needed out here)."""
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))


def atomic_write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".result.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, help="epoch ceiling (default: 50; UniSRec: its code's 300)")
    ap.add_argument("--batch-size", type=int,
                    help="train_batch_size (default: 512, see bench/PEER.md; UniSRec: its code's 2048)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop training after the first validation past this many minutes of the run's CPU time "
                         "(one thread: a busy machine does not shorten it), then test the best-valid checkpoint "
                         "(S3Rec: pre-training stops at half of it); 0: no cap")
    ap.add_argument("--unisrec-src", type=Path, help=f"UniSRec: a checkout of github RUCAIBox/UniSRec "
                                                     f"(run at {UNISREC_COMMIT[:7]})")
    ap.add_argument("--features", type=Path, default=REPO / "data" / "scientific",
                    help="UniSRec: the project's prepared dataset whose MiniLM text features it is fed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a RecBole config value over the model's (VALUE as JSON, else a string), e.g. "
                         "hidden_dropout_prob=0.2; repeatable (a grid's peer sweeps tune with these)")
    a = ap.parse_args(argv)
    command = shlex.join(["python3", *sys.argv])
    out = a.out.resolve()
    if (out / "result.json").exists():
        print(f"recbole_peer: {out / 'result.json'} exists, nothing to do")
        return 0
    try:
        data = a.data.resolve()
        expect = check_data(data, a.model)
        overrides = parse_sets(a.set)
        extra = {"max_minutes": a.max_minutes}
        if a.model == "UniSRec":
            extra.update(unisrec_inputs(a.unisrec_src, a.features, expect["items"]))
        py = ensure_venv()
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".dataset-", dir=out))
        try:
            stage_dataset(data, stage, a.model, expect)
            cfg = recbole_config(a.model, a.seed, a.epochs, a.batch_size, stage, out, expect["catalog"],
                                 extra.get("plm_size", 0))
            cfg.update(overrides)
            write_yaml(cfg, out / "recbole.yaml")
            # what a saved training state must match to be resumed: everything but the staging dir
            extra["fingerprint"] = hashlib.sha256(json.dumps(
                [a.model, {k: v for k, v in cfg.items() if k != "data_path"}, expect,
                 {k: v for k, v in extra.items() if k != "feature_parts"}], sort_keys=True).encode()).hexdigest()
            drv_out = out / "driver_result.json"
            drv_out.unlink(missing_ok=True)
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                       # keep torch's large activation buffers in the heap instead of fresh
                       # mmap + page faults every step (cut system time ~3x on this CPU)
                       MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="8589934592",
                       MALLOC_TOP_PAD_="1073741824")
            env.pop("PYTHONPATH", None)  # nothing of the project's venv leaks in
            cmd = [str(py), str(Path(__file__).resolve()), "--_drive", str(out / "recbole.yaml"),
                   a.model, str(drv_out), json.dumps(expect), json.dumps(extra)]
            start = time.time()
            with open(out / "recbole.log", "a" if (out / RESUME).exists() else "w") as log:
                r = subprocess.run(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
            seconds = time.time() - start
            if r.returncode != 0 or not drv_out.exists():
                lines = [l for l in (out / "recbole.log").read_text().splitlines() if l.strip()]
                raise Fail(f"RecBole run failed (exit {r.returncode}): "
                           f"{lines[-1] if lines else 'no output'} (see {out / 'recbole.log'})")
            drv = json.loads(drv_out.read_text())
            seconds += drv["seconds_before"]  # the earlier, interrupted attempts' share
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        cfg["data_path"] = str(data)  # the real files the staged links pointed at
        result = {
            "model": a.model,
            "seed": a.seed,
            "command": command,
            "recbole_version": drv["recbole_version"],
            "config": cfg,
            "best_epoch": drv["best_epoch"],
            "valid": drv["valid"],
            "test": drv["test"],
            "seconds": round(seconds, 1),
            "dataset_stats": drv["stats"],
            "torch_version": drv["torch_version"],
            "epochs_run": drv["epochs_run"],
            "stopped_by": drv["stopped_by"],
            "inputs": {k: v for k, v in extra.items() if k != "feature_parts"},
            "valid_ndcg10_by_epoch": drv["valid_curve"],
            "resumed_at_epochs": drv["resumed_at_epochs"],
        }
        atomic_write_json(out / "result.json", result)
        (out / RESUME).unlink(missing_ok=True)  # done: the best epoch's weights stay in OUT/saved
    except Fail as e:
        print(f"recbole_peer: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, BadInput) else 1
    t, v = result["test"], result["valid"]
    print(f"recbole_peer: {a.model} seed {a.seed}: best epoch {result['best_epoch']}, "
          f"valid ndcg@10 {v['ndcg@10']:.4f}, test hit@10 {t['hit@10']:.4f} ndcg@10 {t['ndcg@10']:.4f} "
          f"({seconds:.0f} s) -> {out / 'result.json'}")
    return 0


# --------------------------------------------------------------------- driver (inside the venv)
class TimeCap(Exception):
    """Raised after a validation once --max-minutes of CPU time have passed (the best checkpoint is saved by then)."""


def write_plm_features(parts: list[str], dim: int, path: Path) -> None:
    """UniSRec reads <dataset>.feat1CLS as raw float32 rows in item-index order."""
    import numpy as np

    rows = np.concatenate([np.load(part).astype(np.float32) for part in parts])
    assert rows.shape[1] == dim, f"text features are {rows.shape[1]} wide, manifest says {dim}"
    rows.tofile(path)


def pretrain_s3rec(cfg_path: str, dataset: str, train_data, until: float | None, logger) -> str:
    """S3-Rec's first stage, its four self-supervised losses on the training sessions (RecBole's own trainer,
    a checkpoint every epoch), stopped before an epoch that would start past `until` (process time; None:
    RecBole's pretrain_epochs). Returns the last checkpoint, which the fine-tuning stage loads."""
    from recbole.config import Config
    from recbole.utils import get_model, get_trainer, init_seed

    config = Config(model="S3Rec", dataset=dataset, config_file_list=[cfg_path],
                    config_dict={"train_stage": "pretrain", "save_step": 1})
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("S3Rec")(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "S3Rec")(config, model)
    train_epoch = trainer._train_epoch

    def capped_epoch(*args, **kwargs):
        if until is not None and trainer.saved_model_file and time.process_time() > until:
            raise TimeCap
        return train_epoch(*args, **kwargs)

    trainer._train_epoch, trainer.saved_model_file = capped_epoch, None
    try:
        trainer.fit(train_data, show_progress=False)
    except TimeCap:
        logger.info(f"pre-training stopped by the time cap; fine-tuning from {trainer.saved_model_file}")
    return trainer.saved_model_file


def write_best_model_atomically(trainer) -> None:
    """RecBole overwrites its best-epoch file in place; a kill mid-write would leave the resumed run a torn one."""
    save = trainer._save_checkpoint

    def atomic(epoch, verbose=True, **kwargs):
        path = kwargs.pop("saved_model_file", trainer.saved_model_file)
        save(epoch, verbose=verbose, saved_model_file=path + ".tmp", **kwargs)
        os.replace(path + ".tmp", path)

    trainer._save_checkpoint = atomic


def save_training_state(trainer, train_data, epoch: int, extra: dict) -> None:
    """OUT/resume.pth after each validation: what RecBole's fit loop carries from one epoch to the next,
    the random streams included (dropout, the loader's shuffle, numpy's samplers), so that a resumed run
    trains exactly as an uninterrupted one would."""
    import random

    import numpy as np
    import torch

    state = {**extra, "next_epoch": epoch + 1, "cur_step": trainer.cur_step,
             "best_valid_score": trainer.best_valid_score, "best_valid_result": trainer.best_valid_result,
             "saved_model_file": trainer.saved_model_file, "model": trainer.model.state_dict(),
             "other_parameter": trainer.model.other_parameter(), "optimizer": trainer.optimizer.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                     "loader": train_data.generator.get_state()}}
    torch.save(state, RESUME + ".tmp")
    os.replace(RESUME + ".tmp", RESUME)


def read_training_state(fingerprint: str, logger) -> dict | None:
    """The state an interrupted attempt of this same run left, or None (then the run starts afresh)."""
    import torch

    if not Path(RESUME).exists():
        return None
    state = torch.load(RESUME, weights_only=False)
    if state["fingerprint"] != fingerprint:
        logger.info(f"{RESUME} is from another configuration: starting afresh")
        return None
    return state


def restore_training_state(state: dict, trainer, train_data, logger) -> tuple[list, list, bool]:
    import random

    import numpy as np
    import torch

    trainer.model.load_state_dict(state["model"])
    trainer.model.load_other_parameter(state["other_parameter"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.start_epoch, trainer.cur_step = state["next_epoch"], state["cur_step"]
    trainer.best_valid_score, trainer.best_valid_result = state["best_valid_score"], state["best_valid_result"]
    trainer.saved_model_file = state["saved_model_file"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    train_data.generator.set_state(rng["loader"])
    logger.info(f"resumed from {RESUME}: epoch {state['next_epoch']}, best valid so far {state['best_valid_score']}")
    return state["curve"], state["resumed_at_epochs"] + [state["next_epoch"]], state["capped"]


def drive(cfg_path: str, model_name: str, out_json: str, expect_json: str, extra_json: str) -> None:
    """Runs under .venv-recbole's python with cwd = OUT (RecBole writes ./log, ./log_tensorboard)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import logging

    import numpy as np
    import torch

    torch.set_num_threads(1)
    # Patch 1: torch >= 2.6 defaults torch.load(weights_only=True); RecBole's own checkpoint holds
    # its Config object, so load_best_model would fail. The file is the one this run just wrote.
    _torch_load = torch.load

    def _load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return _torch_load(*args, **kwargs)

    torch.load = _load

    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    expect, extra = json.loads(expect_json), json.loads(extra_json)
    if model_name == "UniSRec":  # its own code, imported from the checkout; RecBole does the rest
        sys.path.insert(0, extra["unisrec_src"])
        from data.dataset import UniSRecDataset
        from unisrec import UniSRec

        model_class, make_dataset = UniSRec, UniSRecDataset
    else:
        model_class, make_dataset = get_model(model_name), create_dataset
    config = Config(model=model_class, dataset=expect["name"], config_file_list=[cfg_path])
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = logging.getLogger()
    logger.info(config)
    if model_name == "UniSRec":
        write_plm_features(extra["feature_parts"], config["plm_size"],
                           Path(config["data_path"]) / f"{expect['name']}.{config['plm_suffix']}")
    dataset = make_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    # The split must be the one given: every item, every row, one valid/test row per user.
    iid, uid = dataset.iid_field, dataset.uid_field
    tokens = list(dataset.field2id_token[iid][1:])
    parts = {"train": train_data, "valid": valid_data, "test": test_data}
    stats = {
        "item_num_with_padding": int(dataset.item_num),
        "rows": {k: int(d._dataset.inter_num) for k, d in parts.items()},
        "users": {k: int(len(np.unique(d._dataset.inter_feat[uid].numpy()))) for k, d in parts.items()},
    }
    checks = [
        (stats["item_num_with_padding"] == expect["items"] + 1,
         f"item_num {stats['item_num_with_padding']} != {expect['items']} + padding"),
        (sorted(tokens, key=int) == [str(i) for i in range(expect["items"])],
         "item tokens are not exactly 0..N-1 of item2index"),
        (stats["rows"] == expect["rows"], f"rows {stats['rows']} != files {expect['rows']}"),
        (stats["users"]["valid"] == expect["rows"]["valid"] and stats["users"]["test"] == expect["rows"]["test"],
         f"valid/test users {stats['users']} != one row per user {expect['rows']}"),
        (dataset.item_id_list_field == "item_id_list", "item_id_list not taken from the files"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"split check failed: {msg}")
    logger.info(f"split check ok: {stats}")

    state = read_training_state(extra["fingerprint"], logger)
    wall_start = time.time() - (state["wall_seconds"] if state else 0)
    # the cap counts the CPU time of every attempt; S3-Rec's pre-training ran in the first
    start, cap = time.process_time() - (state["cpu_seconds"] if state else 0), extra["max_minutes"] * 60
    if model_name == "S3Rec":  # fine-tuning starts from the pre-trained weights
        pretrained = state["pre_model_path"] if state else pretrain_s3rec(
            cfg_path, expect["name"], train_data, start + cap / 2 if cap else None, logger)
        config["pre_model_path"] = pretrained
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(config["device"])
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    write_best_model_atomically(trainer)
    curve, resumed_at, capped = [], [], False
    if state:
        curve, resumed_at, capped = restore_training_state(state, trainer, train_data, logger)

    def after_validation(epoch, score):
        nonlocal capped
        curve.append((epoch, float(score)))
        capped = bool(cap) and time.process_time() - start > cap
        save_training_state(trainer, train_data, epoch, {
            "fingerprint": extra["fingerprint"], "curve": curve, "resumed_at_epochs": resumed_at,
            "capped": capped, "cpu_seconds": time.process_time() - start, "wall_seconds": time.time() - wall_start,
            "pre_model_path": config["pre_model_path"] if model_name == "S3Rec" else None})
        if capped:
            raise TimeCap

    stopped_by = "early stopping or the epoch ceiling"
    if not capped and trainer.start_epoch < trainer.epochs and trainer.cur_step <= trainer.stopping_step:
        try:
            trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=after_validation)
        except TimeCap:
            pass
    if capped:
        stopped_by = f"the time cap ({extra['max_minutes']:g} CPU min) after {len(curve)} epochs"
        logger.info(f"stopped by {stopped_by}")
    if model_name == "S3Rec":
        stopped_by += f" of fine-tuning from {Path(pretrained).name}"
    best_valid = trainer.best_valid_result
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    logger.info(f"best valid: {best_valid}")
    logger.info(f"test result: {test}")
    # RecBole keeps the first epoch reaching the best score (early_stopping updates on '>').
    best_epoch = max(curve, key=lambda es: (es[1], -es[0]))[0] if curve else None
    res = {
        "recbole_version": recbole.__version__,
        "torch_version": torch.__version__,
        "best_epoch": best_epoch,
        "epochs_run": len(curve),
        "stopped_by": stopped_by,
        "valid_curve": [round(s, 6) for _, s in curve],
        "resumed_at_epochs": resumed_at,
        "seconds_before": round(state["wall_seconds"], 1) if state else 0.0,
        "valid": {k: float(best_valid[k]) for k in METRICS},
        "test": {k: float(test[k]) for k in METRICS},
        "stats": stats,
    }
    Path(out_json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_drive":
        drive(*sys.argv[2:7])
        sys.exit(0)
    sys.exit(main())
