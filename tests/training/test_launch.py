"""What the Ray launcher decides without a Ray: which worker errors end a run at the first restart."""
from alterrec_dist.common.errors import ConfigError, DamagedData, DataError
from alterrec_dist.training.launch import WorkerErrors, is_refusal


def test_a_refusal_is_a_setting_not_a_read_that_may_pass():
    """Every DataError was recorded as a refusal, so a store that failed for seconds (its read errors are
    DataErrors to the commands) ended the run where Ray's restarts used to resume it."""
    assert is_refusal(ConfigError("epoch 0: the id network's training loss is nan: the run diverged"))
    assert not is_refusal(DataError("s3://b/d/part-00000.parquet: object store error (NETWORK_CONNECTION)"))
    assert not is_refusal(RuntimeError("a worker's own failure"))
    # a NaN text feature reads the same on every attempt: three attempts, three worker tracebacks
    assert is_refusal(DamagedData("d/text_features/part-00000.npy: row 8 (item_idx 7): a text feature that is not "
                                  "finite (NaN or inf): make the dataset again"))


def test_the_first_refusal_stays_and_the_last_error_is_kept():
    errors = WorkerErrors()
    errors.record(DataError("a read that failed"))
    assert errors.refusal() is None  # restarted: Ray retries it
    first = ConfigError("diverged")
    errors.record(first)
    errors.record(ConfigError("diverged again"))
    assert errors.refusal() is first and str(errors.last()) == "diverged again"


def test_signals_seen_whoever_handles_them():
    """Ray's TorchTrainer.fit replaces the driver's SIGINT handler with its own, so the launcher learns of a
    Ctrl-C from the signals the process received, not from a handler of its own."""
    import os
    import signal

    from alterrec_dist.training.launch import SignalsSeen

    handled = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(signum))
    try:
        with SignalsSeen() as seen:
            assert signal.SIGUSR1 not in seen
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered to this (main) thread at once
            assert handled == [signal.SIGUSR1]
            assert signal.SIGUSR1 in seen and signal.SIGINT not in seen
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_private_ray_looks_at_its_train_workers_every_fifth_of_a_second(monkeypatch):
    """Ray Train's controller looked every 2 s (Ray's default): a tiny run's last report and its worker group's end
    each waited for a look, 8 s of its 21 s in fit. A private Ray now looks every 0.2 s, for its own run alone; a
    cluster (RAY_ADDRESS) and a user's own setting keep theirs."""
    import os

    from alterrec_dist.common import ray_local
    from alterrec_dist.training import launch

    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    seen = []
    monkeypatch.setattr(ray_local, "_init_to_its_end", lambda kwargs: seen.append((kwargs.get("address"),
                                                                                  os.environ.get(key))))
    monkeypatch.setattr(ray_local.ray_watchdog, "start", lambda: None)
    monkeypatch.setattr(ray_local, "_OFF_HERE", False)  # leave the failure-handler switch of this process alone
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(key, raising=False)
    assert launch._init_ray(1) is True and seen == [("local", "0.2")]
    ray_local.stop_ray()  # and taken back: Ray Train hands the driver's variables to a later run's controller
    assert key not in os.environ
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert launch._init_ray(1) is False and seen[1] == (None, None)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv(key, "5")
    launch._init_ray(1)
    ray_local.stop_ray()
    assert seen[2] == ("local", "5") and os.environ[key] == "5"
