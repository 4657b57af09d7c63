"""The HTML report: every section, images embedded (nothing fetched from elsewhere), data escaped,
the confident-mistakes gallery, the report `train` writes, the CLI, and a headless browser render."""

from __future__ import annotations

import csv
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from facegender.evaluation.evaluate import analyse
from facegender.evaluation.report import Predictions, mistakes, render_html, write_report

SECTIONS = ["summary", "config", "training", "confusion", "per-class", "calibration", "groups", "coverage", "mistakes"]
EVIL_CLASS = "<b>male</b>"
EVIL_CONFIG = "<script>alert(1)</script>"
EVIL_FILE = 'x<i>y&"q.jpg'  # no slash: that would be a folder
EVIL_GROUP = "<u>band</u>"


class _Page(HTMLParser):
    """Collects section ids, image sources, links, tags and the visible text."""

    def __init__(self):
        super().__init__()
        self.ids, self.srcs, self.hrefs, self.tags, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        if "src" in attrs:
            self.srcs.append(attrs["src"])
        if "href" in attrs:
            self.hrefs.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def assert_self_contained(page: _Page) -> None:
    assert page.srcs and all(s.startswith("data:image/") for s in page.srcs)
    assert all(h.startswith("#") for h in page.hrefs)
    assert not {"script", "link", "iframe", "object"} & set(page.tags)


