"""The training step's negatives and positives, through the real run on a real dataset: with
`train.random_negatives = catalog`, a random phase trains the network on cross-entropy over the whole
catalog, the loss its own logits give; augmentation adds its positives with no hard negative too."""
import pytest
import torch

from alterrec_dist.common.config import load_config
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.training import step as step_module
from alterrec_dist.training.recipe import build_run, frozen_item_rows
from alterrec_dist.training.schedule import Phase, plan
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


def nfrec_part_losses(rank, world, data_path):
    """(logged loss_id, loss_text; each part's cross-entropy over the catalog at the network's logit scale) on
    NFRec (sum)'s first batch, model.id_temperature 0.5: a logit scale of 2."""
    cfg = load_config(None, [f"data.path={data_path}", "trainer.num_workers=1", "train.global_batch_size=16",
                             "train.k1=6", "train.k2=20", "model.dim=8", "model.dropout=0.0", "train.method=nfrec_sum",
                             "model.id_temperature=0.5", "train.random_negatives=catalog"])
    run = build_run(cfg, Comm())
    phase = plan(cfg.train.method, cfg.train.m_random, cfg.train.m_gap, cfg.train.m_max)[0]
    net, batch = run.networks["fused"], next(iter(run.train_reader.epoch(0)))
    _, logged = train_step(run.comm, cfg, phase, net, None, None, run.table, batch, 0, run.k2)
    with torch.no_grad():
        parts = net.part_rows(run.table.x, run.table.f.float())
        queries = net.part_queries(net.encode(net.item_rows(run.table.x, run.table.f.float())[batch.items],
                                              batch.mask))
        full = [torch.nn.functional.cross_entropy(net.logit_scale * q @ r.T, batch.target)
                for q, r in zip(queries, parts)]
    return [logged["loss_id"], logged["loss_text"]], full


def test_nfrec_s_part_losses_are_on_the_fused_loss_s_scale(tmp_path):
    """The imbalance diagnostic scored each part at scale 1 while the loss used the network's (1 / id_temperature):
    with a temperature, the parts were not the parts of the loss (reviewer finding)."""
    data = tiny_dataset(tmp_path / "data")
    [(logged, full)] = run_world(nfrec_part_losses, 1, str(data))
    torch.testing.assert_close(torch.tensor(logged), torch.stack(full), rtol=1e-4, atol=1e-5)


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


def spied(calls: dict, name: str, real):
    """`real`, recording its arguments and result under `name` (the last call)."""
    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[name] = (args, out)
        return out
    return spy


def mixed_band_step(rank, world, data_path, hard_fraction):
    """(the ranks k1, k2 train_step mines, the mined band's size per query, the count of random draws) on the first
    batch of the first hard epoch (ID, the text network frozen), with k2 - k1 = 30 negatives."""
    cfg = load_config(None, [f"data.path={data_path}", "trainer.num_workers=1", "train.global_batch_size=16",
                             "train.method=alterrec", "train.m_random=1", "train.m_gap=1", "train.m_max=3",
                             "train.k1=5", "train.k2=35", f"train.hard_fraction={hard_fraction}", "model.dim=8",
                             "model.dropout=0.0"])
    run = build_run(cfg, Comm())
    phase = plan(cfg.train.method, cfg.train.m_random, cfg.train.m_gap, cfg.train.m_max)[2]
    assert (phase.network, phase.negatives) == ("id", "hard")
    calls = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_module, "mine_band", spied(calls, "mine", step_module.mine_band))
        mp.setattr(step_module, "random_band", spied(calls, "random", step_module.random_band))
        train_step(run.comm, cfg, phase, run.networks["id"], run.networks["text"], frozen_item_rows(run, phase),
                   run.table, next(iter(run.train_reader.epoch(phase.epoch))), 0, run.k2)
    mine_args, (band, _) = calls["mine"]
    random_args, _ = calls["random"]
    return mine_args[4:6], band.mask.sum(1).tolist(), random_args[2]


def test_a_hard_fraction_mines_ranks_k1_to_k1_plus_its_share_and_draws_the_rest_at_random(tmp_path):
    """train.hard_fraction < 1 mixes the negatives: the frozen network's ranks k1 .. k1 + num_hard - 1, with
    num_hard = round(hard_fraction * (k2 - k1)), and k2 - k1 - num_hard uniform draws. Mining all of k1..k2 on
    top of the draws trained on more hard negatives than configured; truncating num_hard (0.29 * 30 = 8.7 -> 8)
    gave one hard negative fewer than the fraction asks."""
    data = tiny_dataset(tmp_path / "data")
    [(mined, band_sizes, drawn)] = run_world(mixed_band_step, 1, str(data), 0.29)
    assert mined == (5, 5 + 9) and drawn == 30 - 9
    assert band_sizes == [9] * 16  # ranks 5..13 of each of the 16 queries (random scores: no ties)


def random_draws(rank, world, data_path):
    """The random negatives train_step draws on one batch as (epoch, step): (0, 0) twice, (1, 0) and (0, 1)."""
    cfg = load_config(None, [f"data.path={data_path}", "trainer.num_workers=1", "train.global_batch_size=16",
                             "train.method=id_only", "train.k1=6", "train.k2=20", "model.dim=8"])
    run = build_run(cfg, Comm())
    batch = next(iter(run.train_reader.epoch(0)))
    calls, draws = {}, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_module, "random_band", spied(calls, "random", step_module.random_band))
        for epoch, step in ((0, 0), (0, 0), (1, 0), (0, 1)):
            train_step(run.comm, cfg, Phase(epoch, "id", "random", False), run.networks["id"], None, None, run.table,
                       batch, step, run.k2)
            draws.append(calls["random"][1].rows.clone())  # W = 1: the local rows are the item ids
    return draws


def test_random_negatives_are_drawn_anew_each_epoch_and_step(tmp_path):
    """The random negatives' generator is keyed by (seed, epoch, step): the same draws for a global batch
    whatever the world size, and other draws at the same step of the next epoch. Keyed without the epoch,
    every epoch trained each step's sessions against the same negatives."""
    data = tiny_dataset(tmp_path / "data")
    [(first, again, next_epoch, next_step)] = run_world(random_draws, 1, str(data))
    assert first.shape == (16, 14)
    assert torch.equal(first, again)
    assert not torch.equal(first, next_epoch) and not torch.equal(first, next_step)
