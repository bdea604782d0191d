"""bench/recbole_peer.py: bad input refused in one line, exit 2, before it builds its venv or trains; the item
features it derives from the text (FDSA, S3-Rec); a killed run resumes to the uninterrupted run's result."""
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from alterrec_dist.common.config import PROJECT_ROOT


def peer(*args, tmp):
    out = tmp / "out"
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench/recbole_peer.py"), *args, "--seed", "0",
                        "--out", str(out)], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    return r, out


def test_unisrec_needs_its_code_and_the_projects_features(tmp_path, shared_data):
    data = ["--data", str(shared_data / "scientific")]
    r, out = peer("--model", "UniSRec", *data, tmp=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--unisrec-src None: not a checkout" in r.stderr
    src = tmp_path / "UniSRec"
    (src / "data").mkdir(parents=True)
    (src / "unisrec.py").write_text("")
    (src / "data" / "dataset.py").write_text("")
    r, out = peer("--model", "UniSRec", *data, "--unisrec-src", str(src), "--features", str(tmp_path), tmp=tmp_path)
    assert r.returncode == 2 and f"--features {tmp_path}: no manifest.json" in r.stderr
    (tmp_path / "manifest.json").write_text('{"num_items": 10, "source": {"kind": "recbole", "item_index_base": 0}}')
    r, out = peer("--model", "UniSRec", *data, "--unisrec-src", str(src), "--features", str(tmp_path), tmp=tmp_path)
    assert r.returncode == 2 and "not a RecBole dataset of the same 4385 items" in r.stderr
    assert not out.exists()


def test_a_missing_split_file_is_named(tmp_path):
    (tmp_path / "Scientific.train.inter").write_text("user_id:token\n")
    r, out = peer("--model", "CORE", "--data", str(tmp_path), tmp=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "lacks Scientific.valid.inter, Scientific.test.inter, Scientific.item2index" in r.stderr
    assert not out.exists()


def test_a_setting_without_a_value_is_refused(tmp_path, shared_data):
    r, out = peer("--model", "SASRec", "--data", str(shared_data / "scientific"), "--set", "hidden_size", tmp=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--set 'hidden_size': expected KEY=VALUE" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("model", ["FDSA", "S3Rec"])
def test_the_models_with_item_features_need_the_item_text(model, tmp_path, shared_data):
    for name in ["train.inter", "valid.inter", "test.inter", "item2index"]:
        (tmp_path / f"Scientific.{name}").symlink_to(shared_data / "scientific" / f"Scientific.{name}")
    r, out = peer("--model", model, "--data", str(tmp_path), tmp=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "lacks Scientific.text" in r.stderr
    assert not out.exists()


def test_s3rec_attributes_are_the_words_of_the_category_path():
    spec = importlib.util.spec_from_file_location("recbole_peer", PROJECT_ROOT / "bench/recbole_peer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # standard library only at its top level
    text = ("PORTER-CABLE 740000801 4 1/2-Inch x 10yd 80 Grit Adhesive-Backed Sanding Roll. Industrial & Scientific "
            "Abrasive & Finishing Products Manual Sanding Products Sanding Rolls. PORTER-CABLE. ")
    assert script.category_words(text) == "Abrasive & Finishing Products Manual Sanding Products Sanding Rolls".split()
    assert script.category_words("A title. A brand. ") == []
    assert script.text_words(text) == text.split()[:32]


def write_tiny_split(d):
    """A RecBole split of 30 items and 150 users in Scientific's file layout: every item appears, one
    valid and one test row per user, the training rows every prefix of the rest. Sessions mostly step
    to the next item, so there is something to learn."""
    rng = random.Random(0)
    d.mkdir()
    rows = {"train": [], "valid": [], "test": []}
    for u in range(150):
        seq = [u % 30]
        for _ in range(rng.randrange(4, 12)):
            seq.append((seq[-1] + 1) % 30 if rng.random() < 0.7 else rng.randrange(30))
        rows["train"] += [(u, seq[:t], seq[t]) for t in range(1, len(seq) - 2)]
        rows["valid"].append((u, seq[:-2], seq[-2]))
        rows["test"].append((u, seq[:-1], seq[-1]))
    for split, lines in rows.items():
        (d / f"Scientific.{split}.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n" + "".join(
            f"{u}\t{' '.join(map(str, h))}\t{i}\n" for u, h, i in lines))
    (d / "Scientific.item2index").write_text("".join(f"A{i}\t{i}\n" for i in range(30)))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL the whole run after its first validation; the same command then goes on from OUT/resume.pth and
    ends with the uninterrupted run's validation curve, best epoch and test metrics (one CPU thread: exact)."""
    data = tmp_path / "data"
    write_tiny_split(data)

    def command(out):
        return [sys.executable, str(PROJECT_ROOT / "bench/recbole_peer.py"), "--model", "SASRec", "--data", str(data),
                "--seed", "0", "--out", str(out), "--epochs", "25", "--batch-size", "64",
                "--set", "hidden_size=16", "--set", "inner_size=32", "--set", "stopping_step=30"]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(command(whole), check=True, cwd=PROJECT_ROOT, timeout=1200, capture_output=True)
    run = subprocess.Popen(command(cut), cwd=PROJECT_ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (cut / "resume.pth").exists():
        assert run.poll() is None, "the run ended before its first validation was saved"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (cut / "result.json").exists()
    subprocess.run(command(cut), check=True, cwd=PROJECT_ROOT, timeout=600, capture_output=True)
    a, b = (json.loads((d / "result.json").read_text()) for d in (whole, cut))
    assert a["resumed_at_epochs"] == [] and len(b["resumed_at_epochs"]) == 1 and 1 <= b["resumed_at_epochs"][0] < 25
    assert a["epochs_run"] == b["epochs_run"] == 25
    assert b["valid_ndcg10_by_epoch"] == a["valid_ndcg10_by_epoch"]
    assert (b["best_epoch"], b["valid"], b["test"]) == (a["best_epoch"], a["valid"], a["test"])
    assert a["test"]["hit@10"] > 0.6  # it learned (chance is 1/3), so the curves compared are not flat
    assert not (cut / "resume.pth").exists()
