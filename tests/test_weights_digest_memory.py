"""The embedder's weights digest is remembered: a second load hashes no tensor (issue 12).

``models/weights_digests.py`` keys the digest of the loaded image tower by the SHA-256 of each file
loaded and what the loader adds (its version, the libraries', the config, precision, device type);
``store/digests.py`` keeps it in the lab's ``weights_digests`` table. Every test compares with a
load that has no memory at all: the fingerprint must be bit-identical with or without it. Files a
test expects to be remembered are first given an mtime an hour back (a file modified within
``RACY_WINDOW_NS`` of being read is never trusted).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from resynth_index import hashing
from resynth_index.lab import Lab
from resynth_index.models import embedders, fingerprints
from resynth_index.models.embedders import EmbedderSpec, OpenClipEmbedder
from resynth_index.models.toyzoo.clip import (
    CONFIG_FILENAME,
    LAB_TOY_CLIP_FOLDER,
    TOY_CLIP_CONFIG,
    WEIGHTS_FILENAME,
    save_toy_clip,
)
from resynth_index.store import migrate
from resynth_index.store.digests import StoredDigests
from resynth_index.store.engine import make_engine, make_sessionmaker
from resynth_index.store.models import WeightsDigestRow

HOUR_NS = 3600 * 10**9
TOY_ARCH = "rsx-memory-toy-clip"


def age(*paths: Path, hours: float = 1.0) -> None:
    """Give the files an mtime ``hours`` back (only settled files are trusted)."""
    when = time.time_ns() - int(hours * HOUR_NS)
    for path in paths:
        os.utime(path, ns=(when, when))


def toy_folder(folder: Path, seed: int = 0) -> Path:
    """The toy CLIP in open_clip's local-dir layout, aged."""
    save_toy_clip(folder, seed=seed)
    age(folder / CONFIG_FILENAME, folder / WEIGHTS_FILENAME)
    return folder


def load(folder: Path, digests=None, precision: str = "fp32") -> str:
    """The fingerprint of the toy CLIP in ``folder``, loaded on the CPU."""
    spec = EmbedderSpec("", f"local-dir:{folder}")
    return OpenClipEmbedder(spec, device="cpu", precision=precision, digests=digests).fingerprint


@pytest.fixture(scope="module")
def toy_arch(tmp_path_factory) -> str:
    """The toy CLIP registered as an open_clip architecture (``ARCH@FILE``, random weights)."""
    import open_clip

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TOY_ARCH}.json").write_text(json.dumps(TOY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    return TOY_ARCH


@pytest.fixture
def tensors_hashed(monkeypatch) -> list[int]:
    """One entry per ``hash_state_dict`` call from now on."""
    calls: list[int] = []
    real = fingerprints.hash_state_dict

    def counting(state_dict):
        calls.append(len(state_dict))
        return real(state_dict)

    monkeypatch.setattr(fingerprints, "hash_state_dict", counting)
    return calls


def rows(engine) -> dict[str, str]:
    with make_sessionmaker(engine).begin() as session:
        query = select(WeightsDigestRow.load_key, WeightsDigestRow.digest)
        return dict(session.execute(query).all())


# --------------------------------------------------------------------------- remembered
@pytest.mark.parametrize(
    "engine_name",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)],
    indirect=True,
)
def test_a_second_load_hashes_no_tensor_and_gives_the_same_fingerprint(
    engine_url, tmp_path, tensors_hashed, files_hashed
):
    folder = toy_folder(tmp_path / "clip")
    truth = load(folder)  # no memory: today's way
    engine = make_engine(engine_url)
    try:
        migrate.upgrade(engine)
        tensors_hashed.clear()
        assert load(folder, StoredDigests(engine)) == truth
        assert len(tensors_hashed) == 1 and len(rows(engine)) == 1
        assert len(files_hashed) == 2  # the config and the checkpoint, remembered too

        tensors_hashed.clear()
        files_hashed.clear()
        assert load(folder, StoredDigests(engine)) == truth  # a new memory: as a new process
        assert tensors_hashed == [] and files_hashed == []

        # another precision makes other tensors of the same files: its own entry
        half = load(folder, precision="fp16")
        tensors_hashed.clear()
        assert load(folder, StoredDigests(engine), precision="fp16") == half != truth
        assert len(tensors_hashed) == 1 and len(rows(engine)) == 2
    finally:
        engine.dispose()


def test_a_lab_opened_again_hashes_no_tensor(toy_lab, tensors_hashed):
    clip = toy_lab / LAB_TOY_CLIP_FOLDER
    age(clip / CONFIG_FILENAME, clip / WEIGHTS_FILENAME)
    fingerprints_seen = []
    for _ in range(2):
        with Lab.open(toy_lab) as lab:  # checks the fingerprint against the one recorded
            fingerprints_seen.append(lab.embedder.fingerprint)
    assert len(tensors_hashed) == 1
    assert fingerprints_seen[0] == fingerprints_seen[1]


def test_the_first_command_after_init_hashes_nothing_again(tmp_path, tensors_hashed, files_hashed):
    """``Lab.create`` loads the embedder before the lab's database exists; what that load
    hashed is handed to the new lab, so its first open reads no weight file and no tensor."""
    folder = toy_folder(tmp_path / "clip")
    truth = load(folder)
    tensors_hashed.clear()
    files_hashed.clear()
    root = tmp_path / "lab"
    with Lab.create(root, embedder=f"local-dir:{folder}") as made:
        assert made.fingerprint == truth
    assert len(tensors_hashed) == 1 and len(files_hashed) == 2  # paid once, by init
    tensors_hashed.clear()
    files_hashed.clear()
    with Lab.open(root) as lab:
        assert lab.embedder.fingerprint == truth
    assert tensors_hashed == [] and files_hashed == []


