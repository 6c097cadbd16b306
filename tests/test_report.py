"""corte_ray.report: prediction grid pixels and layout, metrics.jsonl curves, gap closed and the Markdown table."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from PIL import Image

from corte_ray.report import gap_closed, plot_curves, prediction_grid, read_curve, results_markdown

NAMES = ["road", "sidewalk", "building", "sky", "car"]
PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [70, 130, 180], [0, 0, 142]], dtype=np.uint8)
H, W = 8, 12


def _data(n_rows: int, n_methods: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n_rows)]
    columns = OrderedDict()
    for name in ["ground truth", "black box", "distill", "corte"][:n_methods]:
        maps = []
        for _ in range(n_rows):
            lab = rng.integers(0, len(NAMES), (H, W)).astype(np.uint8)
            lab[0, 0] = 255  # one ignore pixel per map
            maps.append(lab)
        columns[name] = maps
    return images, columns


def _upscaled(a: np.ndarray, s: int) -> np.ndarray:
    return np.repeat(np.repeat(a, s, axis=0), s, axis=1)


@pytest.mark.parametrize("scale", [1, 3])
def test_grid_tiles_are_nearest_upscaled_palette_colours(tmp_path, scale):
    images, columns = _data(n_rows=2, n_methods=3)
    out = tmp_path / "grid.png"
    layout = prediction_grid(images, columns, NAMES, PALETTE, out, scale=scale)
    assert out.exists() and layout.path == out
    png = np.asarray(Image.open(out).convert("RGB"))
    assert (png.shape[1], png.shape[0]) == layout.size
    assert layout.tile_size == (W * scale, H * scale)
    assert layout.column_titles == ("image", "ground truth", "black box", "distill")
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(PALETTE)] = PALETTE
    for r in range(2):
        x0, y0 = layout.tile_origin(r, 0)
        np.testing.assert_array_equal(png[y0:y0 + H * scale, x0:x0 + W * scale], _upscaled(images[r], scale))
        for c, maps in enumerate(columns.values(), start=1):
            x0, y0 = layout.tile_origin(r, c)
            tile = png[y0:y0 + H * scale, x0:x0 + W * scale]
            lab = maps[r]
            # The pixel at (y*scale, x*scale) is palette[label[y, x]], and so is its whole scale x scale block.
            np.testing.assert_array_equal(tile[::scale, ::scale], lut[lab])
            np.testing.assert_array_equal(tile, _upscaled(lut[lab], scale))
            np.testing.assert_array_equal(tile[0, 0], [0, 0, 0])  # 255 = ignore is black


def test_grid_size_grows_with_columns_rows_and_scale(tmp_path):
    sizes = {}
    for n_methods in (1, 2, 3, 4):
        images, columns = _data(n_rows=2, n_methods=n_methods)
        sizes[n_methods] = Image.open(prediction_grid(images, columns, NAMES, PALETTE, tmp_path / "g.png",
                                                      scale=3, legend="all").path).size
    steps = {sizes[n + 1][0] - sizes[n][0] for n in (1, 2, 3)}
    assert len(steps) == 1  # every extra column adds the same width ...
    assert steps.pop() >= W * 3  # ... at least one upscaled tile
    assert sizes[4][0] >= 5 * W * 3  # 5 columns: image + 4 label maps

    images, columns = _data(n_rows=3, n_methods=2)
    three_rows = Image.open(prediction_grid(images, columns, NAMES, PALETTE, tmp_path / "g3.png", scale=3,
                                            legend="all").path).size
    assert three_rows[0] == sizes[2][0]
    assert three_rows[1] - sizes[2][1] >= H * 3

    s1 = prediction_grid(images, columns, NAMES, PALETTE, tmp_path / "s1.png", scale=1, legend="all")
    s4 = prediction_grid(images, columns, NAMES, PALETTE, tmp_path / "s4.png", scale=4, legend="all")
    assert s4.tile_size == (4 * s1.tile_size[0], 4 * s1.tile_size[1])
    (x0, _), (x1, _) = s4.tile_origin(0, 0), s4.tile_origin(0, 1)
    assert x1 - x0 >= 4 * W


def test_grid_legend_and_no_temp_files(tmp_path):
    images, columns = _data(n_rows=1, n_methods=2)
    for lab in columns.values():
        lab[0][:] = np.where(lab[0] == 255, 255, lab[0] % 2)  # only road and sidewalk occur
    layout = prediction_grid(images, columns, NAMES, PALETTE, tmp_path / "g.png")
    assert layout.legend == ((0, "road"), (1, "sidewalk"), (255, "ignore"))
    png = np.asarray(Image.open(layout.path).convert("RGB"))
    grid_bottom = layout.tile_origin(0, 0)[1] + layout.tile_size[1]
    below = png[grid_bottom:].reshape(-1, 3)
    # Both swatches are drawn under the grid, and text (dark pixels) too.
    for colour in PALETTE[:2]:
        assert (below == colour).all(axis=1).any()
    assert (below.max(axis=1) < 60).any()
    all_layout = prediction_grid(images, columns, NAMES, PALETTE, tmp_path / "g.png", legend="all")
    assert [name for _, name in all_layout.legend] == NAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


def test_grid_accepts_256_palette_and_rejects_bad_shapes(tmp_path):
    images, columns = _data(n_rows=1, n_methods=1)
    big = np.zeros((256, 3), np.uint8)
    big[: len(PALETTE)] = PALETTE
    big[255] = [255, 255, 255]  # still drawn black: 255 means ignore
    layout = prediction_grid(images, columns, NAMES, big, tmp_path / "g.png", scale=2)
    png = np.asarray(Image.open(layout.path).convert("RGB"))
    x0, y0 = layout.tile_origin(0, 1)
    np.testing.assert_array_equal(png[y0, x0], [0, 0, 0])
    with pytest.raises(ValueError, match="label maps for"):
        prediction_grid(images + images, columns, NAMES, PALETTE, tmp_path / "x.png")
    with pytest.raises(ValueError, match="the image is"):
        prediction_grid(images, {"gt": [np.zeros((H + 1, W), np.uint8)]}, NAMES, PALETTE, tmp_path / "x.png")
    with pytest.raises(ValueError, match="palette"):
        prediction_grid(images, columns, NAMES, PALETTE[:, :2], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_read_curve_torn_last_line_duplicates_and_missing_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 50, "loss": 1.0},
        {"step": 100, "loss": 0.9, "val_miou": 20.0},
        {"step": 300, "val_miou": 35.5},
        {"step": 200, "val_miou": 30.0},
        {"step": 100, "val_miou": 22.5},  # a resumed run repeats step 100: the last one wins
        {"step": 250.0, "val_miou": float("nan")},  # not plotted
    ]
    path.write_text("\n".join(json.dumps(d) for d in lines) + '\n{"step": 400, "val_mi')
    assert read_curve(path) == [(100, 22.5), (200, 30.0), (300, 35.5)]
    assert all(isinstance(s, int) and isinstance(v, float) for s, v in read_curve(path))

    path.write_text('{"step": 1, "val_miou": 5}\nnot json\n{"step": 2, "val_miou": 6}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_curve(path)
    path.write_text("")
    assert read_curve(path) == []


def test_gap_closed():
    assert gap_closed(45.0, 40.0, 50.0) == pytest.approx(0.5)
    assert gap_closed(50.0, 40.0, 50.0) == pytest.approx(1.0)
    assert gap_closed(40.0, 40.0, 50.0) == pytest.approx(0.0)
    assert gap_closed(35.0, 40.0, 50.0) == pytest.approx(-0.5)
    assert gap_closed(46.2, 40.0, 51.5) == pytest.approx(6.2 / 11.5)
    assert gap_closed(45.0, 40.0, 40.0) is None
    assert gap_closed(None, 40.0, 50.0) is None
    assert gap_closed(45.0, None, 50.0) is None
    assert gap_closed(45.0, 40.0, None) is None
    assert gap_closed(float("nan"), 40.0, 50.0) is None


def test_results_markdown():
    rows = {
        "black box": {"miou": 40.0, "params": 12_345_678, "cpu_images_per_s": 10.0, "gap_closed": 0.0,
                      "source_miou": 71.25, "arch": "deeplabv3_resnet18"},
        "distill": {"miou": 45.0, "params": 1_500_000, "cpu_images_per_s": 80.26,
                    "gap_closed": gap_closed(45.0, 40.0, 50.0), "arch": "mobilenetv3_lraspp"},
        "corte": {"miou": 46.2, "params": 1_500_000, "cpu_images_per_s": 80.0, "gap_closed": 0.54,
                  "arch": "mobilenetv3_lraspp"},
        "oracle": {"miou": 50.0, "params": 1_500_000, "cpu_images_per_s": 79.0, "gap_closed": None,
                   "arch": "mobilenetv3_lraspp"},
    }
    cmd = "corte-ray demo --quick --out /tmp/demo"
    md = results_markdown(rows, cmd, "Synthetic benchmark")
    lines = md.splitlines()
    assert lines[0] == "## Synthetic benchmark"
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert table[0] == ("| method | model | target-val mIoU | source-val mIoU | gap closed | params (M) "
                        "| CPU img/s |")
    assert all(ln.count("|") == table[0].count("|") for ln in table)
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]}
    assert list(body) == list(rows)
    assert body["black box"] == ["black box", "deeplabv3_resnet18", "40.00", "71.25", "0 %", "12.35", "10.0"]
    assert body["distill"] == ["distill", "mobilenetv3_lraspp", "45.00", "–", "50 %", "1.50", "80.3"]
    assert body["corte"][4] == "54 %"
    assert body["oracle"][3] == "–" and body["oracle"][4] == "–"
    assert cmd in lines[lines.index(table[-1]):]


def test_plot_curves_writes_a_png(tmp_path):
    out = tmp_path / "curves.png"
    path = plot_curves({"distill": [(100, 30.0), (50, 25.0), (150, 33.0)], "corte": [(50, 26.0), (150, 36.0)],
                        "empty": []}, out, box_miou=31.4, title="test")
    assert path == out
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    plot_curves({}, tmp_path / "none.png")  # nothing to draw is still a valid PNG
    Image.open(tmp_path / "none.png").load()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "none.png"]
