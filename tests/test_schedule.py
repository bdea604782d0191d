import pytest

from alterrec_dist.schedule import Phase, plan

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
