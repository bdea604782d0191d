import pytest

from alterrec_dist.training.schedule import (Phase, lr_factor, lr_ramp_epochs, own_step, patience_exhausted,
                                             phase_rejected, plan, ramp_steps, stop_reason, warmup_epochs)

I, T, F = "id", "text", "fused"
R, H = "random", "hard"

# Algorithm 1 written out by hand: (network, negatives) per epoch.
BY_HAND = {
    (2, 2, 30): [(I, R), (I, R), (T, R), (T, R)] + [(I, H), (I, H), (T, H), (T, H)] * 6 + [(I, H), (I, H)],
    (1, 3, 10): [(I, R), (T, R), (I, H), (I, H), (I, H), (T, H), (T, H), (T, H), (I, H), (I, H)],
    (0, 1, 4): [(I, H), (T, H), (I, H), (T, H)],
    (2, 2, 3): [(I, R), (I, R), (T, R)],
}


@pytest.mark.parametrize("args", list(BY_HAND))
def test_alterrec_follows_algorithm_1(args):
    expected = BY_HAND[args]
    assert len(expected) == args[2]
    got = plan("alterrec", *args)
    assert [(p.epoch, p.network, p.negatives) for p in got] == [(e, *x) for e, x in enumerate(expected)]
    assert not any(p.augmented for p in got)


@pytest.mark.parametrize("args", list(BY_HAND))
def test_variants_of_the_alternation(args):
    base = plan("alterrec", *args)
    aug = plan("alterrec_aug", *args)
    assert [(p.network, p.negatives) for p in aug] == [(p.network, p.negatives) for p in base]
    assert [p.augmented for p in aug] == [p.negatives == H for p in base]  # only hard epochs augment
    rnd = plan("alterrec_random", *args)
    assert [p.network for p in rnd] == [p.network for p in base]
    assert all(p.negatives == R and not p.augmented for p in rnd)


@pytest.mark.parametrize("method,network", [
    ("id_only", I), ("text_only", T), ("nfrec_sum", F), ("nfrec_concat", F)])
def test_single_network_baselines(method, network):
    assert plan(method, 2, 2, 5) == [Phase(e, network, R, False) for e in range(5)]


def test_phase_key_changes_at_phase_boundaries():
    keys = [p.key for p in plan("alterrec_aug", 1, 2, 7)]
    assert keys == [(I, R, False), (T, R, False), (I, H, True), (I, H, True), (T, H, True), (T, H, True), (I, H, True)]
    new_phase = [e for e in range(7) if e == 0 or keys[e] != keys[e - 1]]
    assert new_phase == [0, 1, 2, 4, 6]


def test_unknown_method():
    with pytest.raises(ValueError):
        plan("sasrec", 2, 2, 30)


def test_warmup_is_alterrecs_random_epochs_only():
    assert warmup_epochs("alterrec", 2, 10) == 4 and warmup_epochs("alterrec_aug", 1, 10) == 2
    assert warmup_epochs("alterrec", 2, 3) == 3  # never past the plan
    assert warmup_epochs("id_only", 2, 10) == warmup_epochs("nfrec_sum", 2, 10) == 0


def stopped_after(valid: list[float], patience: int, warmup: int) -> int:
    """Drive patience_exhausted as the recipe does: the epochs that run before it says stop."""
    best_epoch, best = None, -1.0
    for epoch, score in enumerate(valid):
        if patience_exhausted(epoch, best_epoch, patience, warmup):
            return epoch
        if score > best:
            best_epoch, best = epoch, score
    return len(valid)


def test_patience_stops_n_epochs_after_the_best():
    curve = [0.1, 0.2, 0.3, 0.25, 0.24, 0.31, 0.2, 0.2, 0.2, 0.2]
    assert stopped_after(curve, patience=0, warmup=0) == 10  # off
    assert stopped_after(curve, patience=2, warmup=0) == 5   # best 0.3 at epoch 2; epochs 3 and 4 worse
    assert stopped_after(curve, patience=3, warmup=0) == 9   # epoch 5 improves; 6, 7, 8 do not
    assert stopped_after(curve, patience=5, warmup=0) == 10  # m_max is the ceiling


def test_what_ended_a_run_that_trained_all_its_epochs():
    # 10 epochs, patience 3: a best epoch of 6 left epochs 7, 8, 9 no better, so patience ran out with the
    # last one (the run would not have gone on); a best epoch of 7 was still within patience
    assert [stop_reason(10, best, 3, 0) for best in (6, 7)] == ["patience", "m_max"]
    assert stop_reason(10, 6, 0, 0) == "m_max"  # patience off
    assert stop_reason(10, 2, 3, 8) == "m_max"  # the warm-up's epochs do not count: 8 and 9 only
    assert stop_reason(5, 2, 2, 0) == "patience"  # stopped before the budget


