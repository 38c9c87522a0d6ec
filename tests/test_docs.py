"""The documentation cannot drift: the command reference is the commands' own ``--help``, the
README stays a front page whose set-up commands are the ones CI runs, and the MkDocs site builds
with ``--strict`` (a broken link, a missing anchor or a page left out of the navigation fails)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from services import require_service

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_CONFIG = ROOT / "mkdocs.yml"
COMMAND_REFERENCE_SCRIPT = ROOT / "scripts" / "command_reference.py"
CI_SCRIPT = ROOT / ".ci" / "run"

README_MAX_LINES = 250
DEMO_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/rsx demo"
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && "
    "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q"
)
# [text](target) and ![alt](target), with an optional "title"; targets hold no spaces
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _command_reference_module():
    """``scripts/command_reference.py``, imported by path (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("command_reference", COMMAND_REFERENCE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_reference_matches_the_commands() -> None:
    page = DOCS / "commands.md"
    assert page.is_file(), "docs/commands.md is missing: run python scripts/command_reference.py"
    rendered = _command_reference_module().render()
    assert page.read_text(encoding="utf-8") == rendered, (
        "docs/commands.md differs from the commands' --help:"
        " run python scripts/command_reference.py"
    )


def test_readme_is_a_front_page_with_the_set_up_commands() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail into docs/"
    )
    for name, command in (("demo", DEMO_COMMAND), ("test", TEST_COMMAND)):
        assert command in lines, f"README.md lost the {name} set-up command (verbatim, own line)"


def test_ci_runs_the_readme_test_command_and_builds_the_docs() -> None:
    lines = CI_SCRIPT.read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in lines, ".ci/run no longer runs the README's test command verbatim"
    builds = [line for line in lines if "mkdocs build" in line]
    assert builds, ".ci/run does not build the documentation"
    for line in builds:
        assert "--strict" in line, f".ci/run builds the docs without --strict: {line}"
        # mkdocs 1.6: --quiet drops warnings before --strict counts them, so nothing would fail
        assert " -q" not in line and "--quiet" not in line, f"--quiet disarms --strict: {line}"


def test_readme_relative_links_point_at_files() -> None:
    text = README.read_text(encoding="utf-8")
    targets = MARKDOWN_LINK.findall(text)
    assert targets, "no links found in README.md (has the link pattern broken?)"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the README itself
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _require_mkdocs() -> None:
    available = importlib.util.find_spec("mkdocs") is not None
    require_service(
        "mkdocs", available, "mkdocs is not installed (pip install -e '.[dev]' brings it)"
    )


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``config`` into ``site`` (no --quiet: it disarms --strict)."""
    command = ["build", "--strict", "--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    _require_mkdocs()
    result = _build(MKDOCS_CONFIG, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    assert "WARNING" not in output, output
    for page in ("index", "tutorial", "commands", "architecture"):
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), f"the site lacks {page}"
    assert (tmp_path / "site" / "architecture.svg").is_file()


@pytest.mark.parametrize(
    "breakage",
    ["[a page that is not there](no-such-page.md)", "[an anchor](concepts.md#no-such-anchor)"],
)
def test_docs_build_fails_on_a_broken_link(tmp_path: Path, breakage: str) -> None:
    """The strictness is real: the same site with one broken link does not build."""
    _require_mkdocs()
    copy = tmp_path / "project"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy2(MKDOCS_CONFIG, copy / "mkdocs.yml")
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text(encoding="utf-8") + f"\n{breakage}\n", encoding="utf-8")
    result = _build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0, "a broken link did not fail mkdocs build --strict"
    assert "index.md" in result.stdout + result.stderr
