"""What the Ray launcher decides without a Ray: which worker errors end a run at the first restart."""
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.training.launch import WorkerErrors, is_refusal


def test_a_refusal_is_a_setting_not_a_read_that_may_pass():
    """Every DataError was recorded as a refusal, so a store that failed for seconds (its read errors are
    DataErrors to the commands) ended the run where Ray's restarts used to resume it."""
    assert is_refusal(ConfigError("epoch 0: the id network's training loss is nan: the run diverged"))
    assert not is_refusal(DataError("s3://b/d/part-00000.parquet: object store error (NETWORK_CONNECTION)"))
    assert not is_refusal(RuntimeError("a worker's own failure"))


def test_the_first_refusal_stays_and_the_last_error_is_kept():
    errors = WorkerErrors()
    errors.record(DataError("a read that failed"))
    assert errors.refusal() is None  # restarted: Ray retries it
    first = ConfigError("diverged")
    errors.record(first)
    errors.record(ConfigError("diverged again"))
    assert errors.refusal() is first and str(errors.last()) == "diverged again"