def test_init_keeps_no_digest_of_a_file_not_yet_settled(tmp_path, tensors_hashed, files_hashed):
    folder = tmp_path / "clip"
    save_toy_clip(folder)  # written just now: its digest is not trusted yet
    root = tmp_path / "lab"
    Lab.create(root, embedder=f"local-dir:{folder}").close()
    files_hashed.clear()
    tensors_hashed.clear()
    with Lab.open(root) as lab:
        assert lab.embedder.fingerprint
    assert len(files_hashed) == 2 and len(tensors_hashed) == 1  # read again, as ever


def test_a_checkpoint_file_is_remembered_like_a_folder(toy_arch, tmp_path, memory, tensors_hashed):
    """``ARCH@FILE`` weights: the key holds the architecture's config and the file's digest."""
    checkpoint = toy_folder(tmp_path / "clip") / WEIGHTS_FILENAME
    spec = EmbedderSpec(toy_arch, str(checkpoint))
    truth = OpenClipEmbedder(spec, device="cpu").fingerprint
    tensors_hashed.clear()
    for _ in range(2):
        assert OpenClipEmbedder(spec, device="cpu", digests=memory).fingerprint == truth
    assert len(tensors_hashed) == 1


# --------------------------------------------------------------------------- changed files
def test_a_rewritten_weight_file_gives_its_own_fingerprint(tmp_path, memory, tensors_hashed):
    folder = toy_folder(tmp_path / "clip", seed=0)
    before = load(folder, memory)
    save_toy_clip(folder, seed=1)  # other tensors, same names and sizes
    truth = load(folder)  # no memory
    assert truth != before

    tensors_hashed.clear()
    assert load(folder, memory) == truth  # freshly written: computed, not remembered
    assert len(tensors_hashed) == 1 and len(rows(memory._engine)) == 1

    age(folder / CONFIG_FILENAME, folder / WEIGHTS_FILENAME, hours=2)
    assert load(folder, memory) == truth  # settled now: computed once more and remembered
    assert load(folder, memory) == truth
    assert len(tensors_hashed) == 2 and len(rows(memory._engine)) == 2

    save_toy_clip(folder, seed=0)  # back to the first tensors: their entry is still true
    age(folder / CONFIG_FILENAME, folder / WEIGHTS_FILENAME, hours=3)
    tensors_hashed.clear()
    assert load(folder, memory) == before and tensors_hashed == []


def test_a_file_changed_during_the_load_is_not_remembered(
    tmp_path, memory, tensors_hashed, monkeypatch
):
    """The stats before the load and after the digests differ: the tensors are hashed, and
    nothing is remembered for bytes that may not be the ones loaded."""
    folder = toy_folder(tmp_path / "clip")
    truth = load(folder)
    real = embedders._load_open_clip

    def load_then_touch(*args, **kwargs):
        loaded = real(*args, **kwargs)
        age(folder / WEIGHTS_FILENAME, hours=5)  # another mtime (and ctime): another version
        return loaded

    monkeypatch.setattr(embedders, "_load_open_clip", load_then_touch)
    tensors_hashed.clear()
    assert load(folder, memory) == truth
    assert len(tensors_hashed) == 1 and rows(memory._engine) == {}


# --------------------------------------------------------------------------- no memory
def test_without_a_memory_the_digest_is_computed_as_before(tmp_path, tensors_hashed, files_hashed):
    folder = toy_folder(tmp_path / "clip")
    truth = load(folder)
    assert load(folder, hashing.HashEveryTime()) == truth  # file digests, no weights memory
    assert len(tensors_hashed) == 2
    assert files_hashed == []  # no key to make: no file is read for it


def test_random_weights_are_hashed_as_before(toy_arch, memory, tensors_hashed, files_hashed):
    """``random:SEED`` weights have no files to key them by: computed every time, as before."""
    spec = EmbedderSpec(toy_arch, "random:0")
    truth = OpenClipEmbedder(spec, device="cpu").fingerprint
    for _ in range(2):
        assert OpenClipEmbedder(spec, device="cpu", digests=memory).fingerprint == truth
    assert len(tensors_hashed) == 3 and files_hashed == [] and rows(memory._engine) == {}


# --------------------------------------------------------------------------- broken memory
def test_an_unwritable_locked_or_broken_memory_still_loads_right(tmp_path, memory, tensors_hashed):
    folder = toy_folder(tmp_path / "clip")
    truth = load(folder)
    database = tmp_path / "lab.sqlite"

    read_only = make_engine(f"sqlite:///file:{database}?mode=ro&uri=true")
    try:
        assert load(folder, StoredDigests(read_only)) == truth
    finally:
        read_only.dispose()
    assert rows(memory._engine) == {}

    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        started = time.monotonic()
        assert load(folder, StoredDigests(memory._engine, write_wait_s=0.2)) == truth
        assert time.monotonic() - started < 5.0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert rows(memory._engine) == {}

    spec = EmbedderSpec("", f"local-dir:{folder}")
    digest = OpenClipEmbedder(spec, device="cpu", digests=memory)._weights_digest
    assert list(rows(memory._engine).values()) == [digest]  # remembered now
    with make_sessionmaker(memory._engine).begin() as session:
        session.execute(update(WeightsDigestRow).values(digest="not a digest"))
    tensors_hashed.clear()
    assert load(folder, memory) == truth  # a malformed row is ignored, and rewritten
    assert len(tensors_hashed) == 1 and list(rows(memory._engine).values()) == [digest]

    with sqlite3.connect(database) as connection:
        connection.execute("DROP TABLE weights_digests")  # a database that lost the table
    assert load(folder, StoredDigests(memory._engine)) == truth
