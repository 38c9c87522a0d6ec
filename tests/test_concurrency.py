"""Concurrency: two ingests and a loop of queries on one lab at once; nothing lost or locked.

SQLite writes begin with BEGIN IMMEDIATE and wait up to 60 s for the lock (store/engine.py), and
every write transaction is short (a batch of rows), so writers queue rather than fail. The vector
index file is written by whichever process stored embeddings last: saves are serialised by a
lock and never replace a newer file with an older one (vectors.py), and an index opened with
counts taken just before another process saved is caught up, not rebuilt. The unit tests below
pin those two rules down deterministically; the end-to-end test races real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_files import file_sha, good_images, index_problems, rsx, store_state

from resynth_index.store.vectors import VectorIndex, _read_header

CAPTION = "two ships in a storm"
FP = "c" * 64
DIM = 4


class Rows:
    """A stand-in database: ``Rows(n)`` holds embeddings 1..n; records each after_id asked."""

    def __init__(self, n: int) -> None:
        self.ids = np.arange(1, n + 1, dtype=np.int64)
        self.vectors = np.random.default_rng(n).standard_normal((n, DIM)).astype(np.float32)
        self.calls: list[int] = []

    def __call__(self, after_id: int):
        self.calls.append(after_id)
        keep = self.ids > after_id
        if keep.any():
            yield self.ids[keep], self.vectors[keep]

    def open(self, path: Path, counted: int | None = None) -> VectorIndex:
        """Open with the counts as of ``counted`` rows (default: all of them)."""
        counted = len(self.ids) if counted is None else counted
        return VectorIndex.open(path, FP, DIM, self, db_count=counted, db_max_id=counted or -1)


def test_an_older_save_never_replaces_a_newer_index_file(tmp_path):
    path = tmp_path / "index" / "x.faiss"
    VectorIndex.rebuild(path, FP, DIM, Rows(10))
    slow, fast = Rows(10).open(path), Rows(10).open(path)  # two processes, same moment
    full = Rows(30)
    fast.add(full.ids[10:30], full.vectors[10:30])
    assert fast.save() is True  # the file now holds 30 rows
    slow.add(full.ids[10:15], full.vectors[10:15])
    assert slow.save() is False  # it only knows 15: the newer file is kept
    assert _read_header(path)["watermark"] == 30

    reader = Rows(30)
    index = reader.open(path)
    assert reader.calls == [30] and index.count == 30  # nothing to catch up, no rebuild


def test_a_save_replaces_the_file_it_loaded_even_when_ahead_of_it(tmp_path):
    """The watermark rule is for files others wrote: a rebuild may replace a 'future' file."""
    path = tmp_path / "y.faiss"
    VectorIndex.rebuild(path, FP, DIM, Rows(20))
    shrunk = Rows(12)  # rows 13..20 are gone from the database: the file is ahead of it
    index = shrunk.open(path)
    assert index.count == 12 and _read_header(path)["watermark"] == 12
    assert shrunk.calls == [12, -1]


def test_open_with_counts_taken_before_another_process_saved(tmp_path):
    path = tmp_path / "z.faiss"
    VectorIndex.rebuild(path, FP, DIM, Rows(30))
    late = Rows(30)  # counted 20 rows; another process then stored 10 and saved the index
    index = late.open(path, counted=20)
    assert index.count == 30 and late.calls == [20]  # no rebuild from scratch

    VectorIndex.rebuild(path, FP, DIM, Rows(20))
    growing = Rows(30)  # counted 25 rows; the file holds 20; 5 more came after the count
    index = growing.open(path, counted=25)
    assert index.count == 30 and growing.calls == [20]
    assert _read_header(path)["watermark"] == 30


# --------------------------------------------------------------------------- real processes
def _popen(lab: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "resynth_index", "--lab", str(lab), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_ingests_and_queries_at_once(toy_lab, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with_imported = rsx(toy_lab, "generator", "add", "imp", "--imported")
    assert with_imported.exit_code == 0
    [resynthesis] = good_images(tmp_path / "resynthesis", 1, seed=700)
    stored = rsx(
        toy_lab, "ingest", str(resynthesis), "--role", "resynthesis", "--generator", "imp",
        "--caption", CAPTION,
    )  # fmt: skip
    assert stored.exit_code == 0, stored.output

    images = good_images(tmp_path / "pool", 12, seed=300)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for path in images[:8]:  # 0..7 and 4..11: disjoint parts and an overlap of four
        (first / path.name).write_bytes(path.read_bytes())
    for path in images[4:]:
        (second / path.name).write_bytes(path.read_bytes())
    queries = good_images(tmp_path / "queries", 2, seed=800)

    ingests = [
        _popen(toy_lab, "ingest", str(folder), "--batch-size", "2") for folder in (first, second)
    ]
    answers = []
    for query in queries:  # the query loop runs while both ingests do
        answers.append(
            _popen(
                toy_lab, "query", str(query), "--caption", CAPTION, "--candidates", "imp",
                "--no-generate", "--json",
            ).communicate(timeout=300)
        )  # fmt: skip
    outputs = [process.communicate(timeout=300) for process in ingests]

    assert [process.returncode for process in ingests] == [0, 0], outputs
    everything = "".join(out + err for out, err in outputs + answers)
    assert "locked" not in everything.lower()
    for out, err in answers:
        assert json.loads(out)["verdict"] == "imp", err
    state = store_state(toy_lab)
    expected = {file_sha(p) for p in [*images, resynthesis, *queries]}
    assert state.images == expected and state.blobs == expected
    assert state.embeddings == state.embedded_images == len(expected)
    assert state.queries == len(queries)
    assert index_problems(toy_lab) == []
    check = rsx(toy_lab, "check")
    assert check.exit_code == 0, check.output
