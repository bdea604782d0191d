"""The synthetic generator: layout, Amazon-M2-shaped statistics, text signal, determinism, streaming."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from alterrec_dist.common.cli import run_cli
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import SPLITS
from alterrec_dist.data.synth import LINE_SIZE, LINE_SWITCH, SESSIONS_PER_SEED, TOPIC_SWITCH, make_catalog, write_synth
from alterrec_dist.synth import main


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Dataset:
    """20k items, 100k sessions: enough events (~24 per item) for stable popularity shares."""
    out = tmp_path_factory.mktemp("synth") / "big"
    write_synth(out, items=20_000, sessions=100_000, seed=3, progress=False)
    return Dataset(out)


def small(path, seed=0, **kw) -> Dataset:
    return Dataset(write_synth(path, items=500, sessions=3 * SESSIONS_PER_SEED + 123, seed=seed, progress=False, **kw))


def sessions_of(ds: Dataset) -> list[np.ndarray]:
    """Every session's full item sequence, rebuilt from the rows (train: the longest prefix + its target)."""
    out = []
    for split in SPLITS:
        t = ds.read_sessions(split)
        hist, target, session = t["history"].to_pylist(), t["target"].to_pylist(), t["session"].to_pylist()
        last = {}
        for h, y, s in zip(hist, target, session):
            last[s] = h + [y]  # train rows of a session come in prefix order: the last one is the whole session
        out += [np.array(v) for v in last.values()]
    return out


@pytest.fixture(scope="module")
def big_sessions(big) -> list[np.ndarray]:
    return sessions_of(big)


def content(ds: Dataset) -> dict:
    """Everything that must be reproducible (the manifest minus when/how it was made)."""
    manifest = {k: v for k, v in ds.manifest.items() if k not in ("created", "command")}
    manifest.pop("session_files")  # part boundaries are the writer's business; rows are compared below
    return {
        "manifest": json.dumps(manifest, sort_keys=True),
        "items": ds.items().to_pydict(),
        "features": ds.text_features().tobytes(),
        "has_text": ds.has_text().tobytes(),
        **{s: ds.read_sessions(s).to_pydict() for s in SPLITS},
    }


def test_layout_is_readable_and_consistent(big):
    V = big.num_items
    assert V == 20_000 and big.text_dim == 384 and big.manifest["text"]["model"] == "random-projection"
    feats = big.text_features()
    assert feats.shape == (V, 384) and feats.dtype == np.float16 and big.has_text().all()
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=1e-2)
    items = big.items()
    assert items["item_idx"].to_pylist() == list(range(V))
    assert len(set(items["item_id"].to_pylist())) == V and items["text"].null_count == 0
    train = big.read_sessions("train")
    assert (big.popularity() == np.bincount(train["target"].to_numpy(), minlength=V)).all()
    for split in SPLITS:
        t = big.read_sessions(split)
        assert t.num_rows == big.num_rows(split) > 0
        assert pc.min(pc.list_value_length(t["history"])).as_py() >= 1
        assert 0 <= pc.min(t["target"]).as_py() and pc.max(t["target"]).as_py() < V


def test_sessions_split_80_10_10_and_train_rows_are_prefixes(big):
    n = {s: len(set(big.read_sessions(s)["session"].to_pylist())) for s in SPLITS}
    assert sum(n.values()) == 100_000
    assert abs(n["train"] / 1e5 - 0.8) < 0.01 and abs(n["valid"] / 1e5 - 0.1) < 0.01
    t = big.read_sessions("train").slice(0, 5000)
    rows = list(zip(t["history"].to_pylist(), t["target"].to_pylist(), t["session"].to_pylist()))
    for (h0, y0, s0), (h1, _, s1) in zip(rows, rows[1:]):
        assert h1 == h0 + [y0] if s1 == s0 else len(h1) == 1


def test_popularity_matches_amazon_m2(big, big_sessions):
    c = np.sort(np.bincount(np.concatenate(big_sessions), minlength=big.num_items))[::-1]
    top1, top10 = c[: len(c) // 100].sum() / c.sum(), c[: len(c) // 10].sum() / c.sum()
    assert abs(top1 - 0.117) < 0.02, top1
    assert abs(top10 - 0.443) < 0.02, top10


def test_session_lengths_match_amazon_m2(big, big_sessions):
    lengths = np.array([len(s) for s in big_sessions])
    # Amazon-M2 task 2: sessions (target included) p50 4, p90 8, p99 14, max 46;
    # histories (what the published figures p50 3 / p90 7 / p99 13 / max 45 describe) one less
    np.testing.assert_allclose(np.percentile(lengths, [50, 90, 99]), [4, 8, 14], atol=1)
    assert lengths.min() >= 3 and 30 <= lengths.max() <= 46
    hist = big.read_sessions("test")["history"]
    np.testing.assert_allclose(np.percentile(pc.list_value_length(hist).to_numpy(), [50, 90, 99]), [3, 7, 13], atol=1)


def test_text_carries_topic_signal(big, big_sessions):
    cat = make_catalog(20_000, seed=3)  # the generator's own topics (deterministic for the seed)
    words = [set(t.split()) for t in big.items()["text"].to_pylist()]
    feats = big.text_features().astype(np.float32)
    rng = np.random.default_rng(0)
    a, b = rng.integers(20_000, size=(2, 20_000))
    same = cat.topic[a] == cat.topic[b]
    overlap = np.array([len(words[i] & words[j]) for i, j in zip(a, b)])
    cosine = (feats[a] * feats[b]).sum(1)
    assert overlap[same & (a != b)].mean() > overlap[~same].mean() + 1.5
    assert cosine[same & (a != b)].mean() > 0.35 > 0.1 > abs(cosine[~same].mean())
    # ... and similar text co-occurs: consecutive items of sessions share more words than random pairs
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in big_sessions[:20_000]])
    pair_overlap = np.array([len(words[i] & words[j]) for i, j in pairs[:20_000]])
    assert pair_overlap.mean() > overlap.mean() + 1.0


