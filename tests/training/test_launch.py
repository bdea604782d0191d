"""What the Ray launcher decides without a Ray: which worker errors end a run at the first restart."""
from alterrec_dist.common.errors import ConfigError, DataError, StoreError
from alterrec_dist.training.launch import is_refusal


def test_a_refusal_is_bad_input_that_comes_again_not_a_store_that_failed():
    """Every DataError was recorded as a refusal, so a store that failed for seconds (network, throttling: its
    errors are DataErrors to the commands) ended the run where Ray's restarts used to resume it."""
    assert is_refusal(ConfigError("epoch 0: the id network's training loss is nan"))
    assert is_refusal(DataError("part-00000.parquet: row 3: item index outside"))
    assert not is_refusal(StoreError("s3://b/d/part-00000.parquet: object store error (NETWORK_CONNECTION)"))
    assert not is_refusal(RuntimeError("a worker's own failure"))  # Ray restarts it, as before
