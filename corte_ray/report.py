"""Human-readable results of a comparison run: a PNG grid of predictions, mIoU-vs-step curves and a Markdown table.

* `prediction_grid` - rows of (image, ground truth, each method's prediction), colourised, upscaled with NEAREST
  so every label pixel stays one flat block, with column titles and a class-colour legend (Pillow only).
* `plot_curves` / `read_curve` - target-val mIoU per training step of each run (from its metrics.jsonl), with the
  black box as a dashed reference line (matplotlib's object-oriented `Figure` API: no pyplot, no GUI backend).
* `results_markdown` / `gap_closed` - the results table of `corte-ray demo` and the share of the
  black-box-to-oracle gap a method closes.

Every PNG is written atomically (a temporary file beside the target, then `os.replace`), so a killed run never
leaves a truncated image behind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io_utils import write_atomic

from .data.labels import IGNORE  # noqa: E402 - the one ignore index (255)

__all__ = ["GridLayout", "prediction_grid", "plot_curves", "read_curve", "results_markdown", "gap_closed"]

# Grid layout, in output pixels.
_MARGIN = 12  # around everything
_GAP = 6  # between tiles (white)
_FONT_SIZE = 16
_TITLE_GAP = 4  # between a column title and its tiles
_LEGEND_TOP = 14  # between the last row of tiles and the legend
_SWATCH_TEXT = 6  # between a legend swatch and its name
_LEGEND_ENTRY_GAP = 18  # between legend entries on one line
_LEGEND_LINE_GAP = 6  # between legend lines


@dataclass(frozen=True)
class GridLayout:
    """Where `prediction_grid` put things: the file, its size and the top-left corner of every tile."""

    path: Path
    size: tuple[int, int]  # (width, height) of the PNG
    tile_size: tuple[int, int]  # (width, height) of one upscaled tile
    column_titles: tuple[str, ...]
    origins: tuple[tuple[tuple[int, int], ...], ...]  # origins[row][col] = (x, y)
    legend: tuple[tuple[int, str], ...]  # (train id, name) per legend entry, in drawing order

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        return self.origins[row][col]


def _lut(palette: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """A (C,3) or (256,3) palette -> a (256,3) uint8 look-up table; ids past the palette and 255 are black."""
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or len(pal) == 0:
        raise ValueError(f"palette must be a (C, 3) array of RGB colours, got shape {pal.shape}")
    if pal.min() < 0 or pal.max() > 255:
        raise ValueError("palette colours must lie in 0..255")
    lut = np.zeros((256, 3), dtype=np.uint8)
    n = min(len(pal), 256)
    lut[:n] = pal[:n].astype(np.uint8)
    lut[IGNORE] = 0
    return lut


def _as_rgb(image: np.ndarray, where: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{where}: expected an HxWx3 image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{where}: expected a uint8 image, got {img.dtype}")
    return img[..., :3]


def _as_labels(labels: np.ndarray, where: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"{where}: expected an HxW label map, got shape {lab.shape}")
    if lab.dtype != np.uint8:
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{where}: label maps must be integer train ids, got {lab.dtype}")
        if lab.size and (lab.min() < 0 or lab.max() > 255):
            raise ValueError(f"{where}: train ids must lie in 0..255 (min {lab.min()}, max {lab.max()})")
        lab = lab.astype(np.uint8)
    return lab


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()  # the small bitmap font


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(math.ceil(right - left))


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis if it is wider than `width`."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """Greedy word wrap of a column title into at most `max_lines` lines of at most `width` pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split() or [""]:
        trial = f"{current} {word}".strip()
        if not current or _text_width(draw, trial, font) <= width:
            current = trial
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_fit(draw, line, font, width) for line in lines]


