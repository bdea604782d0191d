"""Any interaction log (user, item, time; CSV or Parquet) and its item table, cut into sessions and split by time."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alterrec_dist.common.errors import DataError
from alterrec_dist.data.layout import SPLITS
from alterrec_dist.data.sources.tables import (TEST, TRAIN, VALID, Pairs, Source, check_unique_ids,
                                               counts_to_offsets, event_positions, join_texts, keep_long_sessions,
                                               raise_at_first, read_table, string_column)


# -- any interaction log + item table ---------------------------------------------------------------
def read_log(interactions: str | Path, items: str | Path, user_col: str, item_col: str, time_col: str,
             text_cols: list[str], session_col: str | None = None, item_id_col: str | None = None,
             split: str = "leave-last-out", cutoff: str | None = None, valid_cutoff: str | None = None,
             drop_short: bool = False) -> Source:
    """Sessions from `session_col` (a user's session ids), else each user's events; ordered by time (file order on
    ties).

    leave-last-out: per session the last event is the test target, the second last the valid
    target, the rest train prefix pairs. A 2-event session gives a test row only, a 3-event
    one test + valid: short sessions fill test first, then valid, then train.
    time: a row (history = all earlier events of its session) goes to train if its target
    time is before `valid_cutoff`, valid if before `cutoff`, else test.
    Items are the item table's rows in file order.
    """
    interactions, items = Path(interactions), Path(items)
    item_id_col = item_id_col or item_col
    item_table = read_table(items, [item_id_col, *text_cols])
    item_ids = string_column(item_table, item_id_col, items)
    check_unique_ids(item_ids, items, item_id_col)
    texts = join_texts(item_table, text_cols, items)

    table = read_table(interactions, [user_col, item_col, time_col] + ([session_col] if session_col else []))
    users = string_column(table, user_col, interactions)
    idx = pc.index_in(string_column(table, item_col, interactions), value_set=item_ids)
    raise_at_first(pc.is_null(idx).to_numpy(zero_copy_only=False), interactions, item_col,
                    f"item not in the item table {items}")
    times, time_kind = _time_numbers(table[time_col].combine_chunks(), f"{interactions}: column {time_col}")
    sessions = string_column(table, session_col, interactions) if session_col else None
    keys = pc.dictionary_encode(users if sessions is None else _user_session_pairs(users, sessions))
    codes = keys.indices.to_numpy().astype(np.int64)  # codes follow first appearance: a stable session order
    order = np.lexsort((np.arange(len(codes)), times, codes))
    counts = np.bincount(codes, minlength=len(keys.dictionary))
    first_row = order[counts_to_offsets(counts)[:-1]]

    def describe(g: int) -> str:
        row = first_row[g]
        if sessions is None:
            return f"{interactions}: user {users[row].as_py()!r} (row {row + 1}, column {user_col})"
        return (f"{interactions}: session {sessions[row].as_py()!r} of user {users[row].as_py()!r} "
                f"(row {row + 1}, column {session_col})")

    keep = keep_long_sessions(counts, describe, drop_short)
    order = order[np.repeat(keep, counts)]
    offsets = counts_to_offsets(counts[keep])
    values, times = idx.to_numpy().astype(np.int64)[order], times[order]
    user = users.take(pa.array(first_row[keep]))
    session = sessions.take(pa.array(first_row[keep])) if session_col else None
    rel, length = event_positions(offsets)
    if split == "leave-last-out":
        masks = {TRAIN: (rel >= 1) & (rel <= length - 3), VALID: (rel == length - 2) & (length >= 3),
                 TEST: rel == length - 1}
    elif split == "time":
        valid_at = _cutoff(valid_cutoff, "--valid-cutoff", time_kind)
        test_at = _cutoff(cutoff, "--cutoff", time_kind)
        if valid_at > test_at:
            raise DataError(f"--valid-cutoff {valid_cutoff} is after --cutoff {cutoff}")
        masks = {TRAIN: (rel >= 1) & (times < valid_at), VALID: (rel >= 1) & (times >= valid_at) & (times < test_at),
                 TEST: (rel >= 1) & (times >= test_at)}
    else:
        raise DataError(f"--split {split}: expected leave-last-out or time")
    params = {"interactions": str(interactions), "items": str(items), "user_col": user_col, "item_col": item_col,
              "time_col": time_col, "session_col": session_col, "item_id_col": item_id_col, "text_cols": text_cols,
              "split": split, "cutoff": cutoff, "valid_cutoff": valid_cutoff, "drop_short": drop_short}
    splits = {s: Pairs.where(values, offsets, masks[s], user=user, session=session) for s in SPLITS}
    return Source("log", [interactions, items], params, item_ids, texts, splits,
                  notes={"dropped_short_sessions": int((~keep).sum())})


def _user_session_pairs(users: pa.Array, sessions: pa.Array) -> pa.Array:
    """One number per (user, session id) pair: a session is a user's, so ids numbered per user (1, 2, ... for
    each) name one session per user, not one session of every user's events. (A global id whose events change
    user midway, a login, is cut there; the README says so.)"""
    user_codes = pc.dictionary_encode(users).indices.to_numpy().astype(np.int64)
    session_codes = pc.dictionary_encode(sessions)
    return pa.array(user_codes * len(session_codes.dictionary) + session_codes.indices.to_numpy())


TIME_FORMATS = ((pa.int64(), "number"), (pa.float64(), "number"),
                (pa.timestamp("ns"), "time"), (pa.timestamp("ns", "UTC"), "time"))


def _time_numbers(col: pa.Array, where: str) -> tuple[np.ndarray, str]:
    """Times as sortable numbers, and their kind ("number" or "time": ISO-8601 in ns).

    Delimited files give strings: the first format that reads the first value must read all."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        values, kind = col, "number"
    elif pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        try:
            values = pc.cast(col, pa.timestamp("ns", getattr(col.type, "tz", None))).cast(pa.int64())
        except pa.ArrowInvalid:  # nanoseconds since 1970 in an int64 reach the years 1677..2262 only
            years = pc.year(col).to_numpy(zero_copy_only=False)
            outside = (years < 1678) | (years > 2261)
            row = f"row {int(np.argmax(outside)) + 1}: " if outside.any() else ""
            raise DataError(f"{where}: {row}a time outside the years 1677..2262 (nanoseconds cannot hold it)") from None
        kind = "time"
    else:
        values, kind = _parse_times(col.cast(pa.string()), where)
    if values.null_count:
        raise DataError(f"{where}: row {int(np.argmax(pc.is_null(values).to_numpy(zero_copy_only=False))) + 1}: empty time")
    numbers = values.to_numpy()
    if pa.types.is_floating(values.type) and not np.isfinite(numbers).all():  # NaN, or inf sorting last (a target)
        row = int(np.argmax(~np.isfinite(numbers)))
        raise DataError(f"{where}: row {row + 1}: time is {numbers[row]} (not a finite number)")
    return numbers, kind


