"""bench/recbole_peer.py: bad input refused in one line, exit 2, before it builds its venv or trains; the item
features it derives from the text (FDSA, S3-Rec)."""
import importlib.util
import subprocess
import sys

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
