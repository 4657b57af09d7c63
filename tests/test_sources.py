"""Training on several sources: combining folders, caps and licence notes, the validation split of
each source (by person where asked), weighted and balanced sampling, and what a run records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_dataset, make_image


def _class_folders(root, n_per_class=(6, 6), classes=("pria", "wanita"), seed=1, manifest=None):
    """A source without train/: class folders only (all training images), optional manifest.csv."""
    rng = np.random.default_rng(seed)
    rows = ["file,person,age"]
    for c, (name, n) in enumerate(zip(classes, n_per_class)):
        for i in range(n):
            make_image(root / name / f"{name}_{i:03d}.jpg", c, rng)
            rows.append(f"{name}/{name}_{i:03d}.jpg,{name}{i // 2},{'old' if i % 3 == 0 else 'young'}")
    if manifest:
        (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_sources_combine_without_copying_and_keep_their_origin(tmp_path):
    from facegender.data.sources import read_sources, scan_sources

    gdf = make_dataset(tmp_path / "gdf", n_train=5, n_test=3)
    extra = _class_folders(tmp_path / "extra", (4, 7))
    scanned = scan_sources(read_sources([str(gdf), str(extra)]))
    assert scanned.classes == ["pria", "wanita"]
    assert len(scanned.train) == 10 + 11
    from_extra = [p for i, p in enumerate(scanned.train.paths) if scanned.train.sources[i] == 1]
    assert len(from_extra) == 11 and all(str(p).startswith(str(extra)) for p in from_extra)
    assert len(scanned.test) == 6 and set(scanned.test.sources) == {0}  # only gdf has test/
    assert [s.name for s in scanned.sources] == ["gdf", "extra"]


def test_sources_with_other_classes_are_refused_by_name(tmp_path):
    from facegender.data.dataset import DatasetError
    from facegender.data.sources import read_sources, scan_sources

    gdf = make_dataset(tmp_path / "gdf", n_train=3, n_test=2)
    other = _class_folders(tmp_path / "other", (3, 3), classes=("men", "women"))
    with pytest.raises(DatasetError, match="source other has classes"):
        scan_sources(read_sources([str(gdf), str(other)]))


def test_sources_file_sets_cap_weight_and_licence(tmp_path):
    from facegender.data.sources import read_sources, scan_sources

    make_dataset(tmp_path / "gdf", n_train=5, n_test=2)
    big = _class_folders(tmp_path / "big", (9, 9))
    (big / "SOURCE.md").write_text("# big\n\n## Terms\nResearch use only;\ncite the paper.\n\n## Other\nx\n")
    listing = tmp_path / "sources.yaml"
    listing.write_text("sources:\n  - path: gdf\n    licence: CC0\n  - path: big\n    cap: 4\n    weight: 0.5\n")
    sources = read_sources([str(listing)])
    assert [s.licence for s in sources] == ["CC0", "Research use only; cite the paper."]
    assert sources[1].weight == 0.5
    scanned = scan_sources(sources, seed=3)
    from_big = [scanned.train.labels[i] for i in range(len(scanned.train)) if scanned.train.sources[i] == 1]
    assert sorted(from_big) == [0] * 4 + [1] * 4  # capped per class
    again = scan_sources(read_sources([str(listing)]), seed=3)
    assert again.train.paths == scanned.train.paths  # the cap's choice is seeded


def test_sources_file_errors_name_the_problem(tmp_path):
    from facegender.data.dataset import DatasetError
    from facegender.data.sources import read_sources

    bad = tmp_path / "s.yaml"
    bad.write_text("sources:\n  - path: a\n    wieght: 2\n")
    with pytest.raises(DatasetError, match="unknown keys \\['wieght'\\]"):
        read_sources([str(bad)])
    with pytest.raises(DatasetError, match="not found"):
        read_sources([str(tmp_path / "missing.yaml")])


def test_validation_split_is_stratified_within_each_source(tmp_path):
    from facegender.data.dataset import split_train_val
    from facegender.data.sources import read_sources, scan_sources

    a = _class_folders(tmp_path / "a", (20, 20), seed=1)
    b = _class_folders(tmp_path / "b", (40, 10), seed=2)
    scanned = scan_sources(read_sources([str(a), str(b)]), need_test=False)
    train, val = split_train_val(scanned.train, 0.2, seed=0)
    cells = {(s, y): 0 for s in (0, 1) for y in (0, 1)}
    for s, y in zip(val.sources, val.labels):
        cells[(s, y)] += 1
    assert cells == {(0, 0): 4, (0, 1): 4, (1, 0): 8, (1, 1): 2}
    assert len(train) + len(val) == len(scanned.train) and not set(train.paths) & set(val.paths)


def test_split_column_keeps_each_person_on_one_side(tmp_path):
    from facegender.data.dataset import split_train_val
    from facegender.data.sources import read_sources, scan_sources, split_groups

    _class_folders(tmp_path / "people", (20, 20), manifest=True)
    listing = tmp_path / "s.yaml"
    listing.write_text("sources:\n  - path: people\n    split_column: person\n")
    scanned = scan_sources(read_sources([str(listing)]), need_test=False)
    groups = split_groups(scanned.sources, scanned.train)
    train, val = split_train_val(scanned.train, 0.25, seed=0, groups=groups)
    person = dict(zip(scanned.train.paths, groups))
    assert len(val) > 0 and not {person[p] for p in train.paths} & {person[p] for p in val.paths}


def test_sample_weights_balance_classes_sources_and_groups(tmp_path):
    from facegender.data.sources import read_sources, sample_weights, scan_sources

    a = _class_folders(tmp_path / "a", (30, 10), seed=1, manifest=True)
    b = _class_folders(tmp_path / "b", (6, 2), seed=2)
    scanned = scan_sources(read_sources([str(a), str(b)]), need_test=False)
    split, sources = scanned.train, scanned.sources
    assert sample_weights(sources, split, "none") is None  # plain shuffle: every image once an epoch
    labels, src = np.array(split.labels), np.array(split.sources)

    w = sample_weights(sources, split, "class")
    assert w.sum() == pytest.approx(len(split))
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())

    w = sample_weights(sources, split, "source")
    cell_totals = [w[(src == s) & (labels == y)].sum() for s in (0, 1) for y in (0, 1)]
    assert np.allclose(cell_totals, cell_totals[0])

    w = sample_weights(sources, split, "group", "age")  # source b has no manifest: its own cell per class
    from facegender.data.sources import manifest_column

    age = np.array([v or "" for v in manifest_column(sources, split, "age")])
    totals = {(y, g): w[(labels == y) & (age == g)].sum() for y in (0, 1) for g in set(age)}
    assert np.allclose(list(totals.values()), next(iter(totals.values())))

    sources[1].weight = 0.0
    w = sample_weights(sources, split, "none")
    assert np.all(w[src == 1] == 0) and w.sum() == pytest.approx(len(split))


def test_weighted_sampler_draws_by_weight_and_repeats_after_a_resume():
    from facegender.training.engine import EpochWeightedSampler

    weights = np.array([1.0] * 50 + [3.0] * 50)
    sampler = EpochWeightedSampler(weights, seed=7)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    second = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first != second
    draws = np.array([i for e in range(20) for i in (sampler.set_epoch(e), list(sampler))[1]])
    share = np.mean(draws >= 50)
    assert 0.7 < share < 0.8  # 3/4 of the weight


def test_training_on_two_sources_records_them_and_reports_each(tmp_path):
    from facegender.training.config import build_config
    from facegender.training.train import train

    gdf = make_dataset(tmp_path / "gdf", n_train=10, n_test=4)
    extra = _class_folders(tmp_path / "extra", (10, 6))
    (extra / "SOURCE.md").write_text("## Terms\nCC BY 4.0\n")
    cfg = build_config(
        None,
        data=[str(gdf), str(extra)],
        out=str(tmp_path / "out"),
        backbone="resnet18",
        pretrained=False,
        image_size=48,
        epochs=1,
        batch_size=8,
        balance="source",
        val_fraction=0.25,
    )
    summary = train(cfg, log=lambda s: None, progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    recorded = {s["name"]: s for s in metrics["sources"]}
    assert recorded["extra"]["licence"] == "CC BY 4.0"
    counts = recorded["extra"]["counts"]
    assert {c: counts["train"][c] + counts["validation"][c] for c in counts["train"]} == {"pria": 10, "wanita": 6}
    assert sum(counts["validation"].values()) == 4  # a stratified 25% of each source
    assert sum(recorded["gdf"]["counts"]["validation"].values()) == 5
    assert (
        recorded["gdf"]["counts"]["test"] == {"pria": 4, "wanita": 4}
        and "test" not in counts
        or sum(counts["test"].values()) == 0
    )
    by_source = summary["by_source"]["validation"]["groups"]
    assert by_source["extra"]["n"] == 4 and by_source["gdf"]["n"] == 5
    import torch

    record = torch.load(tmp_path / "out" / "best_model.pth", weights_only=True)
    assert [s["name"] for s in record["sources"]] == ["gdf", "extra"]


def test_evaluate_reports_each_source(trained_run, tmp_path):
    from facegender.app.cli import main

    a = make_dataset(tmp_path / "a", n_train=1, n_test=5, seed=3)
    b = make_dataset(tmp_path / "b", n_train=1, n_test=3, seed=4)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(trained_run / "out" / "best_model.pth"),
                "--data",
                str(a / "test"),
                "--data",
                str(b / "test"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 16
    sources = metrics["groups"]["source"]["groups"]
    assert {k: v["n"] for k, v in sources.items()} == {"a": 10, "b": 6}
    assert sum(v["correct"] for v in sources.values()) == round(metrics["accuracy"] * 16)
