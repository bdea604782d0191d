"""A dataset built from a `Source`: its sessions streamed to the writer, its item texts encoded (cached,
see text_features.py), all in a hidden sibling of OUT renamed into place at the end, so bad input,
Ctrl-C or SIGTERM (`run_cli`) leave no OUT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from alterrec_dist.common.files import file_sha256
from alterrec_dist.data.layout import SPLITS, DatasetWriter
from alterrec_dist.data.sources.tables import Source
from alterrec_dist.data.text_features import EncodeStats, Encoder, text_model_name, write_text_features


def build_dataset(out: str | Path, overwrite: bool, read_source: Callable[[], Source], text_model: str | None,
                  batch_size: int, progress: bool, command: list[str],
                  encoder: Encoder | None = None) -> tuple[Path, Source, np.ndarray, EncodeStats]:
    """OUT from the source `read_source()` returns (read once OUT is known to be writable): (OUT, the
    source, which items had text, the encoding counts). `encoder` encodes the texts the cache lacks
    (default: in this process)."""
    with DatasetWriter(out, overwrite) as writer:
        source = read_source()
        _write_sessions(writer, source, progress)
        writer.set_items(source.item_ids, source.texts)
        stats = EncodeStats()
        has_text = write_text_features(writer, source.texts, text_model, batch_size=batch_size, progress=progress,
                                       stats=stats, encoder=encoder)
        out = writer.commit(
            source={"kind": source.kind, "files": {str(p): file_sha256(p) for p in source.files},
                    "params": source.params, **source.notes},
            text_model=text_model_name(text_model),
            command=command,
            extra={"sessions": {s: source.splits[s].num_sessions for s in SPLITS}},
        )
    return out, source, has_text, stats


def _write_sessions(writer: DatasetWriter, source: Source, progress: bool) -> None:
    total = sum(len(p) for p in source.splits.values())
    with tqdm(total=total, desc="writing sessions", unit="row", disable=not progress) as bar:
        for split in SPLITS:
            for history, target, user, session in source.splits[split].blocks():
                writer.add_sessions(split, history, target, user=user, session=session)
                bar.update(len(target))