def test_patience_does_not_count_the_warm_up():
    curve = [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]  # best at epoch 0, inside the warm-up
    assert stopped_after(curve, patience=1, warmup=0) == 2
    assert stopped_after(curve, patience=1, warmup=4) == 5   # counted from the end of epoch 3
    assert stopped_after(curve, patience=2, warmup=4) == 6


@pytest.mark.parametrize("method,m_random,spe,expected", [
    ("text_only", 2, 66, 3),  # Scientific's text only: 0.1 * 30 * 66 = 198 steps, epochs 0..2
    ("text_only", 2, 70, 3),  # 210 steps: epochs 0..2 again
    ("alterrec", 2, 66, 4),   # ID: 16 own epochs, 106 steps (epochs 0, 1); text: 14, 93 steps (epochs 2, 3)
    ("alterrec", 1, 10, 5),   # ID's own epochs 0, 2, 3, ...; text's 1, 4, 5, ...: the ramp's 2nd own epoch
])
def test_lr_ramp_epochs_end_where_lr_factor_leaves_its_ramp(method, m_random, spe, expected):
    phases = plan(method, m_random, 2, 30)
    end = lr_ramp_epochs(phases, "warmup_cosine", 0.1, spe)
    assert end == expected

    def factors(epoch: int) -> list[float]:
        return [lr_factor("warmup_cosine", *own_step(phases, epoch, s, spe), 0.1) for s in range(spe)]

    # the epoch before ends on the way up (or at the peak); from `end` on every epoch only decays
    assert factors(end - 1)[0] < factors(end - 1)[-1]
    assert all(f == sorted(f, reverse=True) for f in map(factors, range(end, 30)))


def test_no_lr_ramp_without_warmup_cosine():
    assert lr_ramp_epochs(plan("text_only", 2, 2, 30), "constant", 0.1, 66) == 0
    assert lr_ramp_epochs(plan("text_only", 2, 2, 30), "warmup_cosine", 0.0, 66) == 0


def test_patience_is_a_function_of_what_a_checkpoint_holds():
    """A resumed run knows only (next epoch, best epoch): the decision must not need the history."""
    assert not patience_exhausted(5, 3, 2, 0) and patience_exhausted(6, 3, 2, 0)
    assert not patience_exhausted(3, None, 1, 4) and patience_exhausted(5, None, 1, 4)


def test_own_steps_skip_the_other_networks_epochs():
    phases = plan("alterrec", 1, 1, 4)  # id, text, id, text
    assert own_step(phases, 0, 3, 10) == (3, 20)
    assert own_step(phases, 1, 0, 10) == (0, 20)   # text's first step
    assert own_step(phases, 2, 5, 10) == (15, 20)  # id: epoch 0's 10 steps, then 5 of epoch 2
    assert own_step(plan("nfrec_sum", 1, 1, 3), 2, 1, 10) == (21, 30)


def test_lr_factor_warms_up_then_decays_to_zero():
    assert [lr_factor("constant", s, 10, 0.3) for s in range(10)] == [1.0] * 10
    f = [lr_factor("warmup_cosine", s, 100, 0.1) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear ramp over 10 steps to 1
    assert f[10] == 1.0 and all(a > b for a, b in zip(f[10:], f[11:]))   # then a strictly falling cosine
    assert f[55] == pytest.approx(0.5) and 0 < f[-1] < 1e-3
    assert lr_factor("warmup_cosine", 0, 100, 0.0) == 1.0  # no warm-up: the cosine from the first step


def test_a_phase_is_undone_only_when_it_ends_worse_than_it_began():
    """train.reject_worse undoes an alternating phase whose network scores below its start on validation; a tie
    is not worse (the option says "worse"), and the warm-up, a phase still under way, an unknown start or the
    option off never undo one."""
    ends = dict(reject_worse=True, phase_ends=True, epoch=6, warmup=4, before=0.05)
    assert phase_rejected(**ends, after=0.049)
    assert not phase_rejected(**ends, after=0.05)  # a tie is kept
    assert not phase_rejected(**ends, after=0.051)
    for change in ({"reject_worse": False}, {"phase_ends": False}, {"epoch": 3}, {"before": None}):
        assert not phase_rejected(**(ends | change), after=0.01), change
    assert phase_rejected(**(ends | {"epoch": 4}), after=0.01)  # the first epoch past the warm-up is judged


@pytest.mark.parametrize("warmup, total, ramp",
                         [(0.07, 100, 7), (0.1, 30, 3), (0.29, 100, 29), (0.1, 31, 4), (0.0, 50, 0)])
def test_the_ramp_is_the_share_the_config_wrote_rounded_up(warmup, total, ramp):
    """0.07 * 100 is 7.000000000000001 in floats: the ramp took 8 steps, and its 7th step's factor was 0.875."""
    assert ramp_steps(warmup, total) == ramp
    if ramp:
        assert lr_factor("warmup_cosine", ramp - 1, total, warmup) == 1.0
