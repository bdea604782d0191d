"""The run directory's layout: the one place that names its files. Training writes them; resume, serving, the
grid and its report read them (README "Outputs of a run" says what each holds).

    RUN/config.toml       the resolved config, written before training starts and at each resume
    RUN/dataset.json      the data it trains on: path, item count, every file's sha256 (`Dataset.identity`)
    RUN/metrics.jsonl     one JSON line per epoch
    RUN/summary.json      the result: best epoch, validation and test metrics, the chosen alpha
    RUN/model/            the model at the best validation epoch (`parallel/saved.py`)
    RUN/checkpoints/      the newest training checkpoints (`training/checkpoint.py`)
    RUN/tensorboard/      TensorBoard event files
    RUN/mlflow_run_id     the MLflow run it logs to, when MLflow is on (a resume logs to the same run)
    RUN/command.txt       the command that made it, written by the grid runner (`grid/runner.py`)
    RUN/.lock             held by the train writing the run, so a second one is refused (`training/run_dir.py`)
"""
CONFIG = "config.toml"
DATASET = "dataset.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
MLFLOW_RUN_ID = "mlflow_run_id"
COMMAND = "command.txt"
LOCK = ".lock"

WRITTEN = (CONFIG, DATASET, METRICS, SUMMARY, MODEL, CHECKPOINTS, TENSORBOARD, MLFLOW_RUN_ID, COMMAND, LOCK)
SERVED = (CONFIG, DATASET, SUMMARY, MODEL)  # what serving reads of a run (`serve/from_run.py`)


def served_paths(run: str | None) -> list[str]:
    """What export, recommend and batch_score read of RUN (none if not given): what their outputs may not
    replace or lie in. Not RUN whole: an export beside the model (RUN/export) takes nothing from the run."""
    return [] if run is None else [f"{str(run).rstrip('/')}/{name}" for name in SERVED]
