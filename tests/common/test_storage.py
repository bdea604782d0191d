"""Object-store paths (common/storage.py) and the commit rule of files.py, against a real S3 server on
127.0.0.1 (moto's; tests/object_store.py). The whole pipeline in a store: tests/e2e/test_object_store.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alterrec_dist.common import storage
from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.config import load_config
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import (Staged, atomic_write_json, check_file_out, check_out, file_sha256, read_json,
                                        read_manifest)
from alterrec_dist.common.storage import StorePath, files_under, location
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.synth import main as synth_main
from tests.commands import run_command
from tests.tiny_data import V, tiny_dataset


def test_location_tells_uris_from_local_paths(tmp_path):
    assert location("s3://b/runs//x/") == StorePath("s3://b/runs/x")
    assert str(location("gs://b/d")) == "gs://b/d" and location("s3://b/d").name == "d"
    assert location("s3://b/d/e").parent == StorePath("s3://b/d") and location("s3://b/d") / "f" == location("s3://b/d/f")
    assert location(tmp_path / "x") == tmp_path / "x" and isinstance(location("relative/s3:"), Path)
    with pytest.raises(ValueError, match="hdfs://nn/x: unsupported URI scheme"):
        location("hdfs://nn/x")
    with pytest.raises(ValueError, match=r"s3://b/x/\.\./d: '\.\.' in an object key"):
        location("s3://b/x/../d")  # the client would write s3://b/d, then list nothing under s3://b/x/../d
    with pytest.raises(DataError, match=r"^s3://bad bucket: not a bucket the store client accepts \(.*\)$"):
        check_out("s3://bad bucket/d", overwrite=False)  # was pyarrow's ArrowInvalid traceback
    with pytest.raises(ConfigError, match="unsupported URI scheme"):
        load_config(None, ["data.path=azure://c/x"]).resolve_path("azure://c/x")
    # a slash short wrote a local folder named s3:; a third slash made the key's first part the bucket; a --config
    # URI with another scheme was a ValueError traceback (review findings)
    with pytest.raises(ValueError, match=r"s3:/b/d: not a store URI \(s3://BUCKET/KEY\) nor a local path"):
        location("s3:/b/d")
    with pytest.raises(ValueError, match="s3:///b/d: not a store URI with a bucket"):
        location("s3:///b/d")
    assert location("s3") == Path("s3") and location("gs/x") == Path("gs/x")  # local folders of those names
    with pytest.raises(ConfigError, match="gcs://b/c.toml: unsupported URI scheme"):
        load_config("gcs://b/c.toml")


@pytest.mark.parametrize("module, argv, shown", [
    ("train", ["--set", "data.path={uri}/data"], "data"),
    ("train", ["--set", "trainer.storage_path={uri}/runs", "--out", "{tmp}/run"], "runs"),  # unused, still written
    ("train", ["--out", "{uri}/runs/r"], "runs/r"),
    ("synth", ["--items", "20", "--sessions", "50", "--out", "{uri}/d"], "d"),
    ("recommend", ["--export", "{uri}/e", "--session", "a"], "e"),
])
def test_credentials_in_a_store_uri_are_refused_unprinted(tmp_path, capsys, no_ray, module, argv, shown):
    """pyarrow reads s3://KEY:SECRET@bucket as credentials. Each command failed later, on the store, with the secret
    in its one line; a run wrote them into its config.toml (and MLflow's parameters), trainer.storage_path even
    where --out left it unused. AWS secret keys hold / (so the @ may come parts after the bucket's place)."""
    uri = "s3://AKIAEXAMPLE:wJal/rX@t/secret@bucket"
    code, err = run_command(module, [a.format(uri=uri, tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and err.strip() == (f"error: s3://***@bucket/{shown}: credentials in a store URI are refused "
                                         "(URIs are written into configs and printed): set them in the environment "
                                         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"), err
    assert "wJal" not in err and "secret" not in err.replace("SECRET_ACCESS", "")
    assert list(tmp_path.iterdir()) == []  # the run directory --out named was not made


def test_objects_round_trip_and_list(bucket):
    d = StorePath(f"{bucket}/d")
    assert not d.exists() and not d.is_dir()
    (d / "a.json").write_bytes(b'{"x": 1}')
    (d / "sub" / "b.bin").write_bytes(b"\0" * 10)
    assert d.is_dir() and (d / "a.json").is_file() and not (d / "sub").is_file()
    assert sorted(p.name for p in d.iterdir()) == ["a.json", "sub"]
    assert files_under(d) == ["a.json", "sub/b.bin"] and storage.size_of(d / "sub" / "b.bin") == 10
    assert read_json(d / "a.json") == {"x": 1}
    assert file_sha256(d / "a.json") == file_sha256_of(b'{"x": 1}')
    with pytest.raises(DataError, match=r"/d/missing.json: missing"):
        read_json(d / "missing.json")
    d.remove_tree()
    assert not d.exists() and list(StorePath(bucket).iterdir()) == []  # no directory marker left behind


def file_sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_staged_directory_commits_by_its_manifest_last(bucket, tmp_path, monkeypatch):
    out = StorePath(f"{bucket}/out")
    with Staged(out) as staged:
        staged.tmp.mkdir()
        (staged.tmp / "data.npy").write_bytes(b"new")
        atomic_write_json(staged.tmp / "manifest.json", {"files": {}})
        assert not out.exists()  # nothing in the store until the commit
    assert files_under(out) == ["data.npy", "manifest.json"] and not staged.tmp.parent.exists()

    # an upload cut short: the writer dies after its first new file. The old manifest went first, and
    # the new one (always last) never came, so no reader takes the directory.
    new = tmp_path / "new"
    new.mkdir()
    for name in ("manifest.json", "a.npy", "b.npy"):
        (new / name).write_text(name)
    real_copy, copied = storage.copy_file, []

    def dies_after_one(src, dst):
        if copied:
            raise KeyboardInterrupt("killed mid-upload")
        copied.append(dst.name)
        real_copy(src, dst)
    monkeypatch.setattr(storage, "copy_file", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        storage.copy_tree(new, out)
    assert files_under(out) == ["a.npy"]
    with pytest.raises(DataError, match="out/manifest.json: no dataset"):
        read_manifest(out, "no dataset")


def test_a_staged_directory_whose_upload_is_cut_short_leaves_nothing(bucket, monkeypatch):
    """SIGTERM mid-upload (export, synth, prepare into a store) left the first objects at the final key, so a rerun
    was refused with "output exists", and the local staging directory (67 MB for an export) behind (review
    finding): both go, as on a local disk."""
    out = StorePath(f"{bucket}/export")
    real_copy, copied = storage.copy_file, []

    def dies_after_one(src, dst):
        if copied:
            raise SystemExit(143)  # what run_cli makes of SIGTERM
        copied.append(dst.name)
        real_copy(src, dst)
    monkeypatch.setattr(storage, "copy_file", dies_after_one)
    with pytest.raises(SystemExit):
        with Staged(out) as staged:
            staged.tmp.mkdir()
            for name in ("a.npy", "b.npy", "manifest.json"):
                (staged.tmp / name).write_text(name)
    assert copied == ["a.npy"] and not out.exists() and files_under(out) == []
    assert not staged.tmp.parent.exists()


def test_staged_file_is_one_upload_and_an_error_leaves_nothing(bucket):
    out = StorePath(f"{bucket}/scores.parquet")
    with pytest.raises(RuntimeError):
        with Staged(out) as staged:
            staged.tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not out.exists() and not staged.tmp.parent.exists()
    with Staged(out) as staged:
        staged.tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole"
    with pytest.raises(DataError, match="output exists"):
        check_out(out, overwrite=False)


def test_an_output_is_never_a_whole_bucket(bucket):
    """`--out s3://BUCKET --overwrite` would empty the bucket (the client deletes its objects, then refuses to
    delete the bucket): refused before anything, and no removal takes a whole bucket."""
    keep = StorePath(f"{bucket}/precious/model.bin")
    keep.write_bytes(b"keep")
    with pytest.raises(DataError, match=rf"^{bucket}: an output goes under a key in the bucket"):
        check_out(bucket, overwrite=True)
    with pytest.raises(DataError, match="a whole bucket"):
        StorePath(bucket).remove_tree()
    assert keep.read_bytes() == b"keep"


def test_a_file_output_that_would_hide_a_store_directory_is_refused(bucket):
    (StorePath(f"{bucket}/data") / "manifest.json").write_bytes(b"{}")
    with pytest.raises(DataError, match=rf"{bucket}/data: is a directory"):
        check_file_out(f"{bucket}/data", overwrite=True)
    assert check_file_out(f"{bucket}/metrics.json", overwrite=False) == StorePath(f"{bucket}/metrics.json")


def test_an_upload_cut_short_leaves_no_object(bucket, tmp_path, monkeypatch):
    """Closing the output stream on an error completes the upload with what was sent: it is taken back."""
    class CutShort:
        reads = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise KeyboardInterrupt
            return b"x" * 1000

    monkeypatch.setattr(storage, "open_input", lambda src: CutShort())
    out = StorePath(f"{bucket}/scores.parquet")
    with pytest.raises(KeyboardInterrupt):
        storage.copy_file(tmp_path / "scores.parquet", out)
    assert not out.exists()


def test_a_missing_bucket_fails_before_any_work(bucket):
    with pytest.raises(DataError, match=r"s3://no-such-bucket/x: bucket s3://no-such-bucket not found"):
        check_out("s3://no-such-bucket/x", overwrite=False)


def test_dataset_in_the_store_reads_as_the_local_one(bucket, tmp_path):
    local, remote = Dataset(tiny_dataset(tmp_path / "d")), Dataset(tiny_dataset(f"{bucket}/d"))
    remote.check()
    assert remote.verify() == []
    rows = np.array([7, 0, V - 1, 3])
    assert np.array_equal(remote.text_features(rows), local.text_features(rows))
    assert remote.read_sessions("train").equals(local.read_sessions("train"))
    assert np.array_equal(remote.popularity(), local.popularity())
    # damage is named as for a local file
    name = remote.manifest["session_files"]["valid"][0]["file"]
    (remote.path / name).write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError, match=rf"{remote.path / name}: not a readable Parquet file"):
        remote.check()


def test_synth_out_s3_writes_the_bucket_not_a_local_folder(bucket, tmp_path, monkeypatch, capsys):
    """The bug this replaced: `synth --out s3://...` used to write a local folder named `s3:`."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_cli(synth_main, ["--items", "60", "--sessions", "300", "--out", f"{bucket}/synth", "--no-progress"])
    assert e.value.code == 0, capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    data = Dataset(f"{bucket}/synth")
    assert data.num_items == 60 and data.verify() == []
    assert json.loads(StorePath(f"{bucket}/synth/manifest.json").read_text())["num_items"] == 60


def test_unreachable_store_is_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._filesystem.cache_clear()
    try:
        with pytest.raises(DataError, match=r"^s3://b/d/manifest.json: object store error \(.*\)$"):
            read_manifest("s3://b/d", "no dataset")
    finally:
        storage._filesystem.cache_clear()
