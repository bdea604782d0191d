"""Sharded full-ranking evaluation equals a dense evaluation of the whole score matrix."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from alterrec_dist.common.config import load_config
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.reader import SessionReader
from alterrec_dist.eval import evaluate as evaluation
from alterrec_dist.eval.metrics import rank_metrics
from alterrec_dist.model.networks import build_networks
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.table import ShardedItemTable
from alterrec_dist.training.recipe import build_run, frozen_item_rows, train_epoch
from alterrec_dist.training.schedule import plan
from tests.dist_harness import run_world
from tests.tiny_data import tiny_dataset

OVERRIDES = ["train.m_random=1", "train.m_gap=1", "train.m_max=2", "train.global_batch_size=12", "train.k1=2",
             "train.k2=12", "model.dim=8", "model.dropout=0.0", "eval.batch_size=6", "eval.tile_rows=5",
             "eval.alpha=0.3", "model.text_temperature=0.5", "eval.longtail_bins=[2,3]",
             "eval.alpha_sweep=[0.3,0.8]"]


def trained_run(rank, world, data_path, dense: bool):
    cfg = load_config(None, [f"data.path={data_path}", f"trainer.num_workers={world}", *OVERRIDES])
    run = build_run(cfg, Comm())
    for phase in plan(cfg.train.method, 1, 1, 2):
        train_epoch(run, phase, frozen_item_rows(run, phase))
    result = run.evaluate("test", 0)
    return (result, dense_metrics(run, Dataset(data_path))) if dense else result


@torch.no_grad()
def dense_metrics(run, data):
    """Score every test session against all V items at once; rank by (score desc, id asc)."""
    nets = {k: n.eval() for k, n in run.networks.items()}
    x, f = run.table.x, run.table.f  # W = 1: the whole catalog
    sessions = data.read_sessions("test")
    scores = {}
    for kind in ("id", "text"):
        net = nets[kind]
        rows = net.item_rows(x if kind == "id" else None, f if kind == "text" else None)
        qs = [net.encode(rows[torch.tensor(h)][None], torch.ones(1, len(h), dtype=torch.bool))[0]
              for h in sessions["history"].to_pylist()]
        scores[kind] = net.logits(torch.stack(qs), rows)
    scores["fused"] = 0.3 * scores["id"] + 0.7 * scores["text"]
    scores["fused@0.3"] = scores["fused"]  # the sweep's kinds rank like the main alpha would
    scores["fused@0.8"] = 0.8 * scores["id"] + 0.2 * scores["text"]
    targets = sessions["target"].to_numpy()
    out = {}
    for kind, s in scores.items():
        ranks = []
        for g, t in enumerate(targets):
            row = s[g].tolist()
            order = sorted(range(len(row)), key=lambda i: (-row[i], i))
            ranks.append(order.index(t) + 1)
        out[kind] = rank_metrics(torch.tensor(ranks))
    return out


@pytest.mark.slow
def test_sharded_evaluation_equals_dense(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    [(single, dense)] = run_world(trained_run, 1, str(data), True)
    assert set(single) == set(dense) == {"id", "text", "fused", "fused@0.3", "fused@0.8"}
    for kind in dense:
        for metric, value in dense[kind].items():
            assert single[kind][metric] == pytest.approx(value, abs=1e-9), (kind, metric)
        groups = single[kind]["longtail"]
        assert sum(g["n"] for g in groups.values()) == 24
        assert set(groups) == {"[0,2]", "(2,3]", "(3,inf)"}
    for world in (2, 3):
        for r in run_world(trained_run, world, str(data), False):
            for kind in dense:
                for metric, value in dense[kind].items():
                    assert r[kind][metric] == pytest.approx(value, abs=1e-6), (world, kind, metric)


def test_a_target_scored_nan_comes_after_every_item():
    """A diverged model scores NaN: no comparison with NaN holds, so the target ranked first (metrics 1.0)."""
    from alterrec_dist.eval.evaluate import orders_before
    scores, by_id = torch.tensor([[0.1, 0.5, float("nan")]]), torch.tensor([[True, False, False]])
    assert orders_before(scores, torch.tensor([[float("nan")]]), by_id).tolist() == [[True, True, True]]
    assert orders_before(scores, torch.tensor([[0.5]]), by_id).tolist() == [[False, False, False]]


def test_the_ranking_loop_puts_a_nan_target_after_every_item_beside_a_finite_one():
    """rank_tiles skips the NaN pass when no target is NaN: with one NaN target in the batch it must still run."""
    from alterrec_dist.eval.evaluate import rank_tiles
    q, m = torch.tensor([[1.0], [1.0]]), torch.arange(6, dtype=torch.float32)[:, None]  # item i scores i
    target = torch.tensor([2, 4])
    keys = torch.arange(6)[:, None]  # no twins
    counts = rank_tiles([q], [m], [1.0], {"id": [1.0]}, [(0, 4), (4, 6)], torch.arange(6), target,
                        torch.tensor([[float("nan")], [4.0]]), keys=keys, target_keys=keys[target])
    assert counts.tolist() == [[5], [1]]  # every other item; item 5 alone scores above 4


@pytest.fixture
def one_rank(tmp_path):
    """A real one-process gloo group in the test's own process (evaluation's collectives need one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield Comm()
    dist.destroy_process_group()


@pytest.fixture
def tf32_on():
    """TF32 matmuls allowed, as trainer.tf32 (default true) leaves a GPU worker; the process's flag after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_evaluation_scores_with_tf32_off_and_leaves_the_flag_as_it_was(one_rank, tf32_on, tmp_path, monkeypatch):
    """A GPU run's validation and test metrics (and so its model selection) were ranked with TF32 matmuls, the
    training's trainer.tf32 (default true) process-wide, while export, recommend and batch_score score without:
    batch_score could not reproduce a GPU-trained run's summary.json (reviewer finding). The flag can be set on a
    CPU build: spies on the item rows, the queries and the ranking loop read it as evaluation scores."""
    data = Dataset(tiny_dataset(tmp_path / "data"))
    cfg = load_config(None, ["model.dim=8"])
    networks = build_networks(cfg.train.method, cfg.model, data.text_dim, cfg.data.max_len)
    table = ShardedItemTable(data.num_items, cfg.model.dim, one_rank, data.text_features(np.arange(data.num_items)),
                             cfg.model.init_std, cfg.train.seed)
    reader = SessionReader(data.session_files("valid"), rank=0, world_size=1, global_batch_size=8,
                           max_len=cfg.data.max_len, seed=0, shuffle=False, drop_last=False)
    seen = []

    def spy(name):
        real = getattr(evaluation, name)
        return lambda *args, **kwargs: seen.append((name, torch.backends.cuda.matmul.allow_tf32)) or real(*args,
                                                                                                            **kwargs)

    for name in ("item_matrix", "session_queries", "rank_tiles"):
        monkeypatch.setattr(evaluation, name, spy(name))
    result = evaluation.evaluate(one_rank, networks, table, reader.epoch(0), reader.steps_per_epoch(),
                                 data.popularity(), evaluation.kind_weights(cfg.train.method, 0.3), [30, 100], 0)
    assert result["fused"]["n"] == 24
    assert {name for name, _ in seen} == {"item_matrix", "session_queries", "rank_tiles"}
    assert [tf32 for _, tf32 in seen] == [False] * len(seen)
    assert torch.backends.cuda.matmul.allow_tf32  # the training's flag again
