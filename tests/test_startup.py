"""`rsx --help` and other light commands must not import the heavy model libraries."""

import subprocess
import sys

HEAVY = ("torch", "faiss", "diffusers", "transformers", "open_clip")


def _imported_modules(*args: str) -> set[str]:
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "resynth_index", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set()
    for line in completed.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return modules


def test_help_imports_no_model_library() -> None:
    modules = _imported_modules("--help")
    assert "click" in modules  # the parse worked: importtime output was read
    assert not modules.intersection(HEAVY)


def test_generator_list_imports_no_model_library(tmp_path) -> None:
    from resynth_index.config import LabSettings
    from resynth_index.store import migrate
    from resynth_index.store.engine import make_engine, sqlite_url

    engine = make_engine(sqlite_url(tmp_path / "lab.sqlite"))
    migrate.upgrade(engine)
    engine.dispose()
    LabSettings(
        embedder={"arch": "", "weights": "local-dir:x"},
        embedder_fingerprint="b" * 64,
        embedder_dim=2,
    ).save(tmp_path)
    modules = _imported_modules("--lab", str(tmp_path), "generator", "list")
    assert "sqlalchemy" in modules
    assert not modules.intersection(HEAVY)
