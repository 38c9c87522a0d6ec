"""Ingest loading in worker processes, and blobs made durable per batch before their rows.

No timings: parallelism is shown by the process ids that loaded the files, ordering by events
recorded from hooks (``BlobStore.place``, ``repository.ensure_images``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hostile_files import exif_rotated_jpeg, good_images, interrupt_the_second_batch
from sqlalchemy import select

from resynth_index.cli import cli
from resynth_index.lab import Lab
from resynth_index.pipeline import ingest as ingest_module
from resynth_index.pipeline import loading
from resynth_index.pipeline.ingest import IngestInterrupted, ingest
from resynth_index.pipeline.ingest_items import expand_paths
from resynth_index.pipeline.loading import WorkerDied, resolve_workers
from resynth_index.store import embeddings, repository
from resynth_index.store.blobs import BlobStore
from resynth_index.store.models import EmbeddingRow, ImageRow

pytestmark = pytest.mark.slow  # worker processes import torch: seconds each

OLD = 1_500_000_000  # a file time long past, so a file read is remembered (the racy window)


def _folder(tmp_path: Path, count: int = 6) -> Path:
    folder = tmp_path / "incoming"
    good_images(folder, count)
    data, _upright = exif_rotated_jpeg(7)
    (folder / "rotated.jpg").write_bytes(data)  # orientation applied where it is decoded
    for path in folder.iterdir():
        os.utime(path, (OLD, OLD))
    return folder


def _stored(lab_dir: Path) -> dict[str, tuple]:
    """sha256 -> (format, width, height, vector) of every image with an embedding."""
    with Lab.open(lab_dir) as lab, lab.session() as session:
        rows = session.execute(
            select(ImageRow.id, ImageRow.sha256, ImageRow.format, ImageRow.width, ImageRow.height)
        ).all()
        vectors = embeddings.vectors_by_image_id(session, [row.id for row in rows], lab.fingerprint)
    return {
        sha: (fmt, width, height, vectors[image_id])
        for image_id, sha, fmt, width, height in rows
        if image_id in vectors
    }


def _record_loads(monkeypatch) -> list[int]:
    """The process id of every file load the ingest finishes (in this process)."""
    pids: list[int] = []
    real = ingest_module._finish_batch

    def finish(lab, embedder, batch, loads, register_missing):
        pids.extend(load.pid for load in loads)
        return real(lab, embedder, batch, loads, register_missing)

    monkeypatch.setattr(ingest_module, "_finish_batch", finish)
    return pids


def test_workers_load_in_other_processes_and_store_what_the_thread_stores(
    toy_lab, tmp_path, monkeypatch
):
    folder = _folder(tmp_path)
    other = shutil.copytree(toy_lab, tmp_path / "lab-threaded")
    pids = _record_loads(monkeypatch)

    with Lab.open(other) as lab:
        threaded = ingest(lab, expand_paths([folder]), batch_size=2, workers=0)
    assert set(pids) == {os.getpid()}  # the loader thread, in this process
    pids.clear()
    with Lab.open(toy_lab) as lab:
        pooled = ingest(lab, expand_paths([folder]), batch_size=2, workers=2)
    assert len(pids) == 7 and os.getpid() not in pids  # every file loaded in a worker

    assert (pooled.added, pooled.failed) == (threaded.added, threaded.failed) == (7, 0)
    by_thread, by_workers = _stored(other), _stored(toy_lab)
    assert by_workers.keys() == by_thread.keys()
    for sha, (fmt, width, height, vector) in by_thread.items():
        assert by_workers[sha][:3] == (fmt, width, height)  # orientation applied alike
        np.testing.assert_allclose(by_workers[sha][3], vector, atol=1e-6)
    assert CliRunner().invoke(cli, ["--lab", str(toy_lab), "check"]).exit_code == 0

    # the files' digests were remembered: a re-run skips them all unread, workers or not
    pids.clear()
    with Lab.open(toy_lab) as lab:
        again = ingest(lab, expand_paths([folder]), batch_size=2, workers=2)
    assert (again.added, again.skipped, again.unchanged) == (0, 7, 7)
    assert pids == []


def test_a_file_failing_in_a_worker_is_one_failure_and_the_rest_are_stored(
    toy_lab, tmp_path, monkeypatch
):
    folder = _folder(tmp_path, 4)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    pids = _record_loads(monkeypatch)
    with Lab.open(toy_lab) as lab:
        summary = ingest(lab, expand_paths([folder]), batch_size=3, workers=2)
    assert os.getpid() not in pids
    assert (summary.added, summary.failed) == (5, 1)
    [failure] = summary.failures
    assert failure.path == str(folder / "broken.png")
    assert "\n" not in failure.reason and not failure.reason.startswith(str(folder))
    assert len(_stored(toy_lab)) == 5  # the toy lab starts without images


def test_a_worker_that_dies_fails_the_ingest_in_one_line_and_no_batch_half_stored(
    toy_lab, tmp_path, monkeypatch
):
    folder = tmp_path / "incoming"
    good_images(folder, 12)
    real = ingest_module._finish_batch
    killed: list[int] = []

    def finish_then_kill(lab, embedder, batch, loads, register_missing):
        if not killed:  # the first batch is stored; the worker that loaded it dies now
            killed.append(loads[0].pid)
            os.kill(loads[0].pid, signal.SIGKILL)
        return real(lab, embedder, batch, loads, register_missing)

    monkeypatch.setattr(ingest_module, "_finish_batch", finish_then_kill)
    result = CliRunner().invoke(
        cli, ["--lab", str(toy_lab), "ingest", str(folder), "--batch-size", "2", "--workers", "2"]
    )
    assert result.exit_code == 1
    died = [line for line in result.output.splitlines() if "worker process died" in line]
    assert len(died) == 1, result.output
    assert "Traceback" not in result.output
    assert not [t for t in threading.enumerate() if t.name == "rsx-ingest-loader"]
    with Lab.open(toy_lab) as lab, lab.session() as session:
        images = session.scalars(select(ImageRow.id)).all()
        embedded = session.scalars(select(EmbeddingRow.image_id)).all()
    assert len(images) % 2 == 0 and 2 <= len(images) < 12  # whole batches only
    assert sorted(embedded) == sorted(images)
    assert WorkerDied.__mro__[1].__name__ == "RsxError"

    monkeypatch.setattr(ingest_module, "_finish_batch", real)
    again = CliRunner().invoke(cli, ["--lab", str(toy_lab), "ingest", str(folder)])
    assert again.exit_code == 0, again.output
    assert f"{12 - len(images)} added" in again.output


def test_ctrl_c_with_workers_raises_interrupted_and_ends_the_workers(
    toy_lab, tmp_path, monkeypatch
):
    folder = tmp_path / "incoming"
    good_images(folder, 6)
    pids = _record_loads(monkeypatch)
    interrupt_the_second_batch(monkeypatch)
    with Lab.open(toy_lab) as lab, pytest.raises(IngestInterrupted) as raised:
        ingest(lab, expand_paths([folder]), batch_size=2, workers=2)
    assert raised.value.summary.added == 2
    assert pids and os.getpid() not in pids
    for pid in set(pids):  # the pool was shut down and its processes reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [t for t in threading.enumerate() if t.name == "rsx-ingest-loader"]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_batch_places_its_blobs_in_one_step_before_its_rows(
    toy_lab, tmp_path, monkeypatch, workers
):
    folder = tmp_path / "incoming"
    good_images(folder, 7)
    events: list[tuple[str, list]] = []
    real_place, real_rows = BlobStore.place, repository.ensure_images

    def place(self, staged):
        placed = real_place(self, staged)
        events.append(("place", placed))
        return placed

    def rows(session, images):
        events.append(("rows", [image.sha256 for image in images]))
        return real_rows(session, images)

    monkeypatch.setattr(BlobStore, "place", place)
    monkeypatch.setattr(repository, "ensure_images", rows)
    with Lab.open(toy_lab) as lab:
        summary = ingest(lab, expand_paths([folder]), batch_size=3, workers=workers)
        blobs = lab.blobs
    assert summary.added == 7

    kinds = [kind for kind, _ in events]
    assert kinds.count("place") == 3  # one per batch (3 + 3 + 1 files), not one per file
    assert [len(value) for kind, value in events if kind == "place"] == [3, 3, 1]
    placed: set[Path] = set()  # the blobs durable so far
    for kind, value in events:  # in the order they happened
        if kind == "place":
            placed.update(value)
        else:  # rows: every blob they name is in place and durable by now
            assert {blobs.path_for(sha) for sha in value} <= placed
    assert blobs.temp_files() == []


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_refused_after_loading_leaves_neither_blob_nor_temporary_file(
    toy_lab, tmp_path, monkeypatch, workers
):
    """A file refused by the store's checks after its blob was staged (say, its generator was
    removed meanwhile) is one failure; its staged blob is discarded, the batch's others stored."""
    folder = tmp_path / "incoming"
    files = good_images(folder, 4)
    refused = files[1]
    real_precheck = ingest_module._precheck

    def precheck(lab, item, *rest):
        if Path(item.path) == refused:
            raise ingest_module.RsxError(f"{item.path}: refused for the test")
        return real_precheck(lab, item, *rest)

    monkeypatch.setattr(ingest_module, "_precheck", precheck)
    with Lab.open(toy_lab) as lab:
        summary = ingest(lab, expand_paths([folder]), batch_size=4, workers=workers)
        blobs = lab.blobs
        with lab.session() as session:
            stored = set(session.scalars(select(ImageRow.sha256)))
    assert summary.added == 3
    assert [(f.path, f.reason) for f in summary.failures] == [
        (str(refused), "refused for the test")
    ]
    refused_sha = hashlib.sha256(refused.read_bytes()).hexdigest()
    assert refused_sha not in stored and not blobs.exists(refused_sha)
    assert blobs.temp_files() == []


