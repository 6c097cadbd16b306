"""Tests of the synthetic-to-real benchmark: file layout, label ids, determinism, the domain gap and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corte_ray import cli
from corte_ray.data import synth
from corte_ray.data.labels import SYNTH, SYNTH_CLASSES

SIZE = (64, 128)
ELEVEN_IDS = {7, 8, 11, 17, 19, 20, 21, 22, 23, 24, 26}


def _render(tmp: Path, seed: int = 0, n_source: int = 3, n_target: int = 4, n_val: int = 2,
            size: tuple[int, int] = SIZE) -> synth.SynthStats:
    return synth.render_benchmark(tmp, seed=seed, n_source=n_source, n_target=n_target, n_val=n_val, size=size)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def _scenes(domain: str, n: int, size: tuple[int, int] = SIZE, seed: int = 7):
    for i in range(n):
        yield synth.render_scene(np.random.default_rng([seed, i]), size, domain)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthStats]:
    root = tmp_path_factory.mktemp("bench")
    return root, _render(root)


def test_file_layout_is_gta5_and_cityscapes(bench: tuple[Path, synth.SynthStats]) -> None:
    root, _ = bench
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    expected = {"stats.json", "README.txt"}
    expected |= {f"source/{kind}/{i:05d}.png" for kind in ("images", "labels") for i in range(3)}
    for split, n, cities in (("train", 4, ("synthbury", "renderton")), ("val", 2, ("valmont",))):
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            expected.add(f"target/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png")
            expected.add(f"target/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png")
    assert files == expected


def test_images_and_labels_have_the_size_modes_and_only_the_eleven_ids(
        bench: tuple[Path, synth.SynthStats]) -> None:
    root, _ = bench
    images = sorted((root / "source" / "images").glob("*.png")) + sorted(root.glob("target/leftImg8bit/*/*/*.png"))
    labels = sorted((root / "source" / "labels").glob("*.png")) + sorted(root.glob("target/gtFine/*/*/*.png"))
    assert len(images) == len(labels) == 9
    for image_path, label_path in zip(images, labels):
        with Image.open(image_path) as im, Image.open(label_path) as lb:
            assert im.mode == "RGB" and lb.mode == "L"
            assert im.size == lb.size == (SIZE[1], SIZE[0])
            ids = set(np.unique(np.asarray(lb)).tolist())
        assert ids <= ELEVEN_IDS, (label_path, ids - ELEVEN_IDS)
        # the project's own label space accepts every stored id and lands in the synth eval classes
        assert set(np.unique(SYNTH.to_train_ids(np.asarray(Image.open(label_path)))).tolist()) <= set(SYNTH_CLASSES)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_every_class_appears_over_twenty_scenes(domain: str) -> None:
    seen: set[int] = set()
    per_scene = []
    for _, label in _scenes(domain, 20):
        ids = set(np.unique(label).tolist())
        assert ids <= ELEVEN_IDS
        seen |= ids
        per_scene.append(len(ids))
    assert seen == ELEVEN_IDS
    assert np.mean(per_scene) >= 8.5  # most scenes hold most classes


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    _render(tmp_path / "a", seed=3)
    _render(tmp_path / "b", seed=3)
    _render(tmp_path / "c", seed=4)
    a, b, c = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert a == b
    stats_a, stats_b = (json.loads((tmp_path / d / "stats.json").read_text()) for d in "ab")
    stats_a.pop("seconds"), stats_b.pop("seconds")
    assert stats_a == stats_b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "images" in k or "leftImg8bit" in k)


def test_an_image_does_not_depend_on_how_many_are_rendered(tmp_path: Path) -> None:
    _render(tmp_path / "few", n_source=1, n_target=1, n_val=1)
    _render(tmp_path / "more", n_source=3, n_target=4, n_val=2)
    few, more = _hashes(tmp_path / "few"), _hashes(tmp_path / "more")
    assert few and all(more[k] == v for k, v in few.items())


def test_a_smaller_rerun_removes_the_stale_files(tmp_path: Path) -> None:
    _render(tmp_path, n_source=3, n_target=2, n_val=1)
    _render(tmp_path, n_source=2, n_target=2, n_val=1)
    assert sorted(p.name for p in (tmp_path / "source" / "images").iterdir()) == ["00000.png", "00001.png"]
    assert not (tmp_path / "source" / "labels" / "00002.png").exists()


@pytest.mark.parametrize("size", [(96, 160), (65, 97), (256, 512)])
def test_other_sizes_render(size: tuple[int, int]) -> None:
    for domain in ("source", "target"):
        image, label = synth.render_scene(np.random.default_rng(1), size, domain)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert label.shape == size and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= ELEVEN_IDS


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 64x64"):
        synth.render_scene(np.random.default_rng(0), (32, 128), "source")
    with pytest.raises(ValueError, match="domain"):
        synth.render_scene(np.random.default_rng(0), SIZE, "real")
    with pytest.raises(ValueError, match="at least 64x64"):
        _render(tmp_path, size=(64, 40))
    with pytest.raises(ValueError, match="n_val"):
        _render(tmp_path, n_val=-1)


def test_source_is_flat_and_labels_align_with_colours() -> None:
    for image, label in _scenes("source", 4):
        # one flat colour for the whole sky: no gradient, noise or blur, and no other object's pixel is
        # labelled sky (a misaligned label would bring a second colour in)
        sky = image[label == synth.SKY]
        assert len(np.unique(sky, axis=0)) == 1
        # a handful of part colours, not a photo
        assert len(np.unique(image.reshape(-1, 3), axis=0)) < 150


def test_domain_gap_statistics() -> None:
    stats = synth.SynthStats(seed=0, size=SIZE, counts={"source": 12, "target_train": 12, "target_val": 0},
                             domains={d: synth.DomainStats() for d in synth.DOMAINS})
    for domain in synth.DOMAINS:
        for image, label in _scenes(domain, 12):
            stats.domains[domain].add(image, label)
    src, tgt = stats.domains["source"], stats.domains["target"]
    assert tgt.noise_level > src.noise_level + 0.5
    assert src.edge_sharpness > 1.3 * tgt.edge_sharpness
    distance = stats.colour_distance()
    assert np.isfinite(distance).all()
    assert (distance > 30).sum() >= 7, dict(zip(synth.SYNTH_LABEL_IDS, distance.round(1)))
    assert np.std(tgt.brightness) > np.std(src.brightness)  # lighting varies in the target only
    table = stats.format_table()
    for name in ("road", "traffic light", "edge sharpness", "noise", "brightness"):
        assert name in table


def test_stats_match_a_recount_of_the_written_files(bench: tuple[Path, synth.SynthStats]) -> None:
    root, stats = bench
    written = json.loads((root / "stats.json").read_text())
    assert written["counts"] == {"source": 3, "target_train": 4, "target_val": 2}
    counts = np.zeros(256, np.int64)
    rgb_sum = np.zeros((256, 3))
    for label_path in sorted(root.glob("target/gtFine/*/*/*.png")):
        rel = label_path.relative_to(root / "target" / "gtFine")
        stem = rel.name.replace("_gtFine_labelIds.png", "")
        image_path = root / "target" / "leftImg8bit" / rel.parent / f"{stem}_leftImg8bit.png"
        label = np.asarray(Image.open(label_path))
        image = np.asarray(Image.open(image_path)).astype(np.float64)
        counts += np.bincount(label.ravel(), minlength=256)
        for c in range(3):
            rgb_sum[:, c] += np.bincount(label.ravel(), weights=image[..., c].ravel(), minlength=256)
    tgt = written["domains"]["target"]
    assert tgt["images"] == 6
    freq = tgt["class_frequency_percent"]
    assert freq["road"] == pytest.approx(100 * counts[synth.ROAD] / counts.sum(), abs=1e-3)
    assert tgt["class_mean_rgb"]["sky"] == pytest.approx(list(rgb_sum[synth.SKY] / counts[synth.SKY]), abs=0.01)


def test_noise_estimate_ignores_edges_and_sees_noise() -> None:
    step = np.zeros((40, 40), np.float32)
    step[:, 20:] = 200.0
    assert synth.noise_estimate(step) == 0.0
    rng = np.random.default_rng(0)
    low = synth.noise_estimate(step + rng.normal(0, 2, step.shape).astype(np.float32))
    high = synth.noise_estimate(step + rng.normal(0, 8, step.shape).astype(np.float32))
    assert 0.5 < low < high and high == pytest.approx(4 * low, rel=0.25)


def test_contact_sheet_and_colourise() -> None:
    pairs = list(_scenes("source", 2))
    sheet = synth.contact_sheet(pairs)
    assert sheet.shape == (2 * SIZE[0] + 2, 2 * SIZE[1] + 2, 3)
    assert tuple(synth.colourise(np.array([[7, 26]], np.uint8))[0, 0]) == (128, 64, 128)
    assert tuple(synth.colourise(np.array([[7, 26]], np.uint8))[0, 1]) == (0, 0, 142)


def test_cli_synth_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = cli.main(["synth", "--out", str(out), "--n-source", "4", "--n-target", "4", "--n-val", "2",
                     "--size", "64x128"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "edge sharpness" in printed and "sidewalk" in printed and str(out) in printed
    assert len(list((out / "source" / "images").glob("*.png"))) == 4
    assert len(list(out.glob("target/leftImg8bit/val/*/*.png"))) == 2
