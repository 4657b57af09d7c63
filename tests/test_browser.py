"""The web page in a real headless Chromium (Selenium): upload the group photo through the file
input and check that six faces are listed left to right and boxed on the canvas with their labels
inside it; a model without a face stage says that it labels the whole image.

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver);
skipped with the reason when they are missing. Set FACEGENDER_SCREENSHOT_DIR to keep a screenshot.
"""

from __future__ import annotations

import json
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
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1400,1500",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from facegender.app.serve import create_app

    model = save_random_model(tmp_path_factory.mktemp("browser") / "best_model.pth", align=True)
    with running(create_app(model, device="cpu")) as url:
        yield url


@pytest.fixture(scope="module")
def whole_image_page_url(tmp_path_factory):
    from facegender.app.serve import create_app

    model = save_random_model(tmp_path_factory.mktemp("browser-whole") / "best_model.pth", align=False)
    with running(create_app(model, device="cpu")) as url:
        yield url


def _wait_done(browser, timeout=120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, timeout).until(lambda d: status.get_attribute("data-state") in ("done", "error"))
    return status


def _labels_inside_canvas(browser):
    """Each label rectangle the page drew ([left, top, width, height]), checked against its canvas."""
    canvas = browser.execute_script(
        "const c = document.querySelector('#results canvas'); return [c.width, c.height, c.dataset.labels];"
    )
    width, height, labels = canvas[0], canvas[1], json.loads(canvas[2])
    for label in labels:
        left, top, w, h = label["rect"]
        assert 0 <= left and left + w <= width + 0.01 and 0 <= top and top + h <= height + 0.01, (label, width, height)
    return labels


def _hex_to_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return tuple(int(colour[i : i + 2], 16) for i in (0, 2, 4))


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

    # Numbered left to right: the list goes 1..6, its boxes from left to right, and each face's
    # label on the canvas starts with the same number; every label lies inside the canvas.
    body = json.loads(browser.find_element(By.ID, "json").get_attribute("textContent"))
    faces = body["results"][0]["faces"]
    numbers = [int(item.get_attribute("data-number")) for item in items]
    index = [int(item.get_attribute("data-index")) for item in items]
    assert numbers == [1, 2, 3, 4, 5, 6]
    lefts = [faces[i]["box"][0] for i in index]
    assert lefts == sorted(lefts)
    for n, item in zip(numbers, items):
        assert f"face {n} at" in item.text
    labels = _labels_inside_canvas(browser)
    assert len(labels) == 6
    for k, label in enumerate(labels):
        number = index.index(k) + 1
        assert label["number"] == number and label["text"].startswith(f"{number}: ")
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
        "return Array.from(document.querySelectorAll('#faces .swatch')).map(s => getComputedStyle(s).backgroundColor)"
    )
    swatches = [swatches[index.index(k)] for k in range(len(swatches))]  # list order -> faces order
    assert len(found) == len(swatches) == 6
    for pixel, swatch in zip(found, swatches):
        expected = [int(v) for v in swatch[swatch.index("(") + 1 : swatch.index(")")].split(",")[:3]]
        assert max(abs(a - b) for a, b in zip(pixel, expected)) <= 3, (pixel, expected)

    # Nothing but this server was contacted (the page's CSP would block it anyway).
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
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


def test_model_without_face_stage_says_it_labels_the_whole_image(browser, whole_image_page_url):
    """The page of a model that does not detect faces says so instead of "Every face found is
    boxed", and the one label of the sample photo (box = the whole photo) is drawn inside the canvas."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from facegender.app.predict import WHOLE_IMAGE
    from facegender.core.resources import sample_photo_path

    browser.get(whole_image_page_url + "/")
    WebDriverWait(browser, 30).until(lambda d: WHOLE_IMAGE in d.find_element(By.ID, "model").text)
    drop = browser.find_element(By.ID, "drop").text
    assert WHOLE_IMAGE in drop and "Every face found is boxed" not in drop
    browser.find_element(By.ID, "file").send_keys(str(sample_photo_path()))
    status = _wait_done(browser)
    assert status.get_attribute("data-state") == "done", status.text
    [item] = browser.find_elements(By.CSS_SELECTOR, "#faces li.face")
    assert WHOLE_IMAGE in item.text and "astronaut.jpg" in item.text
    [label] = _labels_inside_canvas(browser)
    assert label["number"] is None and label["text"].split()[0] in CLASSES
    assert label["rect"][1] == 0  # the box is the whole photo: its label goes inside, at the top
