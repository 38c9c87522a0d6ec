"""Batched resynthesis (`rsx resynthesize`, the query path) and the pipelined ingest."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import func, select

from resynth_index.cli import cli
from resynth_index.lab import Lab
from resynth_index.store.models import EmbeddingRow, ImageRow, ResynthesisRow

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop

CAPTIONS = ["a red barn in snow", "a bowl of lemons", "a harbour at night"]


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.int16) for image in images])


def count(lab: Path, model) -> int:
    with Lab.open(lab) as opened, opened.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_resynthesize_a_captions_file_then_queries_generate_nothing(toy_lab, make_toy_image):
    captions = toy_lab.parent / "captions.txt"
    captions.write_text("\n".join([*CAPTIONS, "", CAPTIONS[0]]) + "\n")  # blank and repeat
    result = rsx(toy_lab, "resynthesize", "--captions", str(captions), "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "3 caption(s) x 3 generator(s): 9 generated, 0 already stored" in result.output
    assert count(toy_lab, ResynthesisRow) == 9
    assert count(toy_lab, EmbeddingRow) == count(toy_lab, ImageRow) == 9

    again = rsx(toy_lab, "resynthesize", "--captions", str(captions))
    assert "0 generated, 9 already stored" in again.output

    image = make_toy_image("toy-c", CAPTIONS[1])
    query = rsx(toy_lab, "query", "--json", str(image), "--caption", CAPTIONS[1])
    [answer] = [json.loads(line) for line in query.stdout.splitlines()]
    assert answer["generated"] == 0 and answer["reused"] == 3
    assert answer["verdict"] == "toy-c"
    assert rsx(toy_lab, "check").exit_code == 0


def test_pending_fills_what_queries_asked_for(toy_lab, make_toy_image, tmp_path):
    image = make_toy_image("toy-a", CAPTIONS[2])
    first = rsx(toy_lab, "query", "--json", str(image), "--caption", CAPTIONS[2], "--no-generate")
    assert json.loads(first.stdout)["not_generated"] == ["toy-a", "toy-b", "toy-c"]
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0

    only_a = rsx(toy_lab, "resynthesize", "--pending", "--generator", "toy-a")
    assert only_a.exit_code == 0, only_a.output
    assert "1 caption(s) x 1 generator(s): 1 generated" in only_a.output
    rest = rsx(toy_lab, "resynthesize", "--pending")  # the imported one is not runnable
    assert "1 caption(s) x 3 generator(s): 2 generated, 1 already stored" in rest.output

    done = rsx(toy_lab, "query", "--json", str(image), "--caption", CAPTIONS[2])
    answer = json.loads(done.stdout.splitlines()[0])
    assert answer["generated"] == 0 and answer["verdict"] == "toy-a"
    assert answer["pending"] == ["mj"]


def test_bad_input_is_one_line(toy_lab, tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("prompt\nsomething\n")
    result = rsx(toy_lab, "resynthesize", "--captions", str(table))
    assert result.exit_code == 1 and "'caption' column" in result.output
    assert "Traceback" not in result.output
    assert rsx(toy_lab, "resynthesize").exit_code == 2  # neither source
    assert rsx(toy_lab, "resynthesize", "--pending", "--captions", str(table)).exit_code == 2
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    table.write_text("caption,other\nx,y\n")
    refused = rsx(toy_lab, "resynthesize", "--captions", str(table), "--generator", "mj")
    assert refused.exit_code == 1 and "imported" in refused.output
    missing = rsx(toy_lab, "resynthesize", "--captions", str(tmp_path / "nope.txt"))
    assert missing.exit_code == 1 and "nope.txt" in missing.output


def test_a_batch_is_stored_while_the_next_is_generated_and_batching_changes_no_pixel(
    toy_lab, monkeypatch
):
    """The overlap is forced, not timed: storing batch k waits until batch k+1's generation has
    begun (a sequential loop would never let it: the wait times out and the log shows it). The
    toy generator runs on the CPU, where batches are stored in line, so the test takes the
    accelerator's choice."""
    import threading

    from resynth_index.pipeline import resynthesis
    from resynth_index.pipeline.plans import runnable_generators
    from resynth_index.pipeline.resynthesis import resynthesize

    monkeypatch.setattr(resynthesis, "stores_beside_generation", lambda device: True)
    captions = {f"h{i}": f"caption number {i}" for i in range(5)}
    log: list[str] = []
    began = [threading.Event() for _ in range(4)]  # batch k's generation has begun
    real_store = resynthesis.store_resyntheses

    def slow_store(lab, row, settings_hash, chunk, *args, **kwargs):
        batch = len([e for e in log if e.startswith("store")])
        if batch < 2 and not began[batch + 1].wait(timeout=30):  # the last batch has no next
            log.append(f"store {batch} gave up waiting")
        ids = real_store(lab, row, settings_hash, chunk, *args, **kwargs)
        log.append(f"store {batch}")
        return ids

    monkeypatch.setattr(resynthesis, "store_resyntheses", slow_store)
    with Lab.open(toy_lab) as lab:
        [row] = [r for r in runnable_generators(lab) if r.name == "toy-b"]
        model = lab.generator_model(row)
        real_generate = model.generate
        seen: list[tuple[int, int]] = []  # (batch length, resyntheses stored before it)

        def spy(requests, batch_size=8, progress=None):
            with lab.session() as session:
                stored = session.scalar(select(func.count()).select_from(ResynthesisRow))
            seen.append((len(requests), stored))
            log.append(f"generate {len(seen) - 1}")
            began[len(seen) - 1].set()
            return real_generate(requests, batch_size=batch_size, progress=progress)

        model.generate = spy
        summary = resynthesize(lab, captions, [row], batch_size=2)
        assert summary.generated == 5
        # batch 0 is stored while batch 1 is generated; batch 2 waits for batch 0 to be stored
        assert log == ["generate 0", "generate 1", "store 0", "generate 2", "store 1", "store 2"]
        assert seen == [(2, 0), (2, 0), (1, 2)]
        with lab.session() as session:
            sha_of = dict(
                session.execute(
                    select(ResynthesisRow.caption_hash, ImageRow.sha256).join(
                        ImageRow, ImageRow.id == ResynthesisRow.image_id
                    )
                ).all()
            )
        from resynth_index.models.generators.protocol import GenerationRequest

        batched = pixels([Image.open(io.BytesIO(lab.blobs.read(sha_of[h]))) for h in captions])
        requests = [GenerationRequest(caption, 0) for caption in captions.values()]
        alone = pixels(real_generate(requests, batch_size=1))
    # Batching is not bit-exact on a CPU (tests/test_generators.py::test_batch_independence):
    # oneDNN picks kernels by batch size and a rare pixel rounds the other way, by one level.
    assert batched.shape == alone.shape == (5, *batched.shape[1:])
    assert np.abs(batched - alone).max() <= 1
    assert np.mean(batched != alone) < 0.001


