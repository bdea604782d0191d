"""`prepare --ray`: the texts the encoding cache lacks are encoded on Ray Data, by a pool of actors that
each load the model once (a GPU each where the cluster has GPUs).

One Ray row is one text batch of `text_features`' plan, so the actors run the model on exactly the
batches the in-process encoder would, with the same torch thread count: the rows are byte for byte
the same. The results come back in order and the driver saves them to the cache chunk by chunk, as
in-process encoding does; an actor holds one batch's texts and vectors at a time.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from alterrec_dist.common.ray_local import ray_session
from alterrec_dist.data.text_features import Encoder, default_threads, encode_batch, load_encoding_model

# Text batches per Ray block: a few hundred texts still spread over the actors, and a block is a few
# seconds of CPU work, far above Ray's per-block cost.
BATCHES_PER_BLOCK = 4


def ray_encoder(actors: int | None = None, threads: int | None = None) -> Encoder:
    """The Ray `Encoder`: `actors` actors (None: one per GPU of the cluster, else one per `threads` of its
    CPUs) of `threads` torch threads each (None: `default_threads()` of this process, the count in-process
    encoding would use), each reserving a GPU, or else `threads` CPUs."""
    return functools.partial(encode_on_ray, actors=actors, threads=threads)


def encode_on_ray(model_dir: Path, batches: Iterable[list[str]], progress: bool, actors: int | None = None,
                  threads: int | None = None) -> Iterator[np.ndarray]:
    import ray
    import ray.data

    threads = threads or default_threads()
    rows = [{"texts": batch} for batch in batches]
    # A private Ray gets every CPU here, or what the actors asked for need (oversubscribed, rather than
    # waiting forever).
    with ray_session(num_cpus=max(os.cpu_count() or 1, (actors or 0) * threads)):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        size = actors or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # results in batch order: the driver saves them by position
        ctx.enable_progress_bars = False  # the driver's own bar counts the texts
        ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // BATCHES_PER_BLOCK))
        ds = ds.map_batches(_RayEncoder, fn_constructor_kwargs={"model_dir": str(model_dir), "threads": threads},
                            batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size),
                            num_cpus=1 if gpus else threads, num_gpus=1 if gpus else 0)  # a GPU actor's threads idle
        for row, batch in zip(ds.iter_rows(), rows):
            yield np.frombuffer(row["vectors"], dtype=np.float16).reshape(len(batch["texts"]), -1)


class _RayEncoder:
    """map_batches UDF: loads the model once per actor; each row's texts are one forward pass."""

    def __init__(self, model_dir: str, threads: int):
        import torch

        torch.set_num_threads(threads)  # the actor's process is its own: set once
        self.model = load_encoding_model(Path(model_dir), progress=False)

    def __call__(self, table: pa.Table) -> pa.Table:
        vectors = [encode_batch(self.model, texts).tobytes() for texts in table.column("texts").to_pylist()]
        return pa.table({"vectors": pa.array(vectors, type=pa.binary())})