def _parse_times(col: pa.Array, where: str) -> tuple[pa.Array, str]:
    """The first of TIME_FORMATS that reads every value; one that reads the first value but not all gives
    way to the next (1600000000 reads as an integer, 1600000000.5 in a later row only as a float)."""
    fits_first = [target for target, _ in TIME_FORMATS if _casts(col.slice(0, 1), target)]  # all, if no rows
    for target, kind in TIME_FORMATS:
        if target not in fits_first:
            continue
        try:
            values = pc.cast(col, target)
        except pa.ArrowInvalid:
            continue
        return (values.cast(pa.int64()) if kind == "time" else values), kind
    if not fits_first:
        raise DataError(f"{where}: row 1: {col[0].as_py()!r} is neither a number nor an ISO-8601 time")
    bad = next(i for i, v in enumerate(col.to_pylist())  # the first that no format row 1 fits reads
               if not any(_casts(pa.array([v], pa.string()), target) for target in fits_first))
    raise DataError(f"{where}: row {bad + 1}: {col[bad].as_py()!r} is not in the format of row 1 ({col[0].as_py()!r})")


def _casts(values: pa.Array, target: pa.DataType) -> bool:
    try:
        pc.cast(values, target)
        return True
    except pa.ArrowInvalid:
        return False


def _cutoff(value: str | None, flag: str, kind: str):
    if value is None:
        raise DataError(f"{flag} is required with --split time")
    (number,), value_kind = _time_numbers(pa.array([value]), flag)
    if value_kind != kind:
        raise DataError(f"{flag} {value}: a {value_kind}, but the time column holds {kind}s")
    return number
