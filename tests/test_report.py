"""The HTML report: what is wrong with a stored image, and how firm each answer is."""

from __future__ import annotations

from html import escape
from pathlib import Path

import pytest

from resynth_index.attribution.answer import QueryResult
from resynth_index.lab import Lab
from resynth_index.pipeline.query import run_queries
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


def test_the_page_says_how_firm_each_answer_is(toy_lab: Path, make_toy_image, tmp_path) -> None:
    from resynth_index import __version__
    from resynth_index.attribution.answer import CLOSED_SET_NOTE, SCORE_FOOTNOTE

    image = make_toy_image("toy-a", CAPTION)
    with Lab.open(toy_lab) as lab:
        lab.add_toy_generator("twin", 11)  # toy-a's seed: the same resyntheses, a margin of 0
        [tie] = run_queries(lab, [image], caption=CAPTION)
        assert isinstance(tie, QueryResult) and tie.verdict == "inconclusive"
        copy = tmp_path / "resynthesis-copy.png"
        by_c = next(e for e in tie.ranking if e.generator == "toy-c")
        copy.write_bytes(lab.blobs.read(by_c.nearest_sha256))
        [itself] = run_queries(lab, [copy], caption=CAPTION, candidates=["toy-b", "toy-c"])
        [bare] = run_queries(lab, [image], caption="never asked before", generate=False)
        assert isinstance(itself, QueryResult) and isinstance(bare, QueryResult)
        page = render_report(lab, [tie, itself, bare])

    tie_part, itself_part, bare_part = page.split("<section>")[1:]
    assert f" · query {tie.query_id}</h2>" in tie_part
    assert "<th>rel.score</th>" in tie_part and escape(SCORE_FOOTNOTE) in tie_part
    assert "why: toy-a and twin are exactly tied" in tie_part
    assert escape(CLOSED_SET_NOTE) in tie_part and "threshold\nnone; margin floor 0.002" in tie_part
    assert f"how the resyntheses were made by rsx {__version__}" in tie_part
    assert "<td>toy-a</td><td>1</td><td>" in tie_part and "<td>float32</td><td>0</td>" in tie_part
    warning = "this image is itself a stored resynthesis by toy-c: a distance of 0 says nothing"
    assert warning in itself_part and warning not in tie_part
    assert "no evidence: no resynthesis of this caption by toy-a, toy-b, toy-c, twin" in bare_part
    assert "rel.score" not in bare_part
