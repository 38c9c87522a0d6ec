"""`rsx serve`'s web page in a real headless Chromium (Debian's, driven by Playwright).

Upload a toy image, watch the progress, read the verdict the page shows; attacker-controlled
text (a prompt in the file's metadata) stays text; the history and generators pages and the
work-order download; and the login form with a token, whose cookie is HttpOnly and SameSite.
The answer's screenshot is saved in tests/artifacts/ (gitignored); with RSX_UPDATE_DOCS=1 it is
also copied to docs/service.png, the README's picture (tests never change tracked files otherwise).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
from services import require_service  # noqa: E402
from serving import make_toy_images, running_service, skip_without_serve_extra  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
HOSTILE_PROMPT = '<img src=x onerror="window.pwned=1">a lighthouse</textarea><script>window.pwned=2'
TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def browser():
    skip_without_serve_extra()
    require_service(
        "chromium",
        CHROMIUM.is_file(),
        f"no {CHROMIUM}: apt-get install -y chromium (Debian's package; never playwright install)",
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        require_service("playwright", False, f"pip install playwright ({error})")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def site(toy_lab_template: Path, tmp_path_factory):
    """A served copy of the toy lab (a wide gather window, so the progress shows a while), with
    a toy image and an image whose embedded prompt is hostile markup."""
    from PIL import PngImagePlugin

    root = tmp_path_factory.mktemp("service-page")
    lab = root / "lab"
    shutil.copytree(toy_lab_template, lab)
    [image] = make_toy_images(lab, root / "images", [("toy-b", "a red bicycle", 1000)])
    hostile = root / "images" / "hostile.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{HOSTILE_PROMPT}\nSteps: 4, Model: <b>evil</b>")
    info.add_text("Software", "<script>window.pwned=3</script>")
    from PIL import Image

    Image.open(image).save(hostile, pnginfo=info)
    with running_service(lab, "--gather-ms", "1200") as service:
        yield {"service": service, "image": image, "hostile": hostile}


def _page(browser, **context_args):
    context = browser.new_context(viewport={"width": 1100, "height": 900}, **context_args)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("dialog", lambda dialog: pytest.fail(f"a dialog opened: {dialog.message}"))
    return context, page


def _ask(page, url: str, image: Path, caption: str | None) -> str:
    """Upload on the query page, wait for the answer's page; the verdict it shows."""
    page.goto(url + "/")
    page.set_input_files("#image", str(image))
    # the preview shows once the browser has decoded the chosen file: wait for it, never poll once
    page.wait_for_selector("#preview", state="visible")
    if caption is not None:
        page.fill("#caption", caption)
    page.click("#submit")
    page.wait_for_function(
        "() => !document.getElementById('progress').hidden &&"
        " /queued|waiting|captioning|generating|embedding/"
        ".test(document.getElementById('stage').textContent)"
    )
    page.wait_for_url("**/queries/*")
    return page.locator("#verdict").inner_text()


def test_the_page_shows_the_verdict_of_an_uploaded_image(browser, site) -> None:
    service = site["service"]
    context, page = _page(browser)
    try:
        verdict = _ask(page, service.url, site["image"], "a red bicycle")
        query_id = int(page.url.rsplit("/", 1)[1])
        with service.client() as client:
            record = client.get(f"/v1/queries/{query_id}").json()
        assert verdict == record["verdict"]
        rows = page.locator("table.ranking tr.generator")
        assert rows.count() == len(record["candidates"]) == 3
        names = [rows.nth(i).locator(".name").inner_text() for i in range(rows.count())]
        assert names == [entry["generator"] for entry in record["ranking"]]
        loaded = page.evaluate(
            "() => [...document.querySelectorAll('img.thumb')].map(i => i.naturalWidth)"
        )
        assert len(loaded) == 6 and all(width > 0 for width in loaded)  # query + nearest, x3
        assert page.locator("#audit").get_attribute("href") == f"/v1/queries/{query_id}?pretty=1"
        assert "a red bicycle" in page.locator("dl").first.inner_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "service-answer.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("RSX_UPDATE_DOCS") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "service.png")
    finally:
        context.close()


def test_attacker_text_in_the_file_stays_text(browser, site) -> None:
    service = site["service"]
    context, page = _page(browser)
    try:
        _ask(page, service.url, site["hostile"], None)  # the caption comes from the metadata
        assert page.evaluate("() => window.pwned") is None
        assert page.locator("main img[src='x'], main script, main b").count() == 0
        evidence = page.locator("main").inner_text()
        assert HOSTILE_PROMPT.split("\n")[0] in evidence
        assert "<script>window.pwned=3</script>" in evidence
        page.goto(service.url + "/history?q=lighthouse")
        assert page.evaluate("() => window.pwned") is None
        assert "<img src=x" in page.locator("table.history").inner_text()
    finally:
        context.close()


def test_history_and_generators_pages(browser, site, tmp_path: Path) -> None:
    service = site["service"]
    context, page = _page(browser, accept_downloads=True)
    try:
        _ask(page, service.url, site["image"], "zqpage history entry")
        page.goto(service.url + "/history?q=zqpage")
        assert page.locator("#count").inner_text() == "1-1 of 1"
        row = page.locator("table.history tbody tr")  # what 'rsx history' shows, and more
        assert row.locator(".file").inner_text() == f"upload:{site['image'].name}"
        assert row.locator(".margin").inner_text() not in ("", "-")
        thumbs = "() => [...document.querySelectorAll('table.history img.thumb')]"
        assert page.evaluate(thumbs + ".map(i => i.naturalWidth)")[0] > 0
        nowrap = "() => getComputedStyle(document.querySelector('td.id')).whiteSpace"
        assert page.evaluate(nowrap) == "nowrap"
        page.click("table.history td.id a")
        page.wait_for_url("**/queries/*")
        assert "zqpage history entry" in page.locator("main").inner_text()
        page.goto(service.url + "/generators")
        active = page.locator("#active .name").all_inner_texts()
        assert active == ["toy-a", "toy-b", "toy-c"]
        with page.expect_download() as download:
            page.click("#export")
        saved = tmp_path / "orders.csv"
        download.value.save_as(str(saved))
        assert saved.read_text(encoding="utf-8").startswith("generator,caption_hash,caption")
    finally:
        context.close()


def test_logging_in_with_the_token(browser, site, tmp_path: Path) -> None:
    token = "page-token-0123456789-abcdefghij"
    token_file = tmp_path / "token"
    token_file.write_text(token, encoding="utf-8")
    lab = tmp_path / "lab"
    shutil.copytree(site["service"].lab, lab)
    with running_service(lab, "--token-file", str(token_file), token=token) as service:
        context, page = _page(browser)
        try:
            response = page.goto(service.url + "/")
            assert response.status == 401 and page.locator("form.login").is_visible()
            page.fill("input[name=token]", "wrong-token-wrong-token")
            page.click("form.login button")
            assert "wrong token" in page.locator(".error").inner_text()
            page.fill("input[name=token]", token)
            page.click("form.login button")
            page.wait_for_selector("#query-form")
            [cookie] = [c for c in context.cookies() if c["name"] == "rsx_session"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert token not in cookie["value"]
            verdict = _ask(page, service.url, site["image"], "a red bicycle")  # CSRF via the page
            assert verdict in {"toy-a", "toy-b", "toy-c", "inconclusive", "unknown"}
            page.click("form.logout button")
            page.wait_for_selector("form.login")
            assert not [c for c in context.cookies() if c["name"] == "rsx_session"]
        finally:
            context.close()