@pytest.fixture
def synthetic(tmp_path):
    """Predictions on 20 real image files (one with HTML in its name) with known mistakes."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    names = [f"img_{i:02d}.png" for i in range(20)]
    names[3] = EVIL_FILE
    paths = [
        make_image(tmp_path / "data" / "test" / ("m" if y == 0 else "f") / n, int(y), rng)
        for n, y in zip(names, labels)
    ]
    margin = np.linspace(3.0, 0.2, 20)
    logits = np.zeros((20, 2))
    logits[np.arange(20), labels] = margin  # right, with falling confidence ...
    wrong = [3, 5, 8, 13, 17]  # ... except these five
    logits[wrong] = logits[wrong][:, ::-1]
    pred = Predictions([EVIL_CLASS, "fe&male"], paths, labels, logits, temperature=1.0)
    return tmp_path, pred, wrong


def test_report_has_every_section_embeds_images_and_escapes_data(synthetic):
    tmp, pred, wrong = synthetic
    groups = tmp / "groups.csv"
    with open(groups, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "band"])
        w.writerows(
            [Path(p).relative_to(tmp / "data").as_posix(), "x", EVIL_GROUP if i % 2 else "plain"]
            for i, p in enumerate(pred.paths)
        )
    record = {
        "backbone": "resnet18",
        "classes": pred.classes,
        "temperature": 1.0,
        "tta": False,
        "config": {"data": EVIL_CONFIG, "lr": 0.001},
    }
    path, metrics = write_report(
        pred,
        record,
        tmp / "report.html",
        str(tmp / "model.pth"),
        str(tmp / "data" / "test"),
        groups,
        min_confidence=0.9,
        min_group_size=5,
    )
    text = path.read_text(encoding="utf-8")
    page = parse(text)

    assert page.ids == SECTIONS
    assert_self_contained(page)
    # figures: confusion matrix, 2 reliability diagrams, coverage, one group chart; + 5 thumbnails
    assert sum(s.startswith("data:image/png") for s in page.srcs) == 5
    assert sum(s.startswith("data:image/jpeg") for s in page.srcs) == len(wrong)
    for evil in (EVIL_CLASS, EVIL_CONFIG, EVIL_GROUP, EVIL_FILE):
        assert evil not in text  # never as markup ...
        assert evil in "".join(page.text)  # ... but shown as text
    assert "fe&amp;male" in text
    # the numbers on the page are the analysed ones
    assert metrics["n"] == 20 and metrics["accuracy"] == pytest.approx(15 / 20)
    assert "75.00%" in text
    assert metrics["groups"]["band"]["groups"][EVIL_GROUP]["n"] == 10
    assert "No training history" in text


def test_the_template_autoescapes_a_script_in_class_file_and_folder_names(tmp_path):
    script = "<script>alert(1)</script>"
    name = script.split("/")[0]  # a file name cannot hold the slash; the data folder's path can
    paths = [str(tmp_path / script / f"{name}{i}.jpg") for i in range(4)]
    pred = Predictions(
        [script, "female"], paths, np.array([0, 1, 0, 1]), np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
    )
    figures = {}
    for key in ("confusion_matrix", "reliability", "reliability_calibrated", "coverage"):
        figures[key] = tmp_path / f"{key}.png"
        figures[key].write_bytes(b"png")
    gallery = mistakes(pred)
    text = render_html(
        analyse(pred),
        {"backbone": script, "classes": pred.classes},
        figures,
        gallery,
        f"{script}/model.pth",
        f"{tmp_path}/{script}",
        groups_file=None,
        note=script,
    )
    page = parse(text)
    assert "<script" not in text and "script" not in page.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert len(gallery) == 2 and "<b>&lt;script&gt;alert(1)&lt;2.jpg</b>" in text  # a mistake's file name
    assert script in "".join(page.text)


def test_mistakes_are_the_most_confident_wrong_predictions_first(synthetic):
    _, pred, wrong = synthetic
    gallery = mistakes(pred, limit=3)
    probs = pred.probs()
    expected = sorted(wrong, key=lambda i: -probs[i].max())[:3]
    assert [g["path"] for g in gallery] == [str(pred.paths[i]) for i in expected]
    assert all(g["true"] != g["predicted"] for g in gallery)
    assert [g["probability"] for g in gallery] == sorted((g["probability"] for g in gallery), reverse=True)


def test_train_writes_a_report_with_its_curves(trained_run):
    text = (trained_run / "out" / "report.html").read_text(encoding="utf-8")
    page = parse(text)
    assert page.ids == SECTIONS
    assert_self_contained(page)
    training = text.split('<section id="training">')[1].split("</section>")[0]
    assert training.count('<img src="data:image/png;base64,') == 2  # loss and accuracy curves
    assert "pria" in text and "wanita" in text


def test_cli_report_with_groups_and_threshold(trained_run, tmp_path):
    from facegender.app.cli import main

    test_dir = trained_run / "data" / "test"
    files = sorted(p for p in test_dir.rglob("*.jpg"))
    groups = tmp_path / "g.csv"
    groups.write_text(
        "path,source\n"
        + "".join(f"{p.relative_to(test_dir).as_posix()},{'cam' if i % 2 else 'web'}\n" for i, p in enumerate(files))
    )
    out = tmp_path / "r.html"
    assert (
        main(
            [
                "report",
                "--model",
                str(trained_run / "out" / "best_model.pth"),
                "--data",
                str(test_dir),
                "--groups",
                str(groups),
                "--min-confidence",
                "0.8",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    text = out.read_text(encoding="utf-8")
    groups_section = text.split('<section id="groups">')[1].split("</section>")[0]
    assert "By source" in groups_section and ">cam<" in groups_section and ">web<" in groups_section
    assert "too few" in groups_section  # 8 images per group < 30
    assert "at minimum confidence 0.8" in text


def test_report_renders_in_a_headless_browser(synthetic):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the HTML checks above still ran")
    tmp, pred, _ = synthetic
    record = {"backbone": "resnet18", "classes": pred.classes, "temperature": 1.0, "tta": False, "config": {}}
    path, _ = write_report(pred, record, tmp / "report.html", str(tmp / "model.pth"), str(tmp / "data" / "test"))
    shot = tmp / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            path.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 20  # not a blank page
    assert (pixels < 200).mean() > 0.05  # a good share of it is drawn (header, tables, figures)