def _logged_resynthesize(lab, monkeypatch, captions, batch_size, *, before_store=None, log=None):
    """``resynthesize`` by toy-b with every generate and store call logged in order (in ``log``
    when given: it is kept when the call raises)."""
    from resynth_index.pipeline import resynthesis
    from resynth_index.pipeline.plans import runnable_generators
    from resynth_index.pipeline.resynthesis import resynthesize

    log = [] if log is None else log
    real_store = resynthesis.store_resyntheses

    def logged_store(*args, **kwargs):
        batch = len([e for e in log if e.startswith("store")])
        if before_store is not None:
            before_store(batch)
        ids = real_store(*args, **kwargs)
        log.append(f"store {batch}")
        return ids

    monkeypatch.setattr(resynthesis, "store_resyntheses", logged_store)
    [row] = [r for r in runnable_generators(lab) if r.name == "toy-b"]
    model = lab.generator_model(row)
    real_generate = model.generate

    def logged_generate(requests, batch_size=8, progress=None):
        log.append(f"generate {len([e for e in log if e.startswith('generate')])}")
        return real_generate(requests, batch_size=batch_size, progress=progress)

    model.generate = logged_generate
    try:
        return log, resynthesize(lab, captions, [row], batch_size=batch_size)
    finally:
        model.generate = real_generate


def test_on_a_cpu_each_batch_is_stored_before_the_next_is_generated(toy_lab, monkeypatch):
    captions = {f"h{i}": f"caption number {i}" for i in range(5)}
    with Lab.open(toy_lab) as lab:
        log, summary = _logged_resynthesize(lab, monkeypatch, captions, 2)
    assert summary.generated == 5
    assert log == ["generate 0", "store 0", "generate 1", "store 1", "generate 2", "store 2"]
    assert count(toy_lab, ResynthesisRow) == 5


