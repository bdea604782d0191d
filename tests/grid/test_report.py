"""The report's tables of the tuning: the switch ablation (each switch, the helpful ones combined), the choice."""
from pathlib import Path

from alterrec_dist.grid.report import choice_table, switch_table
from alterrec_dist.grid.runner import RunSpec
from alterrec_dist.grid.selection import Choice


def result(spec: RunSpec, valid: float, test: float) -> dict:
    def scores(x):
        return {"fused": {"hit@10": 2 * x, "ndcg@10": x}}
    return {"spec": spec, "valid": scores(valid), "test": scores(test), "best_epoch": 7}


def test_the_switch_table_shows_each_switch_and_the_combination():
    def spec(name, **kw):
        return RunSpec("d", name, 0, Path(name), [], role="sweep", method="alterrec", **kw)
    runs = [result(spec("a-dropout", sweeps={"model.dropout": 0.5}, extra=["model.dropout=0.5"]), 0.061, 0.051),
            result(spec("a-lr", sweeps={"lr": "3e-3"}, extra=["train.lr_id=3e-3"]), 0.062, 0.052),
            result(spec("a-combined", combined={"model.dropout": 0.5, "lr": "3e-3"},
                        extra=["model.dropout=0.5", "train.lr_id=3e-3"]), 0.066, 0.055)]
    lines = switch_table(runs)
    assert lines[2:] == [
        "| AlterRec (fused) | lr = 3e-3 | 1 | 0.1240 | 0.0620 | 0.1040 | 0.0520 | 7 |",
        "| AlterRec (fused) | model.dropout = 0.5 | 1 | 0.1220 | 0.0610 | 0.1020 | 0.0510 | 7 |",
        "| AlterRec (fused) | combined (model.dropout = 0.5, lr = 3e-3) | 1 | 0.1320 | 0.0660 | 0.1100 | 0.0550 | 7 |"]


def test_the_choice_table_gives_the_chosen_overrides_a_config_takes_over():
    chosen = RunSpec("d", "id_only", 0, Path("x"), [], role="sweep", method="id_only", extra=["model.dropout=0.5"])
    base = RunSpec("d", "nfrec_sum", 0, Path("y"), [], method="nfrec_sum")
    lines = choice_table([Choice("id_only", {"base": 0.060, "model.dropout = 0.5": 0.063}, "model.dropout = 0.5",
                                 [chosen]),
                          Choice("nfrec_sum", {"base": 0.061, "model.dropout = 0.5": 0.059}, "base", [base])])
    assert lines[2:] == ["| ID only | base: 0.0600, model.dropout = 0.5: 0.0630 | **model.dropout = 0.5** | "
                         "`model.dropout=0.5` |",
                         "| NFRec (sum) | base: 0.0610, model.dropout = 0.5: 0.0590 | **base** | none |"]
