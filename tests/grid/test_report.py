"""Report logic on run records (the whole report from real runs is in test_experiments)."""
from pathlib import Path

from alterrec_dist.grid.report import select_settings
from alterrec_dist.grid.runner import RunSpec


def run(method: str, seed: int, m_max: int, valid: float, test: float, role: str = "method") -> dict:
    spec = RunSpec("d", method, seed, Path(f"/r/{method}-{m_max}-{seed}"), [], role=role, method=method,
                   sweeps={"train.m_max": m_max})
    return {"spec": spec, "selection": "fused/ndcg@10", "valid": {"fused": {"ndcg@10": valid}},
            "test": {"fused": {"ndcg@10": test}}}


def test_each_method_takes_the_value_best_on_validation_never_test():
    base = [run("alterrec", s, 16, 0.060, 0.050) for s in (0, 1)]
    longer = [run("alterrec", s, 30, 0.062, 0.040) for s in (0, 1)]  # better valid, worse test: still chosen
    nf_base = [run("nfrec_sum", s, 16, 0.061, 0.049) for s in (0, 1)]
    nf_longer = [run("nfrec_sum", s, 30, 0.059, 0.055) for s in (0, 1)]  # worse valid, better test: not chosen
    methods = {"alterrec": base, "nfrec_sum": nf_base}
    lines = select_settings(["train.m_max"], base + longer + nf_base + nf_longer, methods)
    assert methods["alterrec"] == longer and methods["nfrec_sum"] == nf_base
    assert "| AlterRec | train.m_max | 16: 0.0600, 30: 0.0620 | **30** |" in lines
    assert "| NFRec (sum) | train.m_max | 16: 0.0610, 30: 0.0590 | **16** |" in lines


def test_a_value_with_missing_seeds_is_not_a_candidate():
    base = [run("alterrec", s, 16, 0.060, 0.050) for s in (0, 1)]
    partial = [run("alterrec", 0, 30, 0.070, 0.060)]
    methods = {"alterrec": base}
    assert select_settings(["train.m_max"], base + partial, methods) == []
    assert methods["alterrec"] == base