def test_lines_nest_in_topics_and_carry_the_next_item(big, big_sessions):
    """Product lines: what the ID table must learn per item and the title's brand word states."""
    cat = make_catalog(20_000, seed=3)
    assert (cat.topic[cat.by_line] == np.repeat(np.arange(cat.num_topics), np.diff(cat.line_start[cat.topic_lines]))).all()
    sizes = np.bincount(cat.line, minlength=cat.num_lines)
    assert abs(sizes.mean() - LINE_SIZE) < 0.1 and (sizes == 0).mean() < 0.02  # an empty line has no mass: never drawn
    np.testing.assert_allclose(cat.line_mass[-1], 1.0)
    # the brand word is in the title (twice) and in no other line's title
    titles = big.items()["text"].to_pylist()
    brand = [cat.vocab[w] for w in cat.line_word[cat.line]]
    assert all(t.split()[0] == b and t.split()[-1] == b for t, b in zip(titles[:1000], brand))
    assert len(set(cat.vocab[w] for w in cat.line_word)) == cat.num_lines
    # consecutive items stay in their line about (1 - TOPIC_SWITCH) * (1 - LINE_SWITCH) of the time
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in big_sessions[:20_000]])
    stay = (cat.line[pairs[:, 0]] == cat.line[pairs[:, 1]]).mean()
    assert abs(stay - (1 - TOPIC_SWITCH) * (1 - LINE_SWITCH)) < 0.05, stay
    # and the text features say so: line-mates are closer than topic-mates of other lines
    feats = big.text_features().astype(np.float32)
    rng = np.random.default_rng(1)
    a = rng.integers(20_000, size=20_000)
    mates = cat.by_line[np.minimum(cat.line_start[cat.line[a]] + rng.integers(0, 5, size=20_000),
                                   cat.line_start[cat.line[a] + 1] - 1)]
    keep = mates != a
    same_line = (feats[a] * feats[mates]).sum(1)[keep].mean()
    b = rng.integers(20_000, size=200_000)
    c = rng.integers(20_000, size=200_000)
    other = (cat.topic[b] == cat.topic[c]) & (cat.line[b] != cat.line[c])
    assert same_line > (feats[b] * feats[c]).sum(1)[other].mean() + 0.1


def test_deterministic_for_a_seed_and_independent_of_block_size(tmp_path):
    a = small(tmp_path / "a", seed=1)
    b = small(tmp_path / "b", seed=1, block_sessions=SESSIONS_PER_SEED)  # one RNG unit per block
    c = small(tmp_path / "c", seed=2)
    assert len(b.session_files("train")) == len(a.session_files("train"))
    assert content(a) == content(b)
    assert content(a)["train"] != content(c)["train"] and content(a)["features"] != content(c)["features"]


def test_existing_out_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["--items", "300", "--sessions", "2000", "--out", str(out), "--text-features", "random-projection",
            "--text-dim", "16", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    assert e.value.code == 0 and Dataset(out).text_dim == 16
    assert Dataset(out).manifest["command"][:3] == ["python", "-m", "alterrec_dist.synth"]
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    assert e.value.code == 2 and "output exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv + ["--overwrite", "--seed", "5"])
    assert e.value.code == 0 and Dataset(out).manifest["source"]["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp directory left behind


def test_sbert_features_when_available(tmp_path, monkeypatch):
    pytest.importorskip("alterrec_dist.data.text_features")
    monkeypatch.setenv("ALTERREC_CACHE", str(tmp_path / "cache"))  # keep the user's encoding cache clean
    ds = Dataset(write_synth(tmp_path / "s", items=300, sessions=2000, text_features="sbert", progress=False))
    assert ds.text_dim == 384 and ds.has_text().all() and ds.manifest["text"]["model"] == "all-MiniLM-L6-v2"
    cat = make_catalog(300, seed=0)
    f = ds.text_features().astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    cos = f @ f.T
    same = cat.topic[:, None] == cat.topic[None, :]
    np.fill_diagonal(same, False)
    assert cos[same].mean() > cos[cat.topic[:, None] != cat.topic[None, :]].mean() + 0.1
