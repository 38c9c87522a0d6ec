"""Shared test set-up: no hub access, ever; toy labs built once per session and copied per test."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

# PostgreSQL and the engine-parametrised fixtures (postgres_server, engine_url, engine_lab, ...)
from postgres import (  # noqa: F401
    engine_lab,
    engine_name,
    engine_url,
    postgres_lab_template,
    postgres_server,
)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# One compute thread per process, for this process and every `rsx` the tests start (children
# inherit os.environ). On the 2-core CI machine, shared with other jobs, OpenMP threads that spin
# while waiting oversubscribe the cores (one profile showed a toy conv2d taking 24 ms). torch
# reads OMP_NUM_THREADS when it is first imported, which is after this file runs; should a plugin
# have imported it earlier, it is pinned directly.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(1)

TOY_GENERATORS = {"toy-a": 11, "toy-b": 22, "toy-c": 33}


@pytest.fixture(autouse=True)
def _no_default_lab(monkeypatch, tmp_path_factory) -> None:
    """A test that forgets --lab must never touch the user's real lab."""
    monkeypatch.setenv("RSX_LAB", str(tmp_path_factory.getbasetemp() / "no-lab-given"))


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt during the test, whatever the suite inherited: a
    shell starts a background job with SIGINT ignored, and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def serve_extra() -> None:
    """Skip (or fail, under RSX_REQUIRE_SERVICES=1) a service test without the [serve] extra."""
    from serving import skip_without_serve_extra

    skip_without_serve_extra()


@pytest.fixture(scope="session")
def toy_lab_template(tmp_path_factory) -> Path:
    """A lab with the toy embedder and three toy generators (built once; copy before use)."""
    from resynth_index.lab import Lab

    root = tmp_path_factory.mktemp("template") / "lab"
    with Lab.create(root, embedder="toy") as lab:
        for name, seed in TOY_GENERATORS.items():
            lab.add_toy_generator(name, seed)
    return root


@pytest.fixture
def toy_lab(toy_lab_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the toy lab for one test."""
    target = tmp_path / "lab"
    shutil.copytree(toy_lab_template, target)
    return target


@pytest.fixture
def make_toy_image(toy_lab: Path, tmp_path: Path):
    """Make an image with one of the lab's toy generators, at a seed resyntheses never use."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    def make(generator: str, caption: str, seed: int = 1000, name: str | None = None) -> Path:
        with Lab.open(toy_lab) as lab:
            row = next(r for r in lab.generators() if r.name == generator)
            image = lab.generator_model(row).generate([GenerationRequest(caption, seed)])[0]
        path = tmp_path / (name or f"{generator}-{seed}.png")
        image.save(path)
        return path

    return make


def copy_lab(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture
def files_hashed(monkeypatch) -> list[str]:
    """Every file the real ``hashing.hash_file`` reads from now on, by real path (this process's
    cache of generator file digests emptied, as in a new process or a new Ray actor)."""
    from resynth_index import hashing
    from resynth_index.models.generators import diffusers

    calls: list[str] = []
    real = hashing.hash_file

    def counting(path):
        calls.append(os.path.realpath(path))
        return real(path)

    monkeypatch.setattr(hashing, "hash_file", counting)
    diffusers._file_digests.clear()
    return calls


@pytest.fixture
def head_engine(tmp_path: Path):
    """A lab database (``tmp_path/lab.sqlite``) at the head revision, with no lab around it."""
    from resynth_index.store import migrate
    from resynth_index.store.engine import make_engine, sqlite_url

    engine = make_engine(sqlite_url(tmp_path / "lab.sqlite"))
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def memory(head_engine):
    """The memory of digests (``StoredDigests``) of a lab database at the head revision."""
    from resynth_index.store.digests import StoredDigests

    return StoredDigests(head_engine)