@pytest.mark.parametrize("beside", [False, True], ids=["in-line", "beside"])
def test_ctrl_c_while_a_batch_is_stored_keeps_that_batch_whole(
    toy_lab, monkeypatch, beside, ctrl_c_raises
):
    """A real SIGINT comes as the first batch begins to be stored: in line (the CPU's way) it is
    held back until the batch is stored, beside (an accelerator's) it stops the generation of the
    next batch while the writer thread finishes this one. Either way nothing more is generated
    and the first batch is stored whole."""
    import os
    import signal
    import time

    from resynth_index.pipeline import resynthesis

    monkeypatch.setattr(resynthesis, "stores_beside_generation", lambda device: beside)

    log: list[str] = []

    def interrupt_first(batch):
        if batch == 0:
            deadline = time.monotonic() + 30  # beside: once the next batch is being generated
            while beside and "generate 1" not in log and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)

    captions = {f"h{i}": f"caption number {i}" for i in range(5)}
    with Lab.open(toy_lab) as lab, pytest.raises(KeyboardInterrupt):
        _logged_resynthesize(lab, monkeypatch, captions, 2, before_store=interrupt_first, log=log)
    assert log == (["generate 0", "generate 1", "store 0"] if beside else ["generate 0", "store 0"])
    assert count(toy_lab, ResynthesisRow) == 2  # the first batch, whole
    assert count(toy_lab, EmbeddingRow) == count(toy_lab, ImageRow) == 2
    assert rsx(toy_lab, "check").exit_code == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def _noise_images(folder: Path, n: int, size: int = 48) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img-{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_pipelined_ingest_embeds_like_the_embedder_and_skips_on_rerun(toy_lab, tmp_path):
    from resynth_index.pipeline.ingest import ingest
    from resynth_index.pipeline.ingest_items import expand_paths

    paths = _noise_images(tmp_path / "in", 7)
    (tmp_path / "in" / "zz-broken.png").write_bytes(b"not an image")
    with Lab.open(toy_lab) as lab:
        summary = ingest(lab, expand_paths([tmp_path / "in"]), batch_size=3)
        assert (summary.added, summary.skipped, summary.failed) == (7, 0, 1)
        assert "zz-broken.png" in summary.failures[0].path
        expected = lab.embedder.embed([Image.open(p).convert("RGB") for p in paths])
        with lab.session() as session:
            rows = dict(
                session.execute(
                    select(ImageRow.sha256, EmbeddingRow.vector).join(
                        EmbeddingRow, EmbeddingRow.image_id == ImageRow.id
                    )
                ).all()
            )
        # a batch's rows go in ordered by digest: match each file to its row by its SHA-256
        shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
        assert sorted(rows) == sorted(shas)
        stored = np.stack([np.frombuffer(rows[sha], dtype="<f4") for sha in shas])
        np.testing.assert_allclose(stored, expected, atol=1e-5)
        again = ingest(lab, expand_paths(paths), batch_size=2)
        assert (again.added, again.skipped, again.failed) == (0, 7, 0)
    assert rsx(toy_lab, "check").exit_code == 0


def test_a_loader_error_reaches_the_caller_and_stops_the_thread(toy_lab, tmp_path, monkeypatch):
    import threading

    from resynth_index.pipeline import ingest as ingest_module
    from resynth_index.pipeline import ingest_items

    paths = _noise_images(tmp_path / "in", 4)

    def boom(*args, **kwargs):
        raise MemoryError("decoder exploded")

    monkeypatch.setattr(ingest_module, "load_image_file", boom)
    with Lab.open(toy_lab) as lab, pytest.raises(MemoryError, match="decoder exploded"):
        ingest_module.ingest(lab, ingest_items.expand_paths(paths), batch_size=1)
    assert not [t for t in threading.enumerate() if t.name == "rsx-ingest-loader"]


def test_a_resynthesis_another_writer_stored_first_is_the_one_the_plan_holds(
    toy_lab, make_toy_image
):
    """Generation lost the race for its slot: the plan must hold the winner's image."""
    from resynth_index.media.captions import caption_hash
    from resynth_index.pipeline.ingest import ingest
    from resynth_index.pipeline.ingest_items import IngestItem
    from resynth_index.pipeline.plans import plan_resyntheses
    from resynth_index.pipeline.resynthesis import generate_missing

    caption = "a lighthouse on a cliff at dusk"
    digest = caption_hash(caption)
    theirs = make_toy_image("toy-b", caption, seed=4242)
    with Lab.open(toy_lab) as lab:
        [row] = [r for r in lab.generators() if r.name == "toy-a"]
        plan = plan_resyntheses(lab, [digest], [row], resyntheses=1)
        assert dict(plan.missing) == {"toy-a": [(digest, 0)]}
        # meanwhile another writer stores its own image as toy-a's seed-0 resynthesis
        with Lab.open(toy_lab) as other:
            item = IngestItem(theirs, "resynthesis", "toy-a", caption, seed=0)
            assert ingest(other, [item]).added == 1
        made = generate_missing(lab, plan, [row], {digest: caption})
        lab.sync_index()
        with lab.session() as session:
            slot = dict(
                session.execute(
                    select(ResynthesisRow.seed, ResynthesisRow.image_id).where(
                        ResynthesisRow.generator_id == row.id
                    )
                ).all()
            )
            theirs_id = session.scalar(select(ImageRow.id).where(ImageRow.sha256 == sha(theirs)))
    assert slot == {0: theirs_id}
    assert made == [theirs_id]
    assert plan.stored[(digest, "toy-a")] == [theirs_id]  # never an image without its row
    assert plan.sha256[theirs_id] == sha(theirs)
    check = rsx(toy_lab, "check")  # the losing image is stored whole (row, blob, embedding)
    assert check.exit_code == 0, check.output


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
