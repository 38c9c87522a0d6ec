"""A query does no O(N) work on the vector index: it never opens, hashes or writes the file.

Opening the index file reads and hashes it whole and may rewrite it (seconds at a million
vectors); a query needs only its candidates' few reference vectors and its own, which it reads by
id from the database (or from an index the process already holds, as ``rsx serve`` does). The
index catches up in batches instead: an ingest, ``rsx index sync``, ``rsx check --repair``.
These tests guard the query against every way of touching the file, and check that the answer is
the same as one computed from a freshly synced index.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hostile_files import good_images, index_problems, rsx, with_imported_resynthesis

from resynth_index.lab import Lab
from resynth_index.store import embeddings, vectors
from resynth_index.store.vectors import VectorIndex, read_index_header

CAPTION = "a green kettle on a stove"
CANDIDATES = ("imp", "imp2")
K = 4  # resyntheses per candidate asked for: every stored one is compared


def _forbidden(*_args, **_kwargs):
    raise AssertionError("a query touched the whole vector index file")


@pytest.fixture
def guarded(monkeypatch):
    """Fail on any read, hash, load, rebuild or write of an index file while active."""

    def arm() -> None:
        monkeypatch.setattr(vectors, "_read_index_file", _forbidden)
        monkeypatch.setattr(vectors, "hash_stream", _forbidden)
        monkeypatch.setattr(VectorIndex, "open", _forbidden)
        monkeypatch.setattr(VectorIndex, "rebuild", _forbidden)
        monkeypatch.setattr(VectorIndex, "_write", _forbidden)

    return arm


def _two_candidates(lab: Path, tmp_path: Path) -> Path:
    """Imported generators 'imp' and 'imp2', one resynthesis of CAPTION each; a suspect image."""
    with_imported_resynthesis(lab, tmp_path / "imp", CAPTION, seed=900)
    _add_resynthesis(lab, tmp_path / "imp2", "imp2", seed=901, register=True)
    [suspect] = good_images(tmp_path / "suspect", 1, seed=42)
    return suspect


def _add_resynthesis(lab: Path, folder: Path, generator: str, seed: int, register=False) -> None:
    if register:
        assert rsx(lab, "generator", "add", generator, "--imported").exit_code == 0
    [image] = good_images(folder, 1, seed=seed)
    stored = rsx(
        lab, "ingest", str(image), "--role", "resynthesis", "--generator", generator,
        "--caption", CAPTION,
    )  # fmt: skip
    assert stored.exit_code == 0, stored.output


def _query(lab: Path, image: Path) -> dict:
    result = rsx(
        lab, "query", str(image), "--caption", CAPTION, "--candidates", ",".join(CANDIDATES),
        "--resyntheses", str(K), "--no-generate", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _in_process(lab: Lab, image: Path) -> list:
    """The question ``_query`` asks, through the library, on an open lab."""
    from resynth_index.pipeline.query import run_queries

    return run_queries(
        lab, [image], caption=CAPTION, candidates=list(CANDIDATES), resyntheses=K, generate=False
    )


def _index_file(lab: Path) -> Path:
    with Lab.open(lab) as opened:
        return opened.index_path


def _snapshot(path: Path) -> tuple:
    """The file as it is: inode, mtime, size, content hash, and what else lies in its folder."""
    info = os.stat(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return info.st_ino, info.st_mtime_ns, info.st_size, digest, sorted(os.listdir(path.parent))


def _evidence(answer: dict) -> tuple:
    return answer["verdict"], [(g["generator"], g["distances"]) for g in answer["ranking"]]


def _stored_max_id(lab: Path) -> int:
    with Lab.open(lab) as opened, opened.session() as session:
        return embeddings.embedding_stats(session, opened.fingerprint)[1]


def test_a_query_reads_no_index_and_answers_as_a_synced_index_does(
    toy_lab, tmp_path, guarded, monkeypatch
):
    suspect = _two_candidates(toy_lab, tmp_path)  # each ingest synced the index
    path = _index_file(toy_lab)
    assert index_problems(toy_lab) == []
    before = _snapshot(path)

    guarded()
    answer = _query(toy_lab, suspect)
    assert _snapshot(path) == before  # not rewritten, not replaced, no temp file left
    assert len(answer["ranking"]) == 2 and answer["verdict"] in CANDIDATES
    monkeypatch.undo()

    # the same question, answered in process from a freshly synced index held in memory (what
    # rsx serve does); the database must not be asked for vectors the index holds
    with Lab.open(toy_lab) as lab:
        lab.sync_index()  # adds the query image's embedding
        monkeypatch.setattr(embeddings, "vectors_by_embedding_id", _forbidden)
        [again] = _in_process(lab, suspect)
    assert _evidence(again.to_json()) == _evidence(answer)


def test_a_query_opens_no_index_in_process_either(toy_lab, tmp_path, guarded):
    suspect = _two_candidates(toy_lab, tmp_path)
    guarded()
    with Lab.open(toy_lab) as lab:
        [result] = _in_process(lab, suspect)
        assert lab.loaded_index() is None  # nothing was loaded to answer it
    assert result.verdict in CANDIDATES


def test_a_query_sees_embeddings_the_index_does_not_hold_yet(
    toy_lab, tmp_path, guarded, monkeypatch
):
    suspect = _two_candidates(toy_lab, tmp_path)
    first = _query(toy_lab, suspect)
    path = _index_file(toy_lab)

    monkeypatch.setattr(Lab, "sync_index", lambda self: None)  # an ingest that never synced
    _add_resynthesis(toy_lab, tmp_path / "late", "imp", seed=902)
    monkeypatch.undo()
    assert read_index_header(path)["watermark"] < _stored_max_id(toy_lab)
    before = _snapshot(path)

    guarded()
    answer = _query(toy_lab, suspect)
    assert _snapshot(path) == before  # still behind: the query left it alone
    distances = dict(_evidence(answer)[1])
    assert len(distances["imp"]) == 2  # the new resynthesis, read from the database
    assert dict(_evidence(first)[1])["imp"][0] in distances["imp"]


def test_index_sync_catches_up_after_queries_and_check_is_clean(toy_lab, tmp_path):
    suspect = _two_candidates(toy_lab, tmp_path)
    _query(toy_lab, suspect)
    path = _index_file(toy_lab)
    lag = index_problems(toy_lab)
    assert lag and "1 database embedding(s) missing from the index" in lag[-1]

    check = rsx(toy_lab, "check")  # a lag is no damage: noted, exit 0
    assert check.exit_code == 0, check.output
    assert "not in it yet" in check.output and "rsx index sync" in check.output

    synced = rsx(toy_lab, "index", "sync")
    assert synced.exit_code == 0, synced.output
    assert f"index {path.name}: added 1 vector(s), 3 in all" in synced.output
    assert index_problems(toy_lab) == []
    check = rsx(toy_lab, "check")
    assert check.exit_code == 0 and "not in it yet" not in check.output, check.output

    before = _snapshot(path)
    again = rsx(toy_lab, "index", "sync")
    assert f"index {path.name}: up to date, 3 vector(s)" in again.output
    assert _snapshot(path) == before  # nothing to add: not rewritten


def test_check_repair_syncs_a_lagging_index(toy_lab, tmp_path):
    suspect = _two_candidates(toy_lab, tmp_path)
    _query(toy_lab, suspect)
    repaired = rsx(toy_lab, "check", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: synced index" in repaired.output
    assert index_problems(toy_lab) == []


def test_index_sync_rebuilds_a_missing_index(toy_lab, tmp_path):
    _two_candidates(toy_lab, tmp_path)
    path = _index_file(toy_lab)
    path.unlink()
    synced = rsx(toy_lab, "index", "sync")
    assert synced.exit_code == 0, synced.output
    assert f"index {path.name}: rebuilt from the database, 2 vector(s)" in synced.output
    assert index_problems(toy_lab) == []


def test_check_tells_a_lag_from_damage(tmp_path):
    dim, fingerprint = 4, "f" * 64
    ids = np.arange(1, 6, dtype=np.int64)
    path = tmp_path / "i.faiss"
    index = VectorIndex(path, fingerprint, dim)
    index.add(ids[:3], np.eye(3, dim, dtype=np.float32))
    index.save()

    behind = VectorIndex(path, fingerprint, dim).check(5, 5, lambda: ids)
    assert not behind.ok and behind.behind == 2
    extra = VectorIndex(path, fingerprint, dim).check(2, 5, lambda: ids[[1, 3]])
    assert not extra.ok and extra.behind == 0  # an id the database lacks: damage, not lag
    foreign = VectorIndex(path, "e" * 64, dim).check(5, 5, lambda: ids)
    assert foreign.behind == 0
