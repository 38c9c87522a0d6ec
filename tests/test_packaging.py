"""A built wheel, installed without -e, carries every package and its migrations, and can create,
upgrade, check and query a lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_can_init_and_check_a_lab(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    [wheel] = wheels.glob("resynth_index-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resynth_index/migrations/env.py" in names
    assert "resynth_index/migrations/versions/0001_initial.py" in names
    assert "resynth_index/migrations/script.py.mako" in names
    packages = {
        str(init.parent.relative_to(ROOT)) for init in (ROOT / "resynth_index").rglob("__init__.py")
    }
    assert {p for p in packages if f"{p}/__init__.py" in names} == packages

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    run = {"env": env, "cwd": tmp_path, "capture_output": True, "text": True}
    where = subprocess.run(
        [sys.executable, "-c", "import resynth_index; print(resynth_index.__file__)"], **run
    )
    assert where.stdout.strip().startswith(str(target))
    lab = tmp_path / "lab"
    init = subprocess.run([sys.executable, "-m", "resynth_index", "--lab", str(lab), "init"], **run)
    assert init.returncode == 0, init.stderr
    check = subprocess.run(
        [sys.executable, "-m", "resynth_index", "--lab", str(lab), "check"], **run
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert (lab / "lab.sqlite").exists() and (lab / "settings.json").exists()

    # an older lab is upgraded by the installed migrations when it is opened
    rewind = (
        "import sys; from resynth_index.store import migrate; "
        "from resynth_index.store.engine import make_engine, sqlite_url; "
        "e = make_engine(sqlite_url(sys.argv[1])); migrate.downgrade(e, '0001_initial'); "
        "print(migrate.current_revision(e))"
    )
    old = subprocess.run([sys.executable, "-c", rewind, str(lab / "lab.sqlite")], **run)
    assert old.stdout.strip() == "0001_initial", old.stderr
    rsx = [sys.executable, "-m", "resynth_index", "--lab", str(lab)]
    add = subprocess.run([*rsx, "generator", "add", "toy-a", "--toy", "11"], **run)
    assert add.returncode == 0, add.stderr
    image = tmp_path / "query.png"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from PIL import Image; Image.new('RGB', (64, 64), 'red').save({str(image)!r})",
        ],
        check=True,
        **run,
    )
    query = subprocess.run(
        [*rsx, "query", str(image), "--caption", "a red square", "--json"], **run
    )
    assert query.returncode == 0, query.stderr
    [answer] = [json.loads(line) for line in query.stdout.splitlines()]
    assert answer["verdict"] == "toy-a" and answer["generated"] >= 1
