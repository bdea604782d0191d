"""The method registry is the one list of methods: config, networks, plan and report all read it."""
import pytest

from alterrec_dist.common.config import load_config
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.common.methods import METHODS, method, selection, selection_part
from alterrec_dist.grid.report import method_label, own_kind
from alterrec_dist.model.networks import build_networks
from alterrec_dist.training.schedule import plan


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_buildable_planned_and_labelled(name):
    cfg = load_config(None, [f"train.method={name}", "train.p=1", "train.k1=5"])
    networks = build_networks(name, cfg.model, text_dim=4, max_len=3)
    assert list(networks) == list(METHODS[name].networks)
    assert {p.network for p in plan(name, 1, 1, 4)} <= set(networks), "the plan trains only networks it has"
    assert method_label(name) == METHODS[name].label
    assert own_kind(name) == selection_part(name, "fused")


def test_unknown_methods_are_refused_in_one_place():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method("nope")
    with pytest.raises(ConfigError, match="train.method must be one of alterrec, "):
        load_config(None, ["train.method=nope"])
    assert len({m.label for m in METHODS.values()}) == len(METHODS)


def test_a_run_is_selected_on_eval_metric_or_its_lone_networks_own_score():
    assert selection("alterrec", "fused/ndcg@10") == ("fused", "ndcg@10")
    assert selection("alterrec", "id/hit@20") == ("id", "hit@20")
    assert selection("id_only", "fused/ndcg@10") == ("id", "ndcg@10")  # its text network is never trained
    assert selection("text_only", "fused/mrr@20") == ("text", "mrr@20")
