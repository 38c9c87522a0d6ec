"""The Ray executor (``rsx resynthesize --executor ray``): same pictures, faults survived.

One local Ray (two CPUs, no dashboard) serves the whole module and is shut down at its end. The
actors generate; this process (or an ``rsx`` process joining the same Ray) stores, through the
code the local path stores with. Starting Ray and its actors takes seconds on two cores, hence
the slow marks.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_lab
from hostile_files import index_problems, rsx, rsx_process, store_state
from services import require_service

from resynth_index.distributed.executor import RayResynthesizer
from resynth_index.distributed.session import RayOptions
from resynth_index.lab import Lab
from resynth_index.pipeline import plans, resynthesis
from resynth_index.store.faults import CRASH_ENV

try:
    import ray
except ImportError:  # the [scale] extra is missing: the Ray tests skip (or fail, when required)
    ray = None

CAPTIONS = [
    "a red bicycle leaning on a wall",
    "two cats asleep on a sofa",
    "a lighthouse at dusk",
    "a bowl of lemons",
]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray for this module; its address lets an ``rsx`` process join it."""
    require_service("ray", ray is not None, "pip install 'resynth-index[scale]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _generators(lab: Lab, *names: str):
    rows = plans.runnable_generators(lab)
    return [row for row in rows if not names or row.name in names]


def _pictures(lab_dir: Path, captions: list[str], *names: str) -> dict[tuple, np.ndarray]:
    """(caption hash, generator, n-th resynthesis) -> pixels, for every stored resynthesis."""
    texts = plans.captions_by_hash(captions)
    with Lab.open(lab_dir) as lab:
        plan = plans.plan_resyntheses(lab, list(texts), _generators(lab, *names))
        assert plan.missing_count() == 0
        return {
            (caption, name, n): np.asarray(lab.stored_image(image_id), dtype=np.int16)
            for (caption, name), ids in plan.stored.items()
            for n, image_id in enumerate(ids)
        }


def _resynthesis_rows(lab_dir: Path) -> list[tuple]:
    from sqlalchemy import select

    from resynth_index.store.models import ResynthesisRow

    with Lab.open(lab_dir) as lab, lab.session() as session:
        return list(
            session.execute(
                select(
                    ResynthesisRow.generator_id,
                    ResynthesisRow.caption_hash,
                    ResynthesisRow.settings_hash,
                    ResynthesisRow.seed,
                )
            )
        )


def _assert_whole(lab_dir: Path, expected: int) -> None:
    """``expected`` resyntheses, each slot once, every image once, embedded once, indexed."""
    rows = _resynthesis_rows(lab_dir)
    assert len(rows) == expected
    assert len(set(rows)) == expected
    state = store_state(lab_dir)
    assert state.blobs == state.images
    assert state.embedded_images == state.embeddings == len(state.images)
    assert index_problems(lab_dir) == []
    check = rsx(lab_dir, "check")
    assert check.exit_code == 0, check.output


def test_local_is_the_default_and_ray_options_need_ray(toy_lab, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS), encoding="utf-8")
    result = rsx(toy_lab, "resynthesize", "--captions", str(captions), "--ray-address", "auto")
    assert result.exit_code == 2
    assert "--executor ray" in result.output


@pytest.mark.slow
def test_ray_draws_the_same_pictures_as_local(toy_lab, tmp_path, ray_address, monkeypatch):
    other = copy_lab(toy_lab, tmp_path / "ray-lab")
    texts = plans.captions_by_hash(CAPTIONS)
    with Lab.open(toy_lab) as lab:
        local = resynthesis.resynthesize(
            lab, texts, _generators(lab, "toy-a", "toy-b"), batch_size=3
        )
    # the coordinator loads its embedder while the actors start, not once the first batch is back
    embedder_ready: list[bool] = []
    run = RayResynthesizer._landed

    def waiting_for_results(runner, *args, **kwargs):
        embedder_ready.append(runner.lab._embedder is not None)
        return run(runner, *args, **kwargs)

    monkeypatch.setattr(RayResynthesizer, "_landed", waiting_for_results)
    with Lab.open(other) as lab, RayResynthesizer(lab, RayOptions(actors=2)) as runner:
        remote = runner.resynthesize(texts, _generators(lab, "toy-a", "toy-b"), batch_size=3)
    assert embedder_ready == [True]
    assert (remote.generated, remote.reused) == (local.generated, local.reused)
    assert local.generated > 0
    mine, theirs = (
        _pictures(toy_lab, CAPTIONS, "toy-a", "toy-b"),
        _pictures(other, CAPTIONS, "toy-a", "toy-b"),
    )
    assert mine.keys() == theirs.keys()
    for key, pixels in mine.items():
        assert np.abs(pixels - theirs[key]).max() <= 1, key  # the CPU batching tolerance
    _assert_whole(other, local.generated)

    with Lab.open(other) as lab, RayResynthesizer(lab, RayOptions(actors=2)) as runner:
        again = runner.resynthesize(texts, _generators(lab, "toy-a", "toy-b"), batch_size=3)
    assert (again.generated, again.reused) == (0, local.generated)


