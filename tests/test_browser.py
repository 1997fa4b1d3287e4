"""The built docs site and the HTML gallery in a real browser (issue 30): headless Chromium
(Debian's ``chromium`` + ``chromium-driver``, driven by selenium) opens each page over HTTP,
screenshots it, and checks that it logs no console error, that every image loads
(``naturalWidth > 0``) and that the gallery lists its images worst first.

Screenshots go to ``$CAPBENCH_SCREENSHOTS`` (default: a folder under the system temp folder),
never into the repository. Skipped, with the reason, where Chromium cannot be had."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmark.cli import app

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(os.environ.get("CAPBENCH_SCREENSHOTS", Path(tempfile.gettempdir()) / "capbench-screenshots"))
DOC_PAGES = ["index", "getting-started", "inspecting", "results", "cli", "api"]


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium with its console log readable; skipped where none starts."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import WebDriverException

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.skip(f"{path} not found: apt-get install chromium chromium-driver (as .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900", "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options,
                                  service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.skip(f"headless chromium does not start here: {str(exc)[:300]}")
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def serve():
    """``serve(folder) -> base URL``: each folder over HTTP on 127.0.0.1, as a web host serves it."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def _open(driver, url: str, shot: str) -> dict:
    """Open ``url``, bring every image into view so lazy ones load, screenshot the page, and
    return its images' ``{src: naturalWidth}`` and the console's error lines."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const imgs = Array.from(document.images);
        for (const img of imgs) { img.loading = 'eager'; img.scrollIntoView(); }
        const all = imgs.map(img => img.complete ? Promise.resolve() :
            new Promise(r => { img.onload = r; img.onerror = r; }));
        Promise.all(all).then(() => { window.scrollTo(0, 0); done(); });
    """)
    driver.save_screenshot(str(SHOTS / shot))
    if driver.execute_script("return document.images.length"):  # and one at the first image
        driver.execute_script("document.images[0].scrollIntoView()")
        driver.save_screenshot(str(SHOTS / shot.replace(".png", "-image.png")))
    widths = driver.execute_script(
        "return Array.from(document.images).map(i => [i.currentSrc || i.src, i.naturalWidth]);")
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return {"images": dict(widths), "errors": errors}


@pytest.fixture(scope="module")
def docs_url(serve, docs_site):
    """The site's base URL, served over HTTP as ``python3 -m http.server -d site`` serves it
    (from disk, Material's search cannot load its index: the README says to serve it)."""
    return serve(docs_site)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_pages_render_without_errors_and_their_images_load(browser, docs_url, page):
    seen = _open(browser, f"{docs_url}{page}.html", f"docs-{page}.png")
    assert seen["errors"] == []
    assert all(w > 0 for w in seen["images"].values()), seen["images"]
    title = browser.title
    assert "capbench" in title
    if page == "results":  # the committed plots, served from results/ by the build hook
        plots = {src.split("/", 3)[3] for src in seen["images"] if "/plots/" in src}
        root = Path(__file__).resolve().parents[1]
        assert plots == {str(p.relative_to(root)) for p in root.glob("results/*/plots/*.png")}
    if page == "inspecting":
        assert any("attention.png" in src for src in seen["images"])
    if page == "cli":
        text = browser.find_element("tag name", "article").text
        assert "capbench run" in text and "--results-dir" in text


def test_docs_search_finds_a_page(browser, docs_url):
    """Material's client-side search (a web worker over the search index) works."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(docs_url + "index.html")
    box = browser.find_element(By.CSS_SELECTOR, "input[data-md-component='search-query']")
    box.click()  # the header's search field, as a reader clicks it
    box.send_keys("pointing game")
    WebDriverWait(browser, 20).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))
    hits = browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")
    assert any("inspecting" in (h.get_attribute("href") or "") for h in hits)
    browser.save_screenshot(str(SHOTS / "docs-search.png"))


def test_the_gallery_renders_worst_first_with_its_images(browser, tiny_run, tmp_path):
    results, record = tiny_run
    gallery = tmp_path / "gallery"
    done = CliRunner().invoke(app, ["report", "--results-dir", str(results), "--gallery",
                                    str(gallery), "--no-leaderboard-file"])
    assert done.exit_code == 0, done.output
    base = gallery.resolve().as_uri() + "/"  # a static folder, opened from disk as users do
    index = _open(browser, base + "index.html", "gallery-index.png")
    assert index["errors"] == []
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'));")
    pages = [h for h in links if h and h.endswith(".html")]
    assert pages
    seen = _open(browser, base + pages[0], "gallery-page.png")
    assert seen["errors"] == []
    assert seen["images"] and all(w > 0 for w in seen["images"].values()), seen["images"]
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('tr.row'))"
        ".map(r => [r.dataset.imageId, r.dataset.mean]);")
    means = [float(m) for _, m in rows]
    assert len(rows) == len(record.predictions)
    assert means == sorted(means)  # worst (lowest per-image CIDEr-D) first, as rendered
    per_image = dict(zip(record.per_image["image_ids"], record.per_image["CIDEr"], strict=True))
    assert sorted(means) == pytest.approx(sorted(100 * v for v in per_image.values()), abs=1e-4)
    # a thumbnail and an attention strip per row (attn_lstm), all decoded by the browser
    assert len(seen["images"]) >= 2 * len(rows) - 1
