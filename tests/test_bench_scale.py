"""bench.scale measures what it says: per-step bytes counted in the sharding layer equal the formulas
of docs/SCALING.md (bench/formulas.py), the per-step reference computes the engine's loss, and the
harness writes its results table."""
import json

import pytest

from alterrec_dist.data.synth import write_synth
from bench import formulas, reference_step, scale, scale_worker
from tests.dist_harness import run_world

V, B, DIM, TEXT_DIM, K1, K2, P = 2000, 32, 8, 16, 5, 200, 3


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("bench") / "synth", items=V, sessions=2000, text_dim=TEXT_DIM,
                       progress=False)


def spec(data, **changes) -> dict:
    return {"data": str(data), "batch": B, "dim": DIM, "k1": K1, "k2": K2, "p": P, "steps": 1, "eval_batches": 1,
            "device": "cpu", "dtype": "fp32", "threads": 1, "sets": [], **changes}


def measure(rank, world, point):
    return scale_worker.measure(point)


def compare(rank, world, point):
    return reference_step.compare(point)


def assert_bytes_follow_formulas(result: dict, world: int) -> None:
    assert [(c["negatives"], c["merge"]) for c in result["cases"]] == list(scale_worker.CASES)
    for c in result["cases"]:
        want = formulas.collective_bytes(c["negatives"], c["merge"], B, world, DIM, K2, P, k1=K1, rounds=c["merge_rounds"])
        assert {k: c["bytes"][k] for k in want} == want, (c["negatives"], c["merge"])
        assert c["bytes"]["all_to_all"] > 0 and c["bytes"]["all_to_all_backward"] > 0


@pytest.mark.slow  # a forked gloo world
def test_counted_bytes_and_table_memory_follow_the_formulas(catalog):
    [r] = run_world(measure, 1, spec(catalog))
    assert_bytes_follow_formulas(r, 1)
    hard = r["cases"][1]
    assert hard["merge_rounds"] == 0  # at W = 1 the bracket is already exact
    assert hard["bytes_by_call"]["mine_band"] == formulas.BRACKET_FLOATS * 4 * B + 4 * B  # the merge, the tie check
    assert r["cases"][2]["bytes_by_call"]["mine_band"] == 4 * B * (K2 + 1) + 4 * B
    assert sum(r["table_bytes"].values()) == formulas.table_bytes(V, 1, DIM, TEXT_DIM) + 4  # + AdamW's step counter
    for c in r["cases"]:
        assert all(s > 0 for s in c["step_s"]) and set(c["sections"]) >= {"loss", "encoder", "optimizer"}
    assert r["peak_rss"] > 0 and r["eval"]["seconds"] > 0


@pytest.mark.slow  # a forked gloo world
def test_reference_step_computes_the_engines_loss(catalog):
    [r] = run_world(compare, 1, spec(catalog, batch=64, k2=500))
    assert r["reference_loss"] == pytest.approx(r["engine_loss"], rel=1e-5)
    assert len(r["engine_s"]) == len(r["reference_s"]) == 1 and r["ratio"] > 0


@pytest.mark.slow
def test_harness_writes_the_results_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    argv = ["--items", str(V), "--workers", "1,2", "--batch", str(B), "--steps", "1", "--repeats", "1",
            "--dim", str(DIM), "--k1", str(K1), "--k2", str(K2), "--p", str(P), "--eval-batches", "1",
            "--sessions", "2000", "--text-dim", str(TEXT_DIM), "--reference-items", str(V), "--reference-batch", "64",
            "--reference-k2", "500", "--reference-dim", str(DIM), "--reference-steps", "1",
            "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    assert scale.main(argv) == 0
    text = out.read_text()
    assert "python -m bench.scale " + " ".join(argv) in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(f"| {V:,} | 2 | hard | threshold |")]
    assert len(rows) == 2  # the throughput row and the traffic row
    traffic = rows[1]
    assert all(cell != "0 B" for cell in traffic[4:11]), "every collective moved bytes"
    assert traffic[-1].strip(" |") == "yes"
    assert "**no**" not in text
    [raw] = (tmp_path / "data").glob("results-*.json")
    for r in next(p for p in json.loads(raw.read_text())["points"] if p["world"] == 2)["ranks"]:
        assert_bytes_follow_formulas(r, 2)
        rounds = [c["merge_rounds"] for c in r["cases"] if c["merge"] == "threshold"]
        assert all(0 < n <= 32 and n == int(n) for n in rounds)  # one step per case: whole rounds
    assert "Every measured merge equals those formulas" in text
    again = tmp_path / "AGAIN.md"
    assert scale.main(["--report-only", str(raw), "--out", str(again)]) == 0
    assert again.read_text().split("## Training")[1] == text.split("## Training")[1]


@pytest.mark.parametrize("argv, error", [
    (["--items", "0"], "argument --items: '0': each value must be >= 1"),  # was a ZeroDivisionError
    (["--workers", "0"], "argument --workers: '0': each value must be >= 1"),  # an IndexError after the catalogs
    (["--report-only", "/no/such.json"], "--report-only /no/such.json: no such file"),  # a FileNotFoundError
])
def test_arguments_out_of_range_are_usage_errors(argv, error, capsys):
    with pytest.raises(SystemExit) as e:
        scale.parse_args(argv)
    assert e.value.code == 2 and error in capsys.readouterr().err
