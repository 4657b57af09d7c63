"""The web page in a real headless Chromium (Selenium): upload the group photo through the file
input and check that six faces are listed and boxed on the canvas.

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver);
skipped with the reason when they are missing. Set FACEGENDER_SCREENSHOT_DIR to keep a screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import shared_path
from test_serve import CLASSES, running, save_random_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("headless Chromium not installed (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is a dev dependency: pip install -e .[dev]")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--window-size=1400,1500", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from facegender.serve import create_app

    model = save_random_model(tmp_path_factory.mktemp("browser") / "best_model.pth", align=True)
    with running(create_app(model, device="cpu")) as url:
        yield url


def _hex_to_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))


def test_upload_group_photo_shows_six_labelled_boxes(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = shared_path("images", "group_6_faces.jpg")
    browser.get(page_url + "/")
    WebDriverWait(browser, 30).until(lambda d: "resnet18" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 120).until(lambda d: status.get_attribute("data-state") in ("done", "error"))
    assert status.get_attribute("data-state") == "done", status.text
    assert status.text.startswith("6 faces in 1 image")

    items = browser.find_elements(By.CSS_SELECTOR, "#faces li.face")
    assert len(items) == 6
    for item in items:
        assert item.get_attribute("data-label") in CLASSES
        assert 0.5 <= float(item.get_attribute("data-probability")) <= 1
        assert item.get_attribute("data-file") == "group_6_faces.jpg"
    canvases = browser.find_elements(By.CSS_SELECTOR, "#results canvas")
    assert len(canvases) == 1

    # Each face's box is drawn in its class colour: sample the canvas at the middle of each box's
    # left edge and compare with the colour shown beside the face in the list.
    found = browser.execute_script("""
        const canvas = document.querySelector('#results canvas');
        const ctx = canvas.getContext('2d');
        const body = JSON.parse(document.getElementById('json').textContent);
        const result = body.results[0];
        const scale = canvas.width / result.width;
        return result.faces.map((f) => {
          const x = Math.floor(f.box[0] * scale), y = Math.floor((f.box[1] + f.box[3]) / 2 * scale);
          return Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
        });
    """)
    swatches = browser.execute_script(
        "return Array.from(document.querySelectorAll('#faces .swatch')).map(s => getComputedStyle(s).backgroundColor)")
    assert len(found) == len(swatches) == 6
    for pixel, swatch in zip(found, swatches):
        expected = [int(v) for v in swatch[swatch.index("(") + 1:swatch.index(")")].split(",")[:3]]
        assert max(abs(a - b) for a, b in zip(pixel, expected)) <= 3, (pixel, expected)

    # Nothing but this server was contacted (the page's CSP would block it anyway).
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {page_url}

    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("FACEGENDER_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "browser_group_6_faces.png")


def test_page_shows_server_errors(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    text = tmp_path / "notes.png"
    text.write_bytes(b"not really a picture")
    browser.get(page_url + "/")
    browser.find_element(By.ID, "file").send_keys(str(text))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 60).until(lambda d: status.get_attribute("data-state") in ("done", "error"))
    assert status.text.startswith("0 faces in 1 image")
    caption = browser.find_element(By.CSS_SELECTOR, "#results figcaption.error")
    assert "notes.png" in caption.text and "not a readable image" in caption.text
    assert browser.find_elements(By.CSS_SELECTOR, "#faces li.face") == []
