"""The lab's embedder on a Ray pool: `rsx ingest --executor ray` spreads the forward passes.

The coordinator still reads, checks, hashes, decodes and stores every file (the hostile-input
rules live there, and so do the database credentials); only decoded pictures travel to the
actors, which hold the lab's embedder, loaded once each, and send back vectors. Every actor's
embedder must have the lab's fingerprint, checked when the pool starts, so vectors from the pool
are the vectors a local ingest would store. ``RayEmbedder`` is an ``Embedder``: the lab adopts
it (``Lab.adopt_embedder``) and ingest runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from resynth_index.distributed.actors import EmbedderWorker
from resynth_index.distributed.executor import ACTOR_RESTARTS, TASK_RETRIES
from resynth_index.distributed.lent_digests import lend_embedder
from resynth_index.distributed.session import (
    RayOptions,
    join_ray,
    leave_ray,
    ray_cause,
    require_ray,
)
from resynth_index.errors import RsxError

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab


class RayEmbedder:
    """The lab's embedder on ``options.actors`` Ray actors (default: the cluster's GPUs, else
    its CPUs). A batch is cut into one slice per actor, embedded in parallel, and put back in
    order."""

    def __init__(self, lab: Lab, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self._started_ray = join_ray(self.options)
        ray = require_ray()
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            size = self.options.actors or gpus or int(ray.cluster_resources().get("CPU", 1))
            remote = ray.remote(
                num_cpus=1,
                num_gpus=1 if gpus else 0,
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=TASK_RETRIES,
            )(EmbedderWorker)
            self.pool = [remote.remote() for _ in range(max(1, size))]
            precision = lab.settings.embedder_precision or "auto"
            spec = lab.embedder_spec()
            # what the lab knows of the weights' digests: an actor on this node hashes nothing
            files, weights = lend_embedder(lab.file_digests, spec)
            loaded = ray.get(
                [
                    a.load.remote(spec.to_dict(), lab.device, precision, files, weights)
                    for a in self.pool
                ]
            )
        except ray.exceptions.RayError as error:
            self.close()
            raise RsxError(f"cannot start the Ray embedders: {ray_cause(error)}") from None
        except BaseException:
            self.close()
            raise
        self.fingerprint, self.dim, self.precision = loaded[0]
        if any(entry != loaded[0] for entry in loaded):
            self.close()
            raise RsxError("the Ray embedders disagree: their nodes load different weights")

    def embed(self, images: Sequence[PIL.Image.Image], batch_size: int = 32) -> np.ndarray:
        """Vectors of ``images`` in order, one slice per actor."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        ray = require_ray()
        share = -(-len(images) // len(self.pool))
        slices = [list(images[i : i + share]) for i in range(0, len(images), share)]
        try:
            parts = ray.get(
                [
                    actor.embed.remote(part, batch_size)
                    for actor, part in zip(self.pool, slices, strict=False)
                ]
            )
        except ray.exceptions.RayError as error:
            raise RsxError(f"embedding on Ray: {ray_cause(error)}") from None
        return np.concatenate(parts).astype(np.float32, copy=False)

    def close(self) -> None:
        """Let the pool go, and stop Ray if this object started it."""
        ray = require_ray()
        for actor in getattr(self, "pool", []):
            ray.kill(actor, no_restart=True)
        self.pool = []
        if self._started_ray:
            leave_ray()
            self._started_ray = False

    def __enter__(self) -> RayEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
