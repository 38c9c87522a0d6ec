"""Ray actors use the digests their coordinator knows (``distributed/lent_digests.py``).

An actor trusts a lent SHA-256 only while the file's stat on its node equals the recorded one in
every field (device, inode, size, mtime, ctime); anything else is read. The workers are plain
classes, so they are driven in this process here (no Ray); ``test_ray_executor.py`` runs one
through a real Ray. Files are aged an hour back first: only settled files are remembered.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from resynth_index import hashing
from resynth_index.distributed import lent_digests
from resynth_index.distributed.actors import EmbedderWorker, GeneratorSpec, GeneratorWorker
from resynth_index.distributed.lent_digests import LentDigests, lend_embedder, lend_generator
from resynth_index.hashing import file_stat
from resynth_index.lab import Lab
from resynth_index.models import fingerprints
from resynth_index.models.generators import diffusers, factory
from resynth_index.models.toyzoo.clip import LAB_TOY_CLIP_FOLDER

HOUR_NS = 3600 * 10**9


def age(*paths: Path, hours: float = 1.0) -> None:
    when = time.time_ns() - int(hours * HOUR_NS)
    for path in paths:
        os.utime(path, ns=(when, when))


def test_a_lent_digest_serves_only_the_very_file_it_was_taken_of(tmp_path, files_hashed):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w" * 64)
    age(weights)
    stat = file_stat(weights)
    lent = LentDigests([(stat, "f" * 64)])  # not the real digest: proves it was not read
    assert lent.digest(weights) == "f" * 64 and lent.hashed == [] and files_hashed == []

    elsewhere = LentDigests([(replace(stat, device=stat.device + 1), "f" * 64)])  # another node
    assert elsewhere.digest(weights) == hashing.hash_bytes(b"w" * 64)
    assert elsewhere.hashed == [str(weights.resolve())]

    weights.write_bytes(b"v" * 64)  # rewritten, same size, its old mtime given back: ctime moved
    os.utime(weights, ns=(stat.mtime_ns, stat.mtime_ns))
    assert lent.digest(weights) == hashing.hash_bytes(b"v" * 64)
    assert lent.hashed == [str(weights.resolve())]


def test_lent_weights_digests_are_recalled_for_settled_files_only(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w")
    fresh = file_stat(weights)
    age(weights)
    settled = file_stat(weights)
    lent = LentDigests(weights={"k" * 64: "d" * 64})
    assert lent.recall("k" * 64, [settled]) == "d" * 64
    assert lent.recall("k" * 64, [fresh]) is None
    lent.record("e" * 64, "d" * 64, [fresh])
    assert lent.recall("e" * 64, [settled]) is None


def _spec_of(lab: Lab, name: str, *, lend: bool) -> GeneratorSpec:
    row = next(r for r in lab.generators() if r.name == name)
    source = lab._absolute(row.source)
    digests = lend_generator(lab.file_digests, row.kind, source, row.settings_json) if lend else ()
    return GeneratorSpec(
        name=row.name,
        kind=row.kind,
        source=source,
        settings_json=row.settings_json,
        device=lab.device,
        fingerprint=row.fingerprint,
        settings_hash=factory.settings_hash(row.kind, row.settings_json, lab.device),
        digests=digests,
    )


def test_a_generator_actor_reads_no_weight_file_its_coordinator_knows(toy_lab, files_hashed):
    folder = toy_lab / "models" / "toy-toy-a"
    files = diffusers.fingerprint_files(folder)
    age(*files)
    with Lab.open(toy_lab) as lab:
        row = next(r for r in lab.generators() if r.name == "toy-a")
        lab.generator_model(row)  # fingerprinted with the lab's memory: every file remembered
        lent, unlent = _spec_of(lab, "toy-a", lend=True), _spec_of(lab, "toy-a", lend=False)
    assert len(lent.digests) == len(files) > 0
    assert lent == unlent  # the digests do not name the generator

    diffusers._file_digests.clear()  # a new actor process
    worker = GeneratorWorker()
    worker.load(lent)
    assert worker.files_hashed() == []

    diffusers._file_digests.clear()
    worker = GeneratorWorker()
    worker.load(unlent)  # nothing lent: every file read, as before
    assert sorted(worker.files_hashed()) == sorted(os.path.realpath(f) for f in files)


def test_an_embedder_actor_hashes_neither_files_nor_tensors_its_coordinator_knows(
    toy_lab, files_hashed, monkeypatch
):
    clip = toy_lab / LAB_TOY_CLIP_FOLDER
    age(*clip.iterdir())
    with Lab.open(toy_lab) as lab:
        fingerprint = lab.embedder.fingerprint  # weights digest computed and remembered
        spec, precision = lab.embedder_spec(), lab.settings.embedder_precision
        files, weights = lend_embedder(lab.file_digests, spec)
    assert len(files) == 2 and len(weights) == 1

    tensors: list[int] = []
    real = fingerprints.hash_state_dict
    monkeypatch.setattr(fingerprints, "hash_state_dict", lambda s: tensors.append(1) or real(s))
    files_hashed.clear()
    loaded = EmbedderWorker().load(spec.to_dict(), "cpu", precision, files, weights)
    assert loaded[0] == fingerprint and tensors == [] and files_hashed == []

    loaded = EmbedderWorker().load(spec.to_dict(), "cpu", precision)  # nothing lent: as before
    assert loaded[0] == fingerprint and tensors == [1] and files_hashed == []


def test_nothing_is_lent_for_what_the_coordinator_cannot_see(tmp_path, toy_lab):
    with Lab.open(toy_lab) as lab:
        assert lend_generator(lab.file_digests, "imported", None, "{}") == ()
        assert lend_generator(lab.file_digests, "diffusers", tmp_path / "nowhere", "{}") == ()
        assert lent_digests.lend_files(lab.file_digests, [tmp_path / "missing"]) == ()
