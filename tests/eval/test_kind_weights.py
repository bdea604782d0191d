"""What each method is scored on: `kind_weights`, the one owner of the kinds and their weights."""
import pytest

from alterrec_dist.common.methods import METHODS
from alterrec_dist.eval.evaluate import kind_weights


def test_alterrec_is_scored_on_each_network_its_alpha_mix_and_the_sweep():
    assert kind_weights("alterrec", 0.3, (0.5, 1.0)) == {
        "id": [1.0, 0.0], "text": [0.0, 1.0], "fused": [0.3, 0.7], "fused@0.5": [0.5, 0.5], "fused@1": [1.0, 0.0]}


def test_nfrec_serves_the_plain_sum_of_its_parts_whatever_alpha_says():
    assert kind_weights("nfrec_sum", 0.3, (0.5,)) == {"id": [1.0, 0.0], "text": [0.0, 1.0], "fused": [1.0, 1.0]}


@pytest.mark.parametrize("name,own,weights", [("id_only", "id", [1.0, 0.0]), ("text_only", "text", [0.0, 1.0])])
def test_a_lone_network_serves_its_own_score_and_nothing_over_its_untrained_other(name, own, weights):
    # the other network is built but never trained: neither its kind nor any mix with it is scored
    assert kind_weights(name, 0.5, (0.2, 0.8)) == {own: weights, "fused": weights}


def test_every_method_has_a_served_score_and_names_only_known_components():
    for name in METHODS:
        kinds = kind_weights(name, 0.5)
        assert "fused" in kinds and all(len(w) == 2 for w in kinds.values()), name
