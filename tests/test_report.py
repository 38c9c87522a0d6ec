"""The HTML report says what is wrong with a stored image instead of showing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from resynth_index.lab import Lab
from resynth_index.pipeline.query import QueryResult, run_queries
from resynth_index.report import render_report

pytestmark = pytest.mark.slow  # a query end to end, then the report: not in the quick loop

CAPTION = "a red boat on a calm lake"


def test_missing_and_altered_blobs_are_told_apart(toy_lab: Path, make_toy_image) -> None:
    image = make_toy_image("toy-a", CAPTION)
    with Lab.open(toy_lab) as lab:
        [result] = run_queries(lab, [image], caption=CAPTION)
        assert isinstance(result, QueryResult)
        intact = render_report(lab, [result])
        assert intact.count("data:image/png;base64,") == 1 + len(result.ranking)
        assert "image missing from" not in intact and "stored image altered" not in intact

        altered, missing = result.ranking[0].nearest_sha256, result.ranking[1].nearest_sha256
        path = lab.blobs.path_for(altered)
        path.chmod(0o644)
        path.write_bytes(path.read_bytes() + b"tampered")
        lab.blobs.path_for(missing).unlink()
        page = render_report(lab, [result])

    assert page.count("data:image/png;base64,") == len(result.ranking) - 1
    assert page.count("stored image altered: its bytes no longer match their SHA-256") == 1
    assert page.count("image missing from the blob store") == 1
