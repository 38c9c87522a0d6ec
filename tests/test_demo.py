"""The embedded default: the toy demo attributes every toy image to the generator that made it."""

import io

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.cli.app import StatusLine

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop


class _Terminal(StatusLine):
    """The status line as a terminal would get it: every status kept, none written."""

    shown_texts: list[str] = []

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.enabled = True

    def show(self, text: str) -> None:
        self.shown_texts.append(text)
        super().show(text)


def test_demo_attributes_every_toy_image_and_reuses_its_lab(tmp_path, monkeypatch):
    import resynth_index.cli.demo as demo_command

    monkeypatch.setattr(demo_command, "StatusLine", _Terminal)
    lab = tmp_path / "demo-lab"
    result = CliRunner().invoke(cli, ["--lab", str(lab), "demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "accuracy: 12/12 = 100.0%" in result.stdout
    assert "resyntheses generated 12" in result.stdout
    assert "Writing model shards" not in result.output  # no library progress bars
    assert (lab / "demo" / "report.html").exists()
    # on a terminal the minute of work shows, step by step, as 'rsx query' shows its own
    shown = _Terminal.shown_texts
    for step in ("building the toy generators: 0 of 4", "making the query images: 3 of 4"):
        assert step in shown
    assert "toy-d: generating 3 of 3" in shown and shown[-1].startswith("embedding: ")
    last = result.stdout.splitlines()[-1]  # how to open it, and what that needs
    assert last.endswith(f"rsx --lab {lab} serve") and "web service" in last

    again = CliRunner().invoke(cli, ["--lab", str(lab), "demo"], catch_exceptions=False)
    assert "accuracy: 12/12 = 100.0%" in again.stdout
    assert "resyntheses generated 0" in again.stdout  # every resynthesis came from the cache


def test_demo_refuses_a_real_lab(tmp_path):
    from resynth_index.config import LabSettings

    LabSettings(
        embedder={"arch": "ViT-L-14", "weights": "/x"},
        embedder_label="ViT-L-14@/x",
        embedder_fingerprint="f" * 64,
        embedder_dim=768,
    ).save(tmp_path)
    result = CliRunner().invoke(cli, ["--lab", str(tmp_path), "demo"])
    assert result.exit_code == 1
    assert "real lab" in result.output


def test_saving_a_toy_model_draws_no_progress_bar_and_leaves_the_setting_alone(tmp_path, capsys):
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    from resynth_index.models.toyzoo.pipelines import save_toy_pipeline

    transformers_logging.enable_progress_bar()
    try:
        save_toy_pipeline(tmp_path / "toy", 5)
        captured = capsys.readouterr()
        assert "Writing model shards" not in captured.err + captured.out
        assert (tmp_path / "toy" / "model_index.json").exists()
        assert transformers_logging.is_progress_bar_enabled()  # the caller's choice, restored
        assert not hub_utils.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()
        save_toy_pipeline(tmp_path / "toy2", 5)
        assert not transformers_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    finally:
        transformers_logging.enable_progress_bar()