def test_resolve_workers_follows_a_count_and_sizes_auto_to_the_cores():
    assert resolve_workers(0, 1000, cores=16) == 0
    assert resolve_workers(3, 1000, cores=2) == 3  # asked for: followed
    assert resolve_workers(8, 5, cores=16) == 5  # never more workers than files
    assert resolve_workers(None, 10_000, cores=2) == 0  # a 2-core machine: the thread
    assert resolve_workers(None, 10_000, cores=3) == loading.AUTO_MIN_WORKERS
    assert resolve_workers(None, 10_000, cores=16) == 15  # one core left for the model
    few = loading.MIN_FILES_PER_WORKER * 3
    assert resolve_workers(None, few, cores=16) == 3  # a small ingest: fewer workers
    assert resolve_workers(None, loading.MIN_FILES_PER_WORKER, cores=16) == 0  # the thread


def test_cli_workers_option(toy_lab, tmp_path):
    folder = tmp_path / "incoming"
    good_images(folder, 2)
    bad = CliRunner().invoke(cli, ["--lab", str(toy_lab), "ingest", str(folder), "--workers", "x"])
    assert bad.exit_code == 2 and "--workers" in bad.output
    done = CliRunner().invoke(
        cli, ["--lab", str(toy_lab), "ingest", str(folder), "--workers", "auto"]
    )
    assert done.exit_code == 0 and "2 added" in done.output
