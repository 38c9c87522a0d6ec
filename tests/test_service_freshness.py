"""A resident service never works from stale state: a generator's settings changed by another
process are used at once (never the old model under the new settings' key), and the upload
files a killed service left behind are removed when the next one starts."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
from serving import (  # noqa: E402
    make_toy_images,
    rsx_command,
    running_service,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("serve_extra")]


def _post(client, image: Path, **data: str):
    files = {"image": ("suspect.png", image.read_bytes(), "image/png")}
    return client.post("/v1/query", files=files, data=data)


def test_a_generator_set_from_another_process_is_used_at_once(toy_lab: Path, tmp_path: Path):
    from io import BytesIO

    from resynth_index.lab import Lab
    from resynth_index.media.captions import caption_hash
    from resynth_index.models.generators.factory import settings_hash
    from resynth_index.models.generators.protocol import GenerationRequest
    from resynth_index.store import repository

    [image] = make_toy_images(toy_lab, tmp_path / "images", [("toy-a", "a red kite", 1000)])
    with running_service(toy_lab) as service, service.client() as client:
        warm = _post(client, image, caption="a red kite", candidates="toy-a")
        assert warm.status_code == 200, warm.text
        assert warm.json()["generation"]["toy-a"]["steps"] == 4  # the model is loaded, warm
        changed = subprocess.run(
            rsx_command(toy_lab, "generator", "set", "toy-a", "--steps", "7"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert changed.returncode == 0, changed.stderr
        after = _post(client, image, caption="a blue kite", candidates="toy-a")
        assert after.status_code == 200, after.text
        assert after.json()["generation"]["toy-a"]["steps"] == 7

    with Lab.open(toy_lab) as lab:
        [row] = [r for r in lab.generators() if r.name == "toy-a"]
        with lab.session() as session:
            [stored] = repository.stored_resyntheses(
                session, [caption_hash("a blue kite")], [row.id]
            )
        assert stored.settings_hash == settings_hash(row.kind, row.settings_json, lab.device)
        kept = Image.open(BytesIO(lab.blobs.read(stored.sha256))).convert("RGB")
        fresh = lab.generator_model(row).generate([GenerationRequest("a blue kite", stored.seed)])
    assert np.array_equal(np.asarray(kept), np.asarray(fresh[0].convert("RGB")))


def test_uploads_left_by_a_killed_service_are_removed_at_the_next_start(
    toy_lab: Path, tmp_path: Path
):
    with running_service(toy_lab) as service:
        uploads = _uploads_folders(toy_lab)
        assert len(uploads) == 1  # the service's own, inside the lab
        (uploads[0] / "half-received.png").write_bytes(b"\x89PNG half")
        service.stop(signal.SIGKILL)  # no shutdown: nothing cleans up
    assert uploads[0].exists()
    with running_service(toy_lab):
        assert not uploads[0].exists()  # the dead service's folder went at start
        assert len(_uploads_folders(toy_lab)) == 1
    assert _uploads_folders(toy_lab) == []  # a clean stop removes its own
    shutil.rmtree(toy_lab / "uploads", ignore_errors=True)


def _uploads_folders(lab: Path) -> list[Path]:
    folder = lab / "uploads"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