@pytest.mark.slow
def test_actors_read_no_weight_file_the_coordinator_knows(toy_lab, ray_address):
    """The coordinator lends the digests its lab remembers (``distributed/lent_digests.py``): an
    actor on its node fingerprints the generator without reading a weight file."""
    from resynth_index.models.generators import diffusers

    files = diffusers.fingerprint_files(toy_lab / "models" / "toy-toy-a")
    when = 1_700_000_000 * 10**9  # settled long ago: the lab remembers what it reads
    for path in files:
        os.utime(path, ns=(when, when))
    texts = plans.captions_by_hash(CAPTIONS[:2])
    with Lab.open(toy_lab) as lab, RayResynthesizer(lab, RayOptions(actors=1)) as runner:
        [row] = _generators(lab, "toy-a")
        lab.generator_model(row)  # fingerprinted here first: every file remembered
        summary = runner.resynthesize(texts, [row], batch_size=2)
        hashed = ray.get(runner.pool[0].files_hashed.remote())
    assert summary.generated > 0 and len(files) > 0
    assert hashed == []


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_restarted_and_nothing_is_lost(toy_lab, ray_address):
    from resynth_index.pipeline.plans import ProgressEvent

    texts = plans.captions_by_hash(CAPTIONS + [f"{c}, again" for c in CAPTIONS])
    killed: list[int] = []
    after: list[int] = []
    with Lab.open(toy_lab) as lab, RayResynthesizer(lab, RayOptions(actors=2)) as runner:

        def kill_first_actor(event: ProgressEvent) -> None:
            if event.done and not killed:  # the first batch is committed; more are in flight
                killed.append(runner.pool_pids[0])
                os.kill(runner.pool_pids[0], signal.SIGKILL)
            elif event.done == event.total:  # every batch stored: the actor came back
                after.append(ray.get(runner.pool[0].pid.remote()))

        expected = plans.plan_resyntheses(lab, list(texts), _generators(lab, "toy-a"))
        summary = runner.resynthesize(
            texts, _generators(lab, "toy-a"), batch_size=1, events=kill_first_actor
        )
    assert killed and after and after[0] != killed[0]
    assert summary.generated == expected.missing_count() >= len(texts)
    _assert_whole(toy_lab, summary.generated)


