"""Concurrency: two ingests and a loop of queries on one lab at once; nothing lost or locked.

SQLite writes begin with BEGIN IMMEDIATE and wait up to 60 s for the lock (store/engine.py), and
every write transaction is short (a batch of rows), so writers queue rather than fail. The vector
index file is written by whichever process stored embeddings last: saves are serialised by a
lock and never replace a newer file with an older one (vectors.py), and an index opened with
counts taken just before another process saved is caught up, not rebuilt. The unit tests below
pin those two rules down deterministically; the end-to-end test races real processes, whose
overlap flag files force (no timing assumption).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hostile_files import (
    assert_each_stored_once,
    good_images,
    overlapping_folders,
    with_imported_resynthesis,
)

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


def test_every_process_of_the_suite_computes_on_one_thread():
    """tests/conftest.py pins torch (through OMP_NUM_THREADS) here and in every `rsx` a test starts:
    on 2 shared cores, spinning OpenMP threads oversubscribe them (a toy conv2d took 24 ms)."""
    import torch

    assert torch.get_num_threads() == 1
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "1"


# --------------------------------------------------------------------------- real processes
# Each `rsx` runs under this launcher: it logs when it starts and ends (CLOCK_MONOTONIC, one clock
# for every process on the machine) and, at the N-th time it reaches a crash point
# (store/faults.py), either touches a flag file or waits until the flag file exists. Patching
# faults.crash_point before anything imports it reaches every `from ... import crash_point`.
LAUNCHER = """
import json, os, sys, time
from pathlib import Path

import resynth_index.store.faults as faults

log = Path(os.environ["RSX_TEST_EVENTS"])


def record(event):
    with log.open("a") as out:
        out.write(json.dumps({"event": event, "t": time.monotonic()}) + "\\n")


record("start")
if os.environ.get("RSX_TEST_AT"):
    point, nth, action, flag = os.environ["RSX_TEST_AT"].split(":", 3)
    real, reached = faults.crash_point, [0]

    def crash_point(name):
        real(name)
        if name != point:
            return
        reached[0] += 1
        if reached[0] != int(nth):
            return
        record("reached")
        if action == "signal":
            Path(flag).touch()
        else:
            deadline = time.monotonic() + 300
            while not Path(flag).exists():
                if time.monotonic() > deadline:
                    sys.exit(f"{flag} never appeared")
                time.sleep(0.01)
        record("resumed")

    faults.crash_point = crash_point
from resynth_index.cli import main

sys.argv[0] = "rsx"
try:
    main()
finally:
    record("end")
"""


def _launch(lab: Path, events: Path, *args: str, at: str = "") -> subprocess.Popen:
    """``rsx --lab LAB ARGS`` under LAUNCHER; ``at`` is ``POINT:N:signal|wait:FLAG`` or empty."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RSX_TEST_EVENTS": str(events), "RSX_TEST_AT": at}
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "--lab", str(lab), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _events(log: Path) -> dict[str, float]:
    lines = log.read_text().splitlines() if log.exists() else []
    return {entry["event"]: entry["t"] for entry in map(json.loads, lines)}


def _wait_until_reached(processes: dict[Path, subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    waiting = dict(processes)
    while waiting:
        for log, process in list(waiting.items()):
            if "reached" in _events(log):
                del waiting[log]
            elif process.poll() is not None:
                out, err = process.communicate()
                pytest.fail(f"{log.stem} ended before its pause point: {out}{err}")
        assert time.monotonic() < deadline, f"never paused: {sorted(p.stem for p in waiting)}"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_ingests_and_queries_at_once(engine_lab, tmp_path):
    """On SQLite and on PostgreSQL: two `rsx ingest` processes over overlapping folders and a
    loop of `rsx query` processes. Both ingests are stopped half-way, with batches stored and
    batches to go, until the first query is about to write its image row; from there on all of
    them run at once. The overlap is forced by those flag files, not assumed from timings, and
    checked from each process's log. Every image ends stored, embedded and indexed once."""
    resynthesis = with_imported_resynthesis(engine_lab, tmp_path / "resynthesis", CAPTION, seed=700)
    # 0..7 and 4..11: disjoint parts and an overlap of four
    images, first, second = overlapping_folders(tmp_path, 12, first_end=8, second_start=4)
    queries = good_images(tmp_path / "queries", 2, seed=800)
    go = tmp_path / "go"
    logs = tmp_path / "events"
    logs.mkdir()

    # Four batches each; each waits at its second batch's embeddings (rows stored, no embeddings
    # yet, no transaction open) until the first query signals.
    ingests = {
        logs / f"ingest-{folder.name}.jsonl": _launch(
            engine_lab, logs / f"ingest-{folder.name}.jsonl", "ingest", str(folder),
            "--batch-size", "2", at=f"embedding:2:wait:{go}",
        )
        for folder in (first, second)
    }  # fmt: skip
    _wait_until_reached(ingests)
    assert not go.exists()

    answers, query_logs = [], []
    for number, query in enumerate(queries):  # the query loop, one query after the other
        log = logs / f"query-{number}.jsonl"
        process = _launch(
            engine_lab, log, "query", str(query), "--caption", CAPTION, "--candidates", "imp",
            "--no-generate", "--json", at=f"image-row:1:signal:{go}" if number == 0 else "",
        )  # fmt: skip
        try:
            answers.append(process.communicate(timeout=300))
        finally:
            go.touch()  # never leave the ingests waiting, whatever happened to the query
        query_logs.append(log)
    outputs = [process.communicate(timeout=300) for process in ingests.values()]

    assert [p.returncode for p in ingests.values()] == [0, 0], outputs
    everything = "".join(out + err for out, err in outputs + answers)
    assert "locked" not in everything.lower()
    for out, err in answers:
        assert json.loads(out)["verdict"] == "imp", err

    # The overlap: the first query released the ingests while it was under way, and every ingest
    # had work left then; so the query loop's interval and every ingest's share that moment.
    loop = [_events(log) for log in query_logs]
    assert "reached" in loop[0], "the first query never reached its image-row point"
    released = loop[0]["reached"]
    loop_start, loop_end = loop[0]["start"], loop[-1]["end"]
    for log in ingests:
        ingest = _events(log)
        assert ingest["start"] < ingest["reached"] < released <= ingest["resumed"] < ingest["end"]
        assert max(ingest["start"], loop_start) < released < min(ingest["end"], loop_end)

    assert_each_stored_once(engine_lab, [*images, resynthesis, *queries], queries=len(queries))
