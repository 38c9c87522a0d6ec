"""A built wheel, installed without -e, carries its migrations and can create and check a lab."""

from __future__ import annotations

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
