"""A Ray actor that holds a generator, loaded once, and turns (caption, seed) lists into PNGs.

The actor is a plain class here; ``executor`` wraps it with ``ray.remote`` (with restart and
retry options) when a run starts, so importing this module never imports ray. The actor only
generates: it touches no database and no blob path, so a task that Ray runs twice (a retry
after the actor's process died) has no effect but the work repeated. It returns PNG bytes made
by the same encoder the local path uses, so the coordinator stores exactly what a local run
would have stored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resynth_index.hashing import FileStat


@dataclass(frozen=True)
class GeneratorSpec:
    """What an actor needs to rebuild a registered generator on its own node.

    ``source`` is an absolute path every node can read (a shared model path on a cluster).
    ``device`` is the lab's device choice ("auto" resolves on the actor's node). ``fingerprint``
    and ``settings_hash`` are what the coordinator expects: an actor whose rebuilt generator
    differs refuses to start rather than store pictures under the wrong key. ``digests`` are
    the SHA-256 the coordinator knows of the generator's files, with their stats there
    (``lent_digests``); they are not part of what names the generator.
    """

    name: str
    kind: str
    source: Path | None
    settings_json: str
    device: str
    fingerprint: str
    settings_hash: str
    digests: tuple[tuple[FileStat, str], ...] = field(default=(), compare=False, repr=False)


class GeneratorWorker:
    """One device; holds the generator it was last asked for, loaded once, until another is.

    A run serves its generators one after another, so each actor loads each generator once per
    run. ``generate`` names its generator by ``GeneratorSpec`` (a few hundred bytes): a restarted
    actor (its process died) starts empty and loads what its retried task asks for.
    """

    def __init__(self) -> None:
        self.spec: GeneratorSpec | None = None
        self.model: Any = None
        self.hashed: list[str] = []  # the weight files this actor had to read
        self.batches = 0  # the batches this actor generated

    def pid(self) -> int:
        """The process id of this actor (tests kill it to check that a run survives)."""
        return os.getpid()

    def batches_made(self) -> int:
        """How many batches this actor generated since it started (tests check that the work
        went to the actors that were free)."""
        return self.batches

    def files_hashed(self) -> list[str]:
        """The files this actor read to fingerprint its generators (those the coordinator did
        not know as they are here)."""
        return list(self.hashed)

    def load(self, spec: GeneratorSpec) -> None:
        """Hold ``spec``'s generator (letting the one held before go), checking it is the one
        registered and that it runs here with the settings the coordinator keys it by."""
        from resynth_index.distributed.lent_digests import LentDigests
        from resynth_index.errors import RsxError
        from resynth_index.models.generators import factory

        if self.spec == spec:
            return
        self.spec = self.model = None
        digests = LentDigests(spec.digests)
        try:
            model = factory.build_generator(
                spec.name, spec.kind, spec.source, spec.settings_json, spec.device, digests=digests
            )
        finally:
            self.hashed.extend(digests.hashed)
        if model.fingerprint != spec.fingerprint:
            raise RsxError(
                f"generator {spec.name!r} on this node does not match the registered one "
                f"(fingerprint {model.fingerprint[:12]}, registered {spec.fingerprint[:12]})"
            )
        here = factory.settings_hash(spec.kind, spec.settings_json, spec.device)
        if here != spec.settings_hash:
            raise RsxError(
                f"generator {spec.name!r} would run with other settings on this node than on the "
                "coordinator (dtype 'auto' means float16 on CUDA, float32 on a CPU): run the "
                "coordinator on a node like the workers, or register an explicit dtype"
            )
        self.spec, self.model = spec, model

    def batch_size(self, spec: GeneratorSpec) -> int:
        """``batching.generator_batch_size`` of ``spec``'s generator on this actor's device, what
        an "auto" batch means here (on CUDA the generator is loaded first: it is held for the
        tasks that follow)."""
        from resynth_index.models.generators.batching import generator_batch_size

        self.load(spec)
        return generator_batch_size(self.model)

    def generate(
        self, spec: GeneratorSpec, requests: list[tuple[str, int]], batch_size: int
    ) -> list[bytes]:
        """PNG bytes of one image per (caption text, seed) by ``spec``'s generator, in order."""
        from resynth_index.models.generators.protocol import GenerationRequest
        from resynth_index.pipeline.intake import encode_png

        self.load(spec)
        images = self.model.generate(
            [GenerationRequest(caption, seed) for caption, seed in requests],
            batch_size=batch_size,
        )
        self.batches += 1
        return [encode_png(image) for image in images]


class EmbedderWorker:
    """One device holding the lab's embedder, loaded once: images in, vectors out.

    Like ``GeneratorWorker`` it touches no store: ``rsx ingest --executor ray`` decodes, checks
    and stores on the coordinator and sends only the decoded pictures here.
    """

    def __init__(self) -> None:
        self.model: Any = None

    def load(
        self,
        spec: dict[str, Any],
        device: str,
        precision: str,
        files: tuple[tuple[FileStat, str], ...] = (),
        weights: dict[str, str] | None = None,
    ) -> tuple[str, int, str]:
        """Load the embedder of ``spec`` (an ``EmbedderSpec`` as a dict); its fingerprint,
        dimension and concrete precision, which the coordinator checks against the lab's.
        ``files`` and ``weights``: the digests the coordinator knows (``lent_digests``)."""
        from resynth_index.distributed.lent_digests import LentDigests
        from resynth_index.models.embedders import EmbedderSpec, load_embedder

        if self.model is None:
            # nothing lent: no key to make, so no file to read for one (the digest is computed)
            digests = LentDigests(files, weights) if files or weights else None
            self.model = load_embedder(
                EmbedderSpec.from_dict(spec), device, precision, digests=digests
            )
        return self.model.fingerprint, self.model.dim, self.model.precision

    def embed(self, images: list[Any], batch_size: int) -> Any:
        """L2-normalised float32 vectors of ``images`` (PIL images), in order."""
        return self.model.embed(images, batch_size=batch_size)