@pytest.mark.slow
def test_a_coordinator_killed_mid_run_leaves_a_lab_a_rerun_finishes(toy_lab, tmp_path, ray_address):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS), encoding="utf-8")
    args = [
        "resynthesize",
        "--captions",
        str(captions),
        "--generator",
        "toy-a",
        "--batch-size",
        "1",
    ]
    ray_args = ["--executor", "ray", "--ray-address", ray_address, "--ray-actors", "2"]
    # the coordinator kills itself once the first batch is stored whole (blobs, rows,
    # embeddings), halfway through writing the second batch's first blob
    killed = rsx_process(toy_lab, *args, *ray_args, env={CRASH_ENV: "blob-write:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    kept = len(_resynthesis_rows(toy_lab))
    assert kept >= 1
    untouched = copy_lab(toy_lab, tmp_path / "lab-as-killed")

    # what is stored is sound and check accepts it: the derived index lags (it is brought up
    # to date at the end of a run, as on the local path), which check notes, not a problem
    check = rsx(toy_lab, "check")
    assert check.exit_code == 0, check.output
    assert "problem" not in check.output and "embedding(s) stored since" in check.output
    assert rsx(toy_lab, "index", "sync").exit_code == 0
    synced = rsx(toy_lab, "check")
    assert synced.exit_code == 0 and "stored since" not in synced.output, synced.output

    for lab_dir in (toy_lab, untouched):  # repaired first, or re-run straight away
        rerun = rsx(lab_dir, *args, *ray_args)
        assert rerun.exit_code == 0, rerun.output
        found = re.search(r"(\d+) generated, (\d+) already", rerun.output)
        generated, reused = map(int, found.groups())
        assert reused == kept and generated > 0
        _assert_whole(lab_dir, generated + reused)


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["postgresql"])
def test_two_ray_runs_at_once_on_one_postgresql_lab(engine_lab, tmp_path, ray_address):
    import subprocess
    import sys

    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n".join(CAPTIONS[:3]), encoding="utf-8")
    second.write_text("\n".join(CAPTIONS[1:]), encoding="utf-8")  # two captions overlap
    with Lab.open(engine_lab) as lab:
        texts = plans.captions_by_hash(CAPTIONS)
        expected = plans.plan_resyntheses(lab, list(texts), _generators(lab, "toy-a"))
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "resynth_index", "--lab", str(engine_lab), "resynthesize"]
            + ["--captions", str(captions), "--generator", "toy-a", "--batch-size", "1"]
            + ["--executor", "ray", "--ray-address", ray_address, "--ray-actors", "1"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for captions in (first, second)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    _assert_whole(engine_lab, expected.missing_count())


@pytest.mark.slow
def test_rsx_query_on_ray_answers_as_the_local_executor(
    toy_lab, tmp_path, make_toy_image, ray_address
):
    """`rsx query --executor ray`: the query's resyntheses are made by the actors and stored here;
    the answer (verdict, generated count, distances within the CPU batching tolerance) and the
    stored rows are those of a local query of the same lab; a second query generates nothing."""
    import json

    image = make_toy_image("toy-b", CAPTIONS[1])
    other = copy_lab(toy_lab, tmp_path / "ray-lab")
    args = ["query", str(image), "--caption", CAPTIONS[1], "--candidates", "toy-a,toy-b", "--json"]
    local = rsx(toy_lab, *args, "--resyntheses", "3")
    assert local.exit_code == 0, local.output
    on_ray = rsx(
        other, *args, "--resyntheses", "3", "--executor", "ray", "--ray-address", ray_address,
        "--ray-actors", "2",
    )  # fmt: skip
    assert on_ray.exit_code == 0, on_ray.output
    here, there = json.loads(local.stdout), json.loads(on_ray.stdout)
    assert there["verdict"] == here["verdict"] == "toy-b"
    assert there["generated"] == here["generated"] == 6
    distance = {r["generator"]: r["distance"] for r in here["ranking"]}
    assert {r["generator"] for r in there["ranking"]} == set(distance) == {"toy-a", "toy-b"}
    for ranked in there["ranking"]:
        assert ranked["distance"] == pytest.approx(distance[ranked["generator"]], abs=1e-3)
    assert sorted(_resynthesis_rows(other)) == sorted(_resynthesis_rows(toy_lab))
    again = rsx(
        other, *args, "--resyntheses", "3", "--executor", "ray", "--ray-address", ray_address
    )
    assert again.exit_code == 0 and json.loads(again.stdout)["generated"] == 0
    assert rsx(other, "index", "sync").exit_code == 0
    _assert_whole(other, expected=6)


@pytest.mark.slow
def test_rsx_ingest_on_ray_stores_the_vectors_a_local_ingest_stores(toy_lab, tmp_path, ray_address):
    """`rsx ingest --executor ray`: the files are read and stored here, the lab's embedder runs
    on the actors; the rows and the vectors are those of a local ingest of the same files."""
    from hostile_files import good_images

    from resynth_index.store import embeddings

    good_images(tmp_path / "in", 7, seed=40)
    other = copy_lab(toy_lab, tmp_path / "ray-lab")
    local = rsx(toy_lab, "ingest", str(tmp_path / "in"), "--batch-size", "3")
    ray_args = ["--executor", "ray", "--ray-address", ray_address, "--ray-actors", "2"]
    on_ray = rsx(other, "ingest", str(tmp_path / "in"), "--batch-size", "3", *ray_args)
    assert local.exit_code == 0 and on_ray.exit_code == 0, (local.output, on_ray.output)
    assert "7 added" in on_ray.output and "7 added" in local.output

    def vectors(lab_dir: Path) -> dict[str, np.ndarray]:
        from sqlalchemy import select

        from resynth_index.store.models import ImageRow

        with Lab.open(lab_dir) as lab, lab.session() as session:
            sha_of = dict(session.execute(select(ImageRow.id, ImageRow.sha256)).all())
            found = embeddings.vectors_by_image_id(session, list(sha_of), lab.fingerprint)
        return {sha_of[image_id]: vector for image_id, vector in found.items()}

    mine, theirs = vectors(toy_lab), vectors(other)
    assert mine.keys() == theirs.keys() and len(mine) >= 7
    for sha, vector in mine.items():
        np.testing.assert_allclose(theirs[sha], vector, atol=1e-5)
    _assert_whole(other, expected=len(_resynthesis_rows(other)))


@pytest.mark.slow
def test_a_lab_named_by_a_relative_path_runs_on_ray(toy_lab, tmp_path, ray_address):
    """``--lab ./lab`` is relative to the coordinator's folder; the actors, started elsewhere,
    get the generators' folders made absolute."""
    import subprocess
    import sys

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[:2]), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "resynth_index", "--lab", toy_lab.name, "resynthesize"]
        + ["--captions", str(captions), "--generator", "toy-a", "--batch-size", "1"]
        + ["--executor", "ray", "--ray-address", ray_address, "--ray-actors", "1"],
        cwd=toy_lab.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 generated" in done.stdout
    _assert_whole(toy_lab, 2)