def prediction_grid(images: Sequence[np.ndarray], columns: Mapping[str, Sequence[np.ndarray]],
                    class_names: Sequence[str], palette: np.ndarray | Sequence[Sequence[int]],
                    out_path: str | Path, scale: int = 3, legend: str = "present") -> GridLayout:
    """Write a PNG grid: one row per image; columns "image", then each entry of `columns`, colourised.

    `images`: HxWx3 uint8 arrays, all the same size. `columns`: {title: one HxW label map (train ids, 255 =
    ignore) per image}, in display order (e.g. "ground truth", "black box", "distill", "corte").
    `palette`: (C,3) or (256,3) colours by train id; 255 (ignore) and ids without a colour are drawn black.
    Every tile is upscaled `scale` times with NEAREST, so the tile pixel at (y*scale, x*scale) is exactly
    palette[label[y, x]]. Under the grid, a legend: a swatch and a name for every class that occurs in any
    label map (`legend="present"`, plus "ignore" when 255 occurs) or for every class in `class_names`
    (`legend="all"`). Returns the layout (path, size and tile positions).
    """
    from PIL import Image, ImageDraw

    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if legend not in ("present", "all"):
        raise ValueError(f"legend must be 'present' or 'all', got {legend!r}")
    if not images:
        raise ValueError("prediction_grid needs at least one image")
    scale = int(scale)
    lut = _lut(palette)
    rgb = [_as_rgb(img, f"images[{i}]") for i, img in enumerate(images)]
    h, w = rgb[0].shape[:2]
    for i, img in enumerate(rgb):
        if img.shape[:2] != (h, w):
            raise ValueError(f"images[{i}] is {img.shape[0]}x{img.shape[1]}, images[0] is {h}x{w}: "
                             "every row must have the same size")
    label_cols: dict[str, list[np.ndarray]] = {}
    for title, maps in columns.items():
        if len(maps) != len(rgb):
            raise ValueError(f"column {title!r} has {len(maps)} label maps for {len(rgb)} images")
        label_cols[str(title)] = [_as_labels(m, f"columns[{title!r}][{i}]") for i, m in enumerate(maps)]
        for i, m in enumerate(label_cols[str(title)]):
            if m.shape != (h, w):
                raise ValueError(f"columns[{title!r}][{i}] is {m.shape[0]}x{m.shape[1]}, the image is {h}x{w}")

    # Legend entries.
    if legend == "all":
        entries = [(i, str(name)) for i, name in enumerate(class_names)]
    else:
        present = np.zeros(256, dtype=bool)
        for maps in label_cols.values():
            for m in maps:
                present[np.unique(m)] = True
        entries = [(int(i), str(class_names[i]) if i < len(class_names) else f"class {i}")
                   for i in np.flatnonzero(present) if i != IGNORE]
        if present[IGNORE]:
            entries.append((IGNORE, "ignore"))

    titles = ["image", *label_cols]
    ncols, nrows = len(titles), len(rgb)
    tw, th = w * scale, h * scale
    grid_w = ncols * tw + (ncols - 1) * _GAP
    font = _font(_FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (_FONT_SIZE, 4)
    line_h = ascent + descent + 2

    wrapped = [_wrap(measure, t, font, tw) for t in titles]
    header_h = max(len(lines) for lines in wrapped) * line_h + _TITLE_GAP

    # Legend flow: entries left to right, wrapping at the grid's width.
    swatch = ascent
    placed: list[tuple[int, int, int, str]] = []  # (x, line, id, text)
    x, line = 0, 0
    for cid, name in entries:
        text = _fit(measure, name, font, max(grid_w - swatch - _SWATCH_TEXT, 10))
        entry_w = swatch + _SWATCH_TEXT + _text_width(measure, text, font)
        if x and x + entry_w > grid_w:
            x, line = 0, line + 1
        placed.append((x, line, cid, text))
        x += entry_w + _LEGEND_ENTRY_GAP
    legend_h = (line + 1) * line_h + line * _LEGEND_LINE_GAP if placed else 0

    width = 2 * _MARGIN + grid_w
    grid_top = _MARGIN + header_h
    grid_bottom = grid_top + nrows * th + (nrows - 1) * _GAP
    height = grid_bottom + (_LEGEND_TOP + legend_h if placed else 0) + _MARGIN

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    origins = []
    for r in range(nrows):
        y0 = grid_top + r * (th + _GAP)
        row_origins = []
        tiles = [rgb[r]] + [lut[maps[r]] for maps in label_cols.values()]
        for c, tile in enumerate(tiles):
            x0 = _MARGIN + c * (tw + _GAP)
            canvas[y0:y0 + th, x0:x0 + tw] = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            row_origins.append((x0, y0))
        origins.append(tuple(row_origins))

    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    for c, lines in enumerate(wrapped):
        x0 = _MARGIN + c * (tw + _GAP)
        # Bottom-align the titles so every column's last title line sits just above its tiles.
        y = grid_top - _TITLE_GAP - len(lines) * line_h
        for text in lines:
            draw.text((x0 + (tw - _text_width(draw, text, font)) // 2, y), text, fill=(0, 0, 0), font=font)
            y += line_h
    legend_top = grid_bottom + _LEGEND_TOP
    for x, ln, cid, text in placed:
        lx, ly = _MARGIN + x, legend_top + ln * (line_h + _LEGEND_LINE_GAP)
        sy = ly + (line_h - swatch) // 2
        draw.rectangle([lx, sy, lx + swatch - 1, sy + swatch - 1], fill=tuple(int(v) for v in lut[cid]),
                       outline=(90, 90, 90))
        draw.text((lx + swatch + _SWATCH_TEXT, ly), text, fill=(0, 0, 0), font=font)

    path = write_atomic(out_path, lambda tmp: out.save(tmp, format="PNG"))
    return GridLayout(path=Path(path), size=(width, height), tile_size=(tw, th), column_titles=tuple(titles),
                      origins=tuple(origins), legend=tuple((cid, name) for cid, name in entries))


def read_curve(metrics_jsonl_path: str | Path) -> list[tuple[int, float]]:
    """A run's metrics.jsonl -> sorted (step, val_miou) pairs, one per step (the last line for a step wins).

    Lines without a finite "val_miou" are skipped, and so is a torn last line (a run killed mid-write);
    an unreadable line anywhere else raises ValueError naming it.
    """
    path = Path(metrics_jsonl_path)
    lines = path.read_text().splitlines()
    by_step: dict[int, float] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines):
                break  # torn last line
            raise ValueError(f"{path}:{n}: not a JSON object per line ({e})") from None
        if "val_miou" not in record or "step" not in record:
            continue
        try:
            step, value = int(record["step"]), float(record["val_miou"])
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            by_step[step] = value
    return sorted(by_step.items())


def plot_curves(curves: Mapping[str, Sequence[tuple[int, float]]], out_path: str | Path,
                box_miou: float | None = None, title: str = "target-val mIoU during adaptation") -> Path:
    """Write a PNG: one line with markers per method (`curves` = {method: [(step, val_miou), ...]}), the
    black box as a horizontal dashed line labelled "black box (x.xx)", labelled axes, a legend and a grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas: no pyplot state, no display needed
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^vP*X"
    for i, (method, points) in enumerate(curves.items()):
        points = sorted((int(s), float(v)) for s, v in points)
        if not points:
            continue
        steps, values = zip(*points)
        ax.plot(steps, values, marker=markers[i % len(markers)], markersize=5, linewidth=1.8, label=str(method))
    if box_miou is not None and math.isfinite(float(box_miou)):
        ax.axhline(float(box_miou), linestyle="--", color="black", linewidth=1.4,
                   label=f"black box ({float(box_miou):.2f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("target-val mIoU")
    ax.set_title(title)
    ax.grid(True, alpha=0.35)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", framealpha=0.9)
    fig.tight_layout()
    return write_atomic(out_path, lambda tmp: fig.savefig(tmp, format="png"))


def gap_closed(miou: float | None, box: float | None, oracle: float | None) -> float | None:
    """(miou - box) / (oracle - box): 0 = no better than the black box, 1 = as good as the oracle.
    None when any of them is missing (or NaN) or the oracle is no different from the black box."""
    if miou is None or box is None or oracle is None:
        return None
    miou, box, oracle = float(miou), float(box), float(oracle)
    if not all(math.isfinite(v) for v in (miou, box, oracle)) or oracle == box:
        return None
    return (miou - box) / (oracle - box)


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "–"
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "–"
    return "–" if not math.isfinite(v) else format(v, fmt)


def _md_escape(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def results_markdown(rows: Mapping[str, Mapping[str, object]], command: str, title: str) -> str:
    """A Markdown results table, one row per method in `rows` order, with the command that produced it.

    Each row: {"miou": target-val mIoU 0-100, "params": int, "cpu_images_per_s": float, "gap_closed": fraction
    or None, "source_miou": optional float (only the black box has one), "arch": str}. A missing value is "–".
    """
    header = ["method", "model", "target-val mIoU", "source-val mIoU", "gap closed", "params (M)", "CPU img/s"]
    out = [f"## {title}", "", "| " + " | ".join(header) + " |",
           "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|"]
    for method, row in rows.items():
        params = row.get("params")
        gap = row.get("gap_closed")
        cells = [
            _md_escape(method),
            _md_escape(row.get("arch") or "–"),
            _cell(row.get("miou"), ".2f"),
            _cell(row.get("source_miou"), ".2f"),
            "–" if _cell(gap, ".0f") == "–" else f"{round(float(gap) * 100):d} %",  # type: ignore[arg-type]
            _cell(None if params is None else float(params) / 1e6, ".2f"),  # type: ignore[arg-type]
            _cell(row.get("cpu_images_per_s"), ".1f"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Command:", "", "```", command, "```", ""]
    return "\n".join(out)
