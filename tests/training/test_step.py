"""The training step's negatives and positives, through the real run on a real dataset: with
`train.random_negatives = catalog`, a random phase trains the network on cross-entropy over the whole
catalog, the loss its own logits give; augmentation adds its positives with no hard negative too."""
import pytest
import torch

from alterrec_dist.common.config import load_config
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.training.recipe import build_run
from alterrec_dist.training.schedule import plan
from alterrec_dist.training.step import train_step
from tests.dist_harness import run_world
from tests.tiny_data import tiny_dataset

pytestmark = pytest.mark.slow  # a gloo process


def first_step_losses(rank, world, data_path, negatives):
    """(the step's per-query loss, cross-entropy of the network's logits over every item) on the first batch of
    the first (ID, random) phase, dropout off."""
    cfg = load_config(None, [f"data.path={data_path}", "trainer.num_workers=1", "train.global_batch_size=16",
                             "train.k1=6", "train.k2=20", "model.dim=8", "model.dropout=0.0",
                             "model.encoder=transformer", f"train.random_negatives={negatives}"])
    run = build_run(cfg, Comm())
    phase = plan(cfg.train.method, cfg.train.m_random, cfg.train.m_gap, cfg.train.m_max)[0]
    assert (phase.network, phase.negatives) == ("id", "random")
    net, batch = run.networks["id"], next(iter(run.train_reader.epoch(0)))
    _, logged = train_step(run.comm, cfg, phase, net, None, None, run.table, batch, 0, run.k2)
    with torch.no_grad():
        rows = net.item_rows(run.table.x, None)  # W = 1: the whole catalog in item order
        q = net.encode(rows[batch.items], batch.mask)
        full = torch.nn.functional.cross_entropy(net.logits(q, rows), batch.target)
    return logged["loss"], full


def test_catalog_negatives_train_on_cross_entropy_over_the_whole_catalog(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    [(loss, full)] = run_world(first_step_losses, 1, str(data), "catalog")
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    [(sampled, _)] = run_world(first_step_losses, 1, str(data), "sampled")  # 14 random draws: another loss
    assert abs(sampled - full) > 0.1


def test_augmented_positives_are_added_when_no_negative_is_hard(tmp_path):
    """alterrec_aug with train.hard_fraction rounding to no hard negative trained bit for bit as alterrec_random
    (its positives were added only where a band was mined), while metrics.jsonl said "augmented"."""
    from tests.training.test_recipe import COMMON, train_and_collect

    data = tiny_dataset(tmp_path / "data")
    [augmented] = run_world(train_and_collect, 1, str(data), COMMON + ["train.method=alterrec_aug",
                                                                      "train.hard_fraction=0"])
    [random] = run_world(train_and_collect, 1, str(data), COMMON + ["train.method=alterrec_random"])
    warm_up = 2 * 6  # steps of the two random epochs, the same in both
    assert augmented[0][:warm_up] == random[0][:warm_up]
    assert all(a != r for a, r in zip(augmented[0][warm_up:], random[0][warm_up:]))
