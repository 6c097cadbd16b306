"""The embedded two-domain benchmark: procedural street scenes in a "source" and a "target" look.

Lets a new user and CI watch domain adaptation with nothing to download. Both domains share the scene
*geometry* (a street in perspective: sky, buildings with windows along both sides, road with lane markings,
sidewalks, grass strips, trees, poles with signs and traffic lights, cars, people), so layout and shape cues
transfer. Two scenarios (SCENARIOS, `corte-ray synth --scenario`) set what shifts. In "cross-city" both
domains have the 'real' look below but are two cities (_CITY_A_STYLE, labelled: warm and sunny;
_CITY_B_STYLE, the unlabelled target: grey and rainy) with their own layout statistics, palettes and light,
a smaller gap in the spirit of the Cityscapes -> NTHU cross-city setting. In "synth-to-real" (the default)
the *appearance* shifts:

* source "synthetic": one flat, saturated colour per class (small per-instance variation), hard edges,
  uniform light, no noise, no blur;
* target "real": colours moved 70 % of the way (DomainStyle.palette_mix) from the source palette to muted
  'real' ones, with larger per-instance variation, textures (asphalt grain, paving,
  bricks, leaves, clouds), light gradients, cast shadows on the ground, colour casts, blur, sensor noise and
  JPEG artefacts, and other object statistics (lower horizon, lower buildings, more and smaller cars and
  people, more trees).

Some target colours sit between two source classes on purpose (dark target sidewalk near source road,
target grass between source grass and source trees), so a source model is unsure, not confidently wrong
everywhere: the gap is real but leaves an adaptation method something to work with.

Scenes are drawn in world units of the camera height: a ground point at lateral offset u and depth z appears
at x = vx + f*u/z, y = horizon + f/z, which puts every road, sidewalk or grass boundary on a line through the
vanishing point (a sector test on u = (x - vx) / (y - horizon)), and every object's size in proportion to
f/z. Labels and colours come from one painter's-order pass (far objects first), so they always align.

Files: source in GTA5 layout (images/, labels/ of Cityscapes label ids; training images NNNNN.png listed in
source/train.txt, held-out ones val_NNNNN.png in source/val.txt), target in Cityscapes layout (leftImg8bit/,
gtFine/ with train and val splits). Each image has its own generator seeded from (seed, domain, split, index
[, scenario]), so the same seed gives the same image whatever the image counts, and the same arguments give
byte-identical files (no wall-clock or other run-dependent value in stats.json or README.txt).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..io_utils import write_bytes_atomic, write_json_atomic, write_text_atomic
from ..log import progress
from .labels import CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_TABLE, TRAIN_PALETTE

log = logging.getLogger(__name__)

# Cityscapes *label* ids (what the PNGs hold), not train ids.
ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    7, 8, 11, 17, 19, 20, 21, 22, 23, 24, 26)
SYNTH_LABEL_IDS: tuple[int, ...] = (ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
                                    PERSON, CAR)
_LABEL_NAMES = {lid: name for name, lid, _, _ in CITYSCAPES_TABLE}
_GROUND = (ROAD, SIDEWALK, TERRAIN)

DOMAINS = ("source", "target")
TARGET_TRAIN_CITIES = ("synthbury", "renderton")
TARGET_VAL_CITIES = ("valmont",)
CITYSCAPES_FRAME = 19
MIN_SIZE = 64
PNG_COMPRESS_LEVEL = 6
JPEG_QUALITY = (35, 75)

RGB = tuple[float, float, float]


# ------------------------------------------------------------------------------------------ domain styles
@dataclass(frozen=True)
class DomainStyle:
    """What differs between the domains: palettes (lists of base colours, one picked per instance),
    per-instance colour jitter, and the distributions of the scene layout. Ranges are uniform (lo, hi)."""

    name: str
    palette: dict[str, tuple[RGB, ...]]
    brightness_jitter: float       # relative std of per-instance brightness
    channel_jitter: float          # std of per-instance, per-channel offsets (0..255 units)
    horizon: tuple[float, float]   # horizon row as a fraction of the image height
    bottom_depth: tuple[float, float]  # depth of the bottom image row, in camera heights (sets f)
    building_height: tuple[float, float]  # in camera heights (camera ~1.5 m above the road)
    building_prob: float           # a street-side segment is a building (else a tree row over grass)
    n_cars: tuple[int, int]
    car_scale: tuple[float, float]
    n_people: tuple[int, int]
    person_scale: tuple[float, float]
    n_trees: tuple[int, int]
    n_poles: tuple[int, int]       # extra poles beyond the one sign and one traffic light always drawn
    terrain_strip_prob: float
    # How far instance colours move from the base palette (the palette of STYLES[palette_base]) towards this
    # style's own (1 = own palette only): the one knob for the size of the colour shift.
    palette_mix: float = 1.0
    palette_base: str = "source"
    # The 'real' look (_real_look: textures, sky haze and clouds, shadows, light, colour cast, blur, noise,
    # JPEG) instead of flat colours. The fields below only act where it is on; their defaults are the target
    # look of the synth-to-real scenario.
    real_look: bool = False
    texture_gain: float = 0.0          # scales _TEXTURE_AMPLITUDE; 0 = flat colours
    noise_std: tuple[float, float] = (0.0, 0.0)
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    shadow_prob: float = 0.7           # chance of a cast shadow from the facades on the sun side
    shadow_factor: tuple[float, float] = (0.5, 0.7)  # light left in that shadow (lower = darker)
    object_shadow: float = 1.0         # scales the darkness of the soft shadows under objects
    light_strength: tuple[float, float] = (0.15, 0.45)  # light gradient across the image
    exposure: tuple[float, float] = (0.8, 1.15)
    cast_std: float = 0.05             # per-image random white-balance error (relative, per channel)
    cast_tint: RGB = (1.0, 1.0, 1.0)   # this domain's fixed colour of the light (per-channel gain)
    haze: tuple[float, float] = (0.1, 0.35)  # sky haze towards the horizon (fraction of haze_level)
    haze_level: float = 225.0
    cloud_threshold: tuple[float, float] = (-0.2, 0.5)  # lower = more cloud cover
    cloud_brightness: tuple[float, float] = (200.0, 240.0)
    jpeg_quality: tuple[int, int] = JPEG_QUALITY


_SOURCE_STYLE = DomainStyle(
    name="source",
    palette={
        "sky": ((70, 150, 240),),
        "road": ((88, 80, 108),),
        "marking": ((245, 245, 245),),
        "sidewalk": ((210, 160, 150),),
        "curb": ((230, 200, 190),),
        "building": ((215, 120, 70), (195, 170, 105), (175, 105, 150)),
        "window": ((60, 110, 205),),
        "pole": ((170, 170, 185),),
        "light": ((215, 165, 20),),
        "lamp": ((255, 40, 30), (40, 230, 60)),
        "sign": ((30, 90, 230), (230, 40, 40), (250, 220, 0)),
        "sign_border": ((250, 250, 250),),
        "vegetation": ((35, 160, 50),),
        "trunk": ((125, 80, 35),),
        "terrain": ((155, 215, 70),),
        "shirt": ((220, 40, 40), (40, 80, 220), (240, 200, 30), (40, 170, 90), (230, 230, 230)),
        "pants": ((30, 30, 120), (40, 40, 40), (120, 80, 40)),
        "skin": ((240, 190, 150), (175, 115, 75)),
        "car": ((220, 30, 30), (30, 60, 210), (240, 240, 240), (35, 35, 35), (250, 200, 20), (40, 160, 60)),
        "car_window": ((90, 145, 195),),
        "wheel": ((20, 20, 20),),
        "tail_light": ((255, 40, 40),),
    },
    brightness_jitter=0.06, channel_jitter=6.0,
    horizon=(0.36, 0.46), bottom_depth=(2.3, 2.9), building_height=(4.0, 11.0), building_prob=0.8,
    n_cars=(1, 4), car_scale=(0.95, 1.15), n_people=(1, 4), person_scale=(0.95, 1.1), n_trees=(1, 3),
    n_poles=(0, 2), terrain_strip_prob=0.55,
)

_TARGET_STYLE = DomainStyle(
    name="target",
    palette={
        "sky": ((150, 180, 222), (192, 200, 212), (120, 162, 220)),
        "road": ((112, 110, 112), (92, 93, 97), (128, 124, 118)),
        "marking": ((195, 190, 165), (175, 175, 170)),
        "sidewalk": ((158, 148, 142), (118, 112, 112), (178, 160, 140)),
        "curb": ((175, 172, 165),),
        "building": ((150, 140, 125), (120, 115, 110), (160, 112, 88), (185, 175, 160), (98, 92, 90)),
        "window": ((45, 52, 62), (85, 98, 112)),
        "pole": ((105, 110, 115), (135, 138, 142), (80, 82, 86)),
        "light": ((40, 40, 38), (92, 88, 50), (150, 120, 40)),
        "lamp": ((190, 60, 40), (70, 170, 90), (210, 160, 50)),
        "sign": ((200, 175, 60), (50, 80, 160), (180, 55, 45)),
        "sign_border": ((215, 215, 210),),
        "vegetation": ((62, 95, 42), (82, 112, 52), (52, 76, 42)),
        "trunk": ((82, 66, 52),),
        "terrain": ((122, 165, 70), (150, 152, 90), (100, 142, 62)),
        "shirt": ((60, 60, 70), (120, 42, 42), (52, 62, 100), (150, 140, 120), (200, 200, 195)),
        "pants": ((40, 40, 50), (70, 72, 92), (100, 86, 70)),
        "skin": ((205, 165, 135), (140, 102, 78)),
        "car": ((152, 152, 158), (62, 64, 70), (205, 205, 205), (42, 48, 82), (112, 32, 32), (22, 22, 24)),
        "car_window": ((42, 52, 62),),
        "wheel": ((26, 26, 26),),
        "tail_light": ((190, 40, 40),),
    },
    brightness_jitter=0.12, channel_jitter=9.0,
    horizon=(0.44, 0.54), bottom_depth=(2.3, 2.9), building_height=(3.0, 8.0), building_prob=0.65,
    n_cars=(2, 6), car_scale=(0.8, 1.0), n_people=(2, 7), person_scale=(0.85, 1.0), n_trees=(2, 5),
    n_poles=(1, 3), terrain_strip_prob=0.65,
    palette_mix=0.7, real_look=True, texture_gain=0.6, noise_std=(2.0, 5.0), blur_sigma=(0.4, 0.8),
)

# The cross-city scenario (as in the Cityscapes -> NTHU "cross-city" setting): two 'real'-looking cities
# that share the renderer and the textures but differ in layout statistics, palette and light.
# Each city's instance colours sit halfway (_CITY_PALETTE_MIX) between the shared 'real' palette of the
# synth-to-real target (the same materials everywhere) and the city's own: the knob for the size of the gap.
# At 0.5 a tiny CNN trained on 80 city-A images at 64x128 drops from ~76-78 % pixel accuracy on held-out
# city A to ~60-64 % on city B (synth-to-real: ~89 % -> ~56 %); at 1.0 the palettes alone take it below 50 %.
_CITY_PALETTE_MIX = 0.5
# City A, labelled (the source): a warm, sunny southern town: sandstone and terracotta, blue sky, warm light,
# hard shadows; dense and tall blocks, few trees, a lively street.
_CITY_A_STYLE = DomainStyle(
    name="city-a",
    palette={
        "sky": ((105, 160, 232), (130, 178, 236), (88, 148, 226)),
        "road": ((122, 116, 108), (106, 102, 98), (138, 130, 118)),
        "marking": ((232, 228, 205), (215, 210, 180)),
        "sidewalk": ((196, 176, 150), (176, 158, 136), (206, 192, 166)),
        "curb": ((206, 196, 176),),
        "building": ((200, 132, 88), (212, 178, 126), (226, 210, 180), (182, 104, 76), (196, 160, 110)),
        "window": ((52, 64, 82), (96, 116, 140)),
        "pole": ((116, 118, 114), (150, 148, 140), (88, 88, 84)),
        "light": ((44, 44, 40), (104, 96, 52), (164, 130, 44)),
        "lamp": ((212, 62, 40), (70, 190, 92), (226, 172, 52)),
        "sign": ((214, 186, 62), (48, 88, 176), (196, 58, 44)),
        "sign_border": ((226, 224, 216),),
        "vegetation": ((82, 116, 46), (104, 128, 56), (66, 98, 42)),
        "trunk": ((96, 74, 54),),
        "terrain": ((158, 162, 84), (176, 166, 100), (132, 152, 72)),
        "shirt": ((226, 222, 210), (196, 62, 52), (62, 104, 170), (222, 182, 72), (84, 150, 110)),
        "pants": ((52, 58, 90), (182, 166, 136), (92, 74, 60)),
        "skin": ((214, 170, 136), (150, 106, 78)),
        "car": ((206, 206, 202), (176, 38, 36), (60, 86, 150), (232, 226, 214), (38, 40, 44), (150, 152, 158)),
        "car_window": ((50, 62, 76),),
        "wheel": ((28, 28, 28),),
        "tail_light": ((206, 44, 40),),
    },
    brightness_jitter=0.10, channel_jitter=8.0,
    horizon=(0.38, 0.48), bottom_depth=(2.3, 2.9), building_height=(5.0, 11.0), building_prob=0.85,
    n_cars=(1, 4), car_scale=(0.9, 1.05), n_people=(2, 6), person_scale=(0.9, 1.05), n_trees=(1, 3),
    n_poles=(0, 2), terrain_strip_prob=0.4,
    palette_mix=_CITY_PALETTE_MIX, palette_base="target",
    real_look=True, texture_gain=0.55, noise_std=(1.5, 3.5), blur_sigma=(0.35, 0.6),
    shadow_prob=0.9, shadow_factor=(0.42, 0.58), object_shadow=1.15, light_strength=(0.2, 0.45),
    exposure=(0.92, 1.1), cast_std=0.035, cast_tint=(1.03, 1.0, 0.95), haze=(0.05, 0.2), haze_level=230.0,
    cloud_threshold=(0.3, 0.8), cloud_brightness=(225.0, 245.0), jpeg_quality=(45, 80),
)

# City B, unlabelled (the target): a grey, rainy northern city: concrete and dark brick, overcast sky,
# dim cool light, soft weak shadows; lower buildings, more greenery and grass, more and smaller cars,
# fewer people, a lower horizon.
_CITY_B_STYLE = DomainStyle(
    name="city-b",
    palette={
        "sky": ((172, 178, 186), (152, 160, 170), (192, 194, 198)),
        "road": ((82, 84, 90), (94, 96, 102), (72, 74, 80)),
        "marking": ((188, 188, 182), (168, 170, 168)),
        "sidewalk": ((132, 130, 132), (112, 112, 116), (146, 140, 136)),
        "curb": ((156, 156, 154),),
        "building": ((128, 128, 130), (102, 100, 102), (140, 98, 88), (156, 154, 150), (86, 86, 92)),
        "window": ((40, 46, 56), (78, 90, 104)),
        "pole": ((96, 100, 106), (124, 128, 134), (72, 74, 80)),
        "light": ((36, 36, 36), (84, 82, 52), (136, 112, 40)),
        "lamp": ((186, 58, 42), (64, 164, 88), (200, 150, 50)),
        "sign": ((190, 166, 58), (46, 74, 150), (170, 52, 44)),
        "sign_border": ((204, 206, 204),),
        "vegetation": ((50, 84, 46), (62, 96, 54), (42, 70, 42)),
        "trunk": ((70, 60, 50),),
        "terrain": ((92, 124, 66), (108, 128, 76), (82, 114, 60)),
        "shirt": ((52, 54, 62), (104, 40, 42), (46, 58, 92), (128, 122, 110), (176, 178, 176)),
        "pants": ((34, 36, 44), (62, 66, 84), (86, 76, 64)),
        "skin": ((198, 160, 132), (134, 98, 76)),
        "car": ((140, 142, 148), (56, 58, 64), (188, 190, 192), (38, 44, 74), (100, 30, 32), (24, 24, 26)),
        "car_window": ((38, 46, 56),),
        "wheel": ((24, 24, 24),),
        "tail_light": ((180, 38, 38),),
    },
    brightness_jitter=0.12, channel_jitter=9.0,
    horizon=(0.45, 0.55), bottom_depth=(2.3, 2.9), building_height=(3.0, 7.5), building_prob=0.6,
    n_cars=(2, 6), car_scale=(0.8, 0.95), n_people=(1, 3), person_scale=(0.85, 1.0), n_trees=(2, 5),
    n_poles=(1, 3), terrain_strip_prob=0.7,
    palette_mix=_CITY_PALETTE_MIX, palette_base="target",
    real_look=True, texture_gain=0.7, noise_std=(2.5, 5.5), blur_sigma=(0.5, 0.9),
    shadow_prob=0.3, shadow_factor=(0.72, 0.86), object_shadow=0.6, light_strength=(0.08, 0.25),
    exposure=(0.84, 1.02), cast_std=0.04, cast_tint=(0.98, 1.0, 1.03), haze=(0.25, 0.5), haze_level=200.0,
    cloud_threshold=(-0.6, -0.1), cloud_brightness=(175.0, 205.0), jpeg_quality=(30, 65),
)

STYLES: dict[str, DomainStyle] = {"source": _SOURCE_STYLE, "target": _TARGET_STYLE,
                                  "city-a": _CITY_A_STYLE, "city-b": _CITY_B_STYLE}


@dataclass(frozen=True)
class Scenario:
    """Which styles the two domains of a benchmark use, what the target's Cityscapes city folders are called,
    and how the files describe them."""

    name: str
    source: DomainStyle
    target: DomainStyle
    target_train_cities: tuple[str, ...]
    target_val_cities: tuple[str, ...]
    seed_tag: tuple[int, ...]   # appended to every image's seed key: () keeps synth-to-real's images
    source_text: str
    target_text: str


SCENARIOS: dict[str, Scenario] = {
    "synth-to-real": Scenario(
        "synth-to-real", _SOURCE_STYLE, _TARGET_STYLE, TARGET_TRAIN_CITIES, TARGET_VAL_CITIES, (),
        source_text="flat 'synthetic' look",
        target_text="'real' look, JPEG artefacts"),
    "cross-city": Scenario(
        "cross-city", _CITY_A_STYLE, _CITY_B_STYLE, ("rainford",), ("rainford",), (1,),
        source_text="city A 'sunvale': warm, sunny, 'real' look",
        target_text="city B 'rainford': grey, rainy, 'real' look"),
}
DEFAULT_SCENARIO = "synth-to-real"


# ------------------------------------------------------------------------------------------ the canvas
class _Canvas:
    """Label map plus a per-pixel 'part' index (one base colour per drawn part), painted far to near.

    Parts let one class carry several colours (windows on a facade, lane markings on the road, a trunk in a
    tree) while the label stays the class. Shapes are rasterised by pixel centres inside a clipped window,
    so small objects cost little at any image size.
    """

    def __init__(self, h: int, w: int, rng: np.random.Generator, style: DomainStyle) -> None:
        self.h, self.w, self.rng, self.style = h, w, rng, style
        self.label = np.full((h, w), SKY, np.uint8)
        self.part = np.zeros((h, w), np.int32)
        self.colours: list[RGB] = [(0.0, 0.0, 0.0)]
        # Multiplicative light on the ground (cast shadows); used by the real look only.
        self.shade = np.ones((h, w), np.float32)

    def colour(self, key: str, jitter: float = 1.0) -> RGB:
        """One instance colour: a base colour of the palette entry plus this domain's per-instance jitter."""
        choices = self.style.palette[key]
        base = np.asarray(choices[int(self.rng.integers(len(choices)))], np.float64)
        if self.style.palette_mix < 1.0:
            start = STYLES[self.style.palette_base].palette[key]
            start_colour = np.asarray(start[int(self.rng.integers(len(start)))], np.float64)
            base = (1.0 - self.style.palette_mix) * start_colour + self.style.palette_mix * base
        gain = 1.0 + jitter * self.style.brightness_jitter * self.rng.standard_normal()
        offset = jitter * self.style.channel_jitter * self.rng.standard_normal(3)
        c = np.clip(base * gain + offset, 0.0, 255.0)
        return (float(c[0]), float(c[1]), float(c[2]))

    def new_part(self, colour: RGB) -> int:
        self.colours.append(colour)
        return len(self.colours) - 1

    def fill(self, mask: np.ndarray, label_id: int, part: int, y0: int = 0, x0: int = 0) -> None:
        """Paint `mask` (a window whose top-left pixel is (y0, x0)) with a class and a part."""
        if mask.any():
            win = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
            self.label[win][mask] = label_id
            self.part[win][mask] = part

    def _grid(self, y0: float, y1: float, x0: float, x1: float
              ) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """Pixel-centre coordinates of the pixels a box [y0, y1) x [x0, x1) can touch, clipped to the image."""
        iy0, iy1 = max(0, math.floor(y0)), min(self.h, math.ceil(y1))
        ix0, ix1 = max(0, math.floor(x0)), min(self.w, math.ceil(x1))
        if iy1 <= iy0 or ix1 <= ix0:
            return None
        yy = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
        return iy0, ix0, yy, xx

    def rect(self, y0: float, y1: float, x0: float, x1: float, label_id: int, part: int,
             min_px: float = 1.0) -> None:
        """Axis-aligned box; thin ones (poles) are widened to `min_px` so they survive small image sizes."""
        if x1 - x0 < min_px:
            cx = 0.5 * (x0 + x1)
            x0, x1 = cx - 0.5 * min_px, cx + 0.5 * min_px
        if y1 - y0 < min_px:
            cy = 0.5 * (y0 + y1)
            y0, y1 = cy - 0.5 * min_px, cy + 0.5 * min_px
        # pixel j is inside when x0 <= j + 0.5 < x1
        iy0, iy1 = max(0, math.ceil(y0 - 0.5)), min(self.h, math.ceil(y1 - 0.5))
        ix0, ix1 = max(0, math.ceil(x0 - 0.5)), min(self.w, math.ceil(x1 - 0.5))
        if iy1 > iy0 and ix1 > ix0:
            self.label[iy0:iy1, ix0:ix1] = label_id
            self.part[iy0:iy1, ix0:ix1] = part

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, label_id: int, part: int) -> None:
        # a radius of at least 0.71 px always covers the pixel centre nearest to (cy, cx)
        ry, rx = max(ry, 0.71), max(rx, 0.71)
        grid = self._grid(cy - ry, cy + ry, cx - rx, cx + rx)
        if grid is not None:
            y0, x0, yy, xx = grid
            self.fill(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0, label_id, part, y0, x0)

    def trapezoid(self, y0: float, y1: float, top: tuple[float, float], bottom: tuple[float, float],
                  label_id: int, part: int) -> None:
        """Rows y0..y1 whose left/right edges run linearly from `top` (x_left, x_right) to `bottom`."""
        grid = self._grid(y0, y1, min(top[0], bottom[0]), max(top[1], bottom[1]))
        if grid is None or y1 <= y0:
            return
        gy0, gx0, yy, xx = grid
        t = (yy - y0) / (y1 - y0)
        left = top[0] + t * (bottom[0] - top[0])
        right = top[1] + t * (bottom[1] - top[1])
        inside = (yy >= y0) & (yy < y1) & (xx >= left) & (xx < right)
        if not inside.any():  # thinner than a pixel: keep its centre line so it does not vanish
            inside = (yy >= y0) & (yy < y1) & (np.abs(xx - 0.5 * (left + right)) <= 0.5)
        self.fill(inside, label_id, part, gy0, gx0)

    def shadow_ellipse(self, cy: float, cx: float, ry: float, rx: float, strength: float) -> None:
        grid = self._grid(cy - ry, cy + ry, cx - rx, cx + rx)
        if grid is not None and ry > 0 and rx > 0:
            y0, x0, yy, xx = grid
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            # soft edge: full strength in the middle, fading out at the rim
            dark = strength * self.style.object_shadow * np.clip(1.5 * (1.0 - d), 0.0, 1.0)
            win = self.shade[y0:y0 + yy.shape[0], x0:x0 + xx.shape[1]]
            win *= (1.0 - dark).astype(np.float32)


# ------------------------------------------------------------------------------------------ the scene
@dataclass
class _Camera:
    horizon: float   # row of the horizon (pixels, may be fractional)
    vx: float        # column of the vanishing point
    f: float         # pixels per camera height at depth 1

    def project(self, u: float, z: float) -> tuple[float, float, float]:
        """Ground point (lateral u, depth z) -> (x, y, pixels per camera height)."""
        s = self.f / z
        return self.vx + u * s, self.horizon + s, s


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth random field (std ~0.6) with features about `cell` pixels across; bilinear with smoothstep."""
    cell = max(float(cell), 1.0)
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    ys = (np.arange(h, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(w, dtype=np.float32) + 0.5) / cell
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    ty, tx = ys - iy, xs - ix
    ty, tx = (ty * ty * (3 - 2 * ty))[:, None], (tx * tx * (3 - 2 * tx))[None, :]
    g00, g01 = grid[iy][:, ix], grid[iy][:, ix + 1]
    g10, g11 = grid[iy + 1][:, ix], grid[iy + 1][:, ix + 1]
    top = g00 + (g01 - g00) * tx
    bottom = g10 + (g11 - g10) * tx
    return top + (bottom - top) * ty


@dataclass
class _Side:
    """One side of the street: bands (class, width) from the road edge outwards, then the facade line."""

    sign: int                        # -1 left, +1 right
    road_edge: float                 # u of the road edge (camera heights)
    bands: list[tuple[int, float]]   # (label id, width) from the road outwards
    curb: float = 0.12               # width of the curb stone at a sidewalk next to the road

    @property
    def facade(self) -> float:
        return self.road_edge + self.sign * sum(w for _, w in self.bands)

    def band_range(self, label_id: int) -> tuple[float, float] | None:
        """(inner, outer) u of the first band of this class, or None."""
        u = self.road_edge
        for lid, width in self.bands:
            nxt = u + self.sign * width
            if lid == label_id:
                return u, nxt
            u = nxt
        return None


def _layout_ground(cv: _Canvas, cam: _Camera, sides: tuple[_Side, _Side], lanes: list[float],
                   edge_lines: bool) -> np.ndarray:
    """Road, sidewalks, grass strips and lane markings as sectors around the vanishing point; returns u."""
    h, w = cv.h, cv.w
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    below = np.broadcast_to(yy > cam.horizon, (h, w))
    dy = np.maximum(yy - cam.horizon, 1e-3)
    u = (xx - cam.vx) / dy

    left, right = sides
    # sector boundaries in increasing u, and the part painted between consecutive ones
    bounds: list[float] = []
    parts: list[tuple[int, int]] = [(TERRAIN, cv.new_part(cv.colour("terrain")))]  # beyond the left facade
    u_edge = left.facade
    for lid, width in reversed(left.bands):
        bounds.append(u_edge)
        parts.append((lid, cv.new_part(cv.colour(_band_key(lid)))))
        u_edge += width
    road_part = cv.new_part(cv.colour("road"))
    bounds.append(left.road_edge)
    parts.append((ROAD, road_part))
    u_edge = right.road_edge
    for lid, width in right.bands:
        bounds.append(u_edge)
        parts.append((lid, cv.new_part(cv.colour(_band_key(lid)))))
        u_edge += width
    bounds.append(right.facade)
    parts.append((TERRAIN, cv.new_part(cv.colour("terrain"))))

    sector = np.searchsorted(np.asarray(bounds, np.float32), u)
    sector_label = np.asarray([p[0] for p in parts], np.uint8)
    sector_part = np.asarray([p[1] for p in parts], np.int32)
    cv.label[below] = sector_label[sector[below]]
    cv.part[below] = sector_part[sector[below]]

    # curb stones: the road-side rim of a sidewalk, still sidewalk
    for side in sides:
        if side.bands and side.bands[0][0] == SIDEWALK:
            lo, hi = sorted((side.road_edge, side.road_edge + side.sign * side.curb))
            cv.fill(below & (u >= lo) & (u < hi), SIDEWALK, cv.new_part(cv.colour("curb")))

    # lane markings (road, as in Cityscapes): dashed between lanes, optionally solid along the edges
    depth = cam.f / dy
    marking = np.zeros((h, w), bool)
    half = 0.06
    dash_len, dash_duty = float(cv.rng.uniform(3.0, 5.0)), float(cv.rng.uniform(0.35, 0.55))
    dash_phase = float(cv.rng.uniform(0, 1))
    dashed = ((depth / dash_len + dash_phase) % 1.0) < dash_duty
    for ub in lanes:
        marking |= (np.abs(u - ub) < half) & dashed
    if edge_lines:
        for ub in (left.road_edge + 0.25, right.road_edge - 0.25):
            marking |= np.abs(u - ub) < half
    cv.fill(below & marking, ROAD, cv.new_part(cv.colour("marking")))
    return u


def _band_key(label_id: int) -> str:
    return {SIDEWALK: "sidewalk", TERRAIN: "terrain", ROAD: "road"}[label_id]


def _layout_facades(cv: _Canvas, cam: _Camera, sides: tuple[_Side, _Side], street_end: float) -> None:
    """Buildings (with windows) or rows of trees along both sides, and a block closing the street far away."""
    style, rng = cv.style, cv.rng
    h, w = cv.h, cv.w
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xc = np.arange(w, dtype=np.float32) + 0.5

    # the far block across the street end, drawn first: the side facades are nearer
    x_l, _, _ = cam.project(sides[0].facade, street_end)
    x_r, y_ground, s_end = cam.project(sides[1].facade, street_end)
    if rng.random() < 0.75:
        height = _uniform(rng, style.building_height)
        cv.rect(y_ground - s_end * height, y_ground, x_l, x_r, BUILDING, cv.new_part(cv.colour("building")))
    else:
        cv.rect(y_ground - s_end * _uniform(rng, (2.0, 4.0)), y_ground, x_l, x_r, VEGETATION,
                cv.new_part(cv.colour("vegetation")))

    for side in sides:
        lateral = abs(side.facade)
        a = side.sign * (xc - cam.vx)                      # columns' pixel offset from the vanishing point
        valid = a > 0.5
        z_col = np.where(valid, cam.f * lateral / np.maximum(a, 0.5), np.inf)
        # segments along the street: each a building of its own height and colour, or a gap with trees
        z_bounds = [0.0]
        while z_bounds[-1] < street_end:
            z_bounds.append(min(z_bounds[-1] + float(rng.uniform(4.0, 14.0)), street_end))
        seg_of_col = np.searchsorted(np.asarray(z_bounds[1:], np.float32), z_col, side="right")
        # height above the ground in camera heights at every pixel of this side's facade plane
        yw = 1.0 - (yy - cam.horizon) * lateral / np.maximum(a, 0.5)[None, :]
        for k in range(len(z_bounds) - 1):
            cols = np.nonzero(valid & (seg_of_col == k))[0]
            if cols.size == 0:
                continue
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            yw_seg = yw[:, c0:c1]
            if rng.random() < style.building_prob:
                height = _uniform(rng, style.building_height)
                body = (yw_seg >= 0.0) & (yw_seg <= height)
                cv.fill(body, BUILDING, cv.new_part(cv.colour("building")), 0, c0)
                _windows(cv, cam, body, yw_seg, a[c0:c1], lateral, height, c0)
            else:
                # a row of trees over a lawn: wavy crown line, grass below the horizon
                # crown line as smooth bumps in world depth, so they shrink in perspective like the trees
                z_seg = z_col[c0:c1]
                phases = rng.uniform(0, 2 * math.pi, 2)
                top = (_uniform(rng, (2.5, 4.5)) + 0.45 * np.sin(z_seg * (2 * math.pi / 5.0) + phases[0])
                       + 0.25 * np.sin(z_seg * (2 * math.pi / 2.3) + phases[1])).astype(np.float32)
                cv.fill((yw_seg >= 1.0) & (yw_seg <= top[None, :]), VEGETATION,
                        cv.new_part(cv.colour("vegetation")), 0, c0)
                cv.fill((yw_seg >= 0.0) & (yw_seg < 1.0), TERRAIN, cv.new_part(cv.colour("terrain")), 0, c0)


def _windows(cv: _Canvas, cam: _Camera, body: np.ndarray, yw: np.ndarray, a: np.ndarray, lateral: float,
             height: float, x0: int) -> None:
    """Window grid on a side facade, regular in world units (so it shrinks in perspective); still building."""
    rng = cv.rng
    floor_h = float(rng.uniform(1.8, 2.3))
    col_period = float(rng.uniform(2.0, 3.5))
    col_duty, row_lo, row_hi = float(rng.uniform(0.35, 0.6)), float(rng.uniform(0.2, 0.35)), 0.75
    z = cam.f * lateral / np.maximum(a, 0.5)
    # windows narrower than ~1.5 px alias into noise near the vanishing point: leave those facades plain
    px_period = col_period * a * a / (cam.f * lateral)
    cols_ok = (px_period >= 3.0) & ((z / col_period + 0.2) % 1.0 < col_duty)
    rows_ok = ((yw / floor_h) % 1.0 > row_lo) & ((yw / floor_h) % 1.0 < row_hi) & (yw > 1.4) & \
        (yw < height - 0.5)
    cv.fill(body & rows_ok & cols_ok[None, :], BUILDING, cv.new_part(cv.colour("window")), 0, x0)


# ---------------------------------------------------------------------------------------- the objects
def _draw_car(cv: _Canvas, x: float, y: float, s: float, scale: float, oncoming: bool) -> None:
    wc, hc = 1.25 * s * scale, s * scale * float(cv.rng.uniform(0.85, 1.1))
    cv.shadow_ellipse(y - 0.02 * hc, x, 0.09 * hc + 0.5, 0.62 * wc, 0.55)
    body = cv.new_part(cv.colour("car"))
    wheel = cv.new_part(cv.colour("wheel", 0.3))
    for side in (-1, 1):
        cv.ellipse(y - 0.1 * hc, x + side * 0.36 * wc, 0.11 * hc, 0.1 * wc, CAR, wheel)
    cv.rect(y - 0.62 * hc, y - 0.12 * hc, x - 0.5 * wc, x + 0.5 * wc, CAR, body)
    cv.trapezoid(y - hc, y - 0.6 * hc, (x - 0.34 * wc, x + 0.34 * wc), (x - 0.46 * wc, x + 0.46 * wc), CAR, body)
    cv.trapezoid(y - 0.93 * hc, y - 0.66 * hc, (x - 0.29 * wc, x + 0.29 * wc), (x - 0.4 * wc, x + 0.4 * wc),
                 CAR, cv.new_part(cv.colour("car_window", 0.5)))
    lamp = cv.new_part(cv.colour("tail_light", 0.5) if not oncoming else cv.colour("marking", 0.3))
    for side in (-1, 1):
        cv.rect(y - 0.5 * hc, y - 0.4 * hc, x + side * 0.44 * wc - 0.06 * wc, x + side * 0.44 * wc + 0.06 * wc,
                CAR, lamp)
    cv.rect(y - 0.24 * hc, y - 0.14 * hc, x - 0.5 * wc, x + 0.5 * wc, CAR, wheel)  # bumper


def _draw_person(cv: _Canvas, x: float, y: float, s: float, scale: float) -> None:
    hp = 1.15 * s * scale * float(cv.rng.uniform(0.9, 1.08))
    cv.shadow_ellipse(y, x, 0.04 * hp + 0.5, 0.2 * hp, 0.45)
    pants = cv.new_part(cv.colour("pants"))
    shirt = cv.new_part(cv.colour("shirt"))
    skin = cv.new_part(cv.colour("skin", 0.5))
    stride = float(cv.rng.uniform(0.0, 0.08)) * hp
    for side in (-1, 1):  # legs, apart when walking
        cv.trapezoid(y - 0.48 * hp, y, (x + side * 0.055 * hp - 0.045 * hp, x + side * 0.055 * hp + 0.045 * hp),
                     (x + side * (0.05 * hp + stride) - 0.04 * hp, x + side * (0.05 * hp + stride) + 0.04 * hp),
                     PERSON, pants)
    cv.trapezoid(y - 0.82 * hp, y - 0.45 * hp, (x - 0.13 * hp, x + 0.13 * hp), (x - 0.11 * hp, x + 0.11 * hp),
                 PERSON, shirt)
    for side in (-1, 1):  # arms
        cv.rect(y - 0.8 * hp, y - 0.5 * hp, x + side * 0.15 * hp - 0.035 * hp, x + side * 0.15 * hp + 0.035 * hp,
                PERSON, shirt)
    cv.ellipse(y - 0.905 * hp, x, 0.08 * hp, 0.062 * hp, PERSON, skin)


def _draw_pole(cv: _Canvas, x: float, y: float, s: float, kind: str, toward_road: int) -> None:
    """A pole carrying a traffic sign or a traffic light (sometimes on an arm over the road)."""
    rng = cv.rng
    pole = cv.new_part(cv.colour("pole"))
    height = float(rng.uniform(2.0, 2.8) if kind == "sign" else rng.uniform(2.4, 3.4)) * s
    width = max(0.09 * s, 1.0)
    cv.shadow_ellipse(y, x + 0.4 * height, 0.03 * s + 0.5, 0.4 * height, 0.35)
    cv.rect(y - height, y, x - 0.5 * width, x + 0.5 * width, POLE, pole)
    top = y - height
    if kind == "sign":
        face = cv.new_part(cv.colour("sign"))
        border = cv.new_part(cv.colour("sign_border", 0.3))
        r = 0.3 * s
        shape = int(rng.integers(3))
        cy = top + r
        if shape == 0:  # round
            cv.ellipse(cy, x, r, r, SIGN, border)
            cv.ellipse(cy, x, 0.78 * r, 0.78 * r, SIGN, face)
        elif shape == 1:  # triangle
            cv.trapezoid(cy - r, cy + 0.8 * r, (x - 0.02 * r, x + 0.02 * r), (x - 1.1 * r, x + 1.1 * r), SIGN,
                         border)
            cv.trapezoid(cy - 0.55 * r, cy + 0.6 * r, (x - 0.02 * r, x + 0.02 * r), (x - 0.75 * r, x + 0.75 * r),
                         SIGN, face)
        else:  # rectangular
            cv.rect(top, top + 1.5 * r, x - 1.1 * r, x + 1.1 * r, SIGN, border)
            cv.rect(top + 0.15 * r, top + 1.35 * r, x - 0.95 * r, x + 0.95 * r, SIGN, face)
        return
    box_x = x
    if rng.random() < 0.35:  # on an arm reaching over the road
        arm = float(rng.uniform(0.8, 1.8)) * s
        box_x = x + toward_road * arm
        cv.rect(top, top + width, min(x, box_x), max(x, box_x), POLE, pole)
    box_colour = cv.colour("light")
    box = cv.new_part(box_colour)
    unlit = cv.new_part((0.55 * box_colour[0], 0.55 * box_colour[1], 0.55 * box_colour[2]))
    bw, bh = 0.26 * s, 0.68 * s
    cv.rect(top, top + bh, box_x - 0.5 * bw, box_x + 0.5 * bw, LIGHT, box)
    lit = int(rng.integers(3))
    for k in range(3):
        lamp = cv.new_part(cv.colour("lamp", 0.5)) if k == lit else unlit
        cv.ellipse(top + (0.17 + 0.28 * k) * bh, box_x, 0.07 * s, 0.07 * s, LIGHT, lamp)


def _draw_tree(cv: _Canvas, x: float, y: float, s: float) -> None:
    rng = cv.rng
    trunk_h = float(rng.uniform(1.2, 2.2)) * s
    crown_r = float(rng.uniform(0.7, 1.3)) * s
    cv.shadow_ellipse(y, x + 0.3 * crown_r, 0.15 * s + 0.5, 1.1 * crown_r, 0.45)
    cv.rect(y - trunk_h, y, x - 0.08 * s, x + 0.08 * s, VEGETATION, cv.new_part(cv.colour("trunk")), min_px=1.0)
    cy = y - trunk_h - 0.6 * crown_r
    for _ in range(int(rng.integers(3, 6))):
        dy, dx = rng.normal(0, 0.35, 2) * crown_r
        r = float(rng.uniform(0.55, 0.85)) * crown_r
        cv.ellipse(cy + dy, x + dx, r, r * float(rng.uniform(0.9, 1.3)), VEGETATION,
                   cv.new_part(cv.colour("vegetation", 0.6)))


def _draw_bush(cv: _Canvas, x: float, y: float, s: float) -> None:
    r = float(cv.rng.uniform(0.3, 0.6)) * s
    cv.ellipse(y - 0.5 * r, x, 0.8 * r, 1.5 * r, VEGETATION, cv.new_part(cv.colour("vegetation", 0.6)))


def _place_objects(cv: _Canvas, cam: _Camera, sides: tuple[_Side, _Side], lanes_centres: list[float],
                   street_end: float) -> list[tuple[float, Callable[[], None]]]:
    """Every object as (depth, draw call); the caller draws them far to near so nearer ones occlude."""
    style, rng = cv.style, cv.rng
    objects: list[tuple[float, Callable[[], None]]] = []

    def at(u: float, z: float, fn: Callable[..., None], *args: object) -> None:
        x, y, s = cam.project(u, z)
        objects.append((z, lambda: fn(cv, x, y, s, *args)))

    def depth(lo: float, hi: float) -> float:  # log-uniform: near and far objects both common
        return float(math.exp(rng.uniform(math.log(lo), math.log(min(hi, street_end - 1.0)))))

    taken: list[tuple[float, float]] = []
    for _ in range(_count(rng, style.n_cars)):
        for _try in range(8):  # keep cars in one lane apart
            if rng.random() < 0.25:  # parked at the kerb
                side = sides[int(rng.integers(2))]
                u = side.road_edge - side.sign * 0.9
            else:
                u = float(rng.choice(lanes_centres)) + float(rng.normal(0, 0.15))
            z = depth(3.2, 45.0)
            if all(abs(u - tu) > 1.6 or abs(z - tz) > 3.5 + 0.15 * z for tu, tz in taken):
                taken.append((u, z))
                at(u, z, _draw_car, _uniform(rng, style.car_scale), u < 0 and rng.random() < 0.7)
                break

    def on_band(side: _Side, label_id: int, margin: float = 0.25) -> float | None:
        band = side.band_range(label_id)
        if band is None:
            return None
        lo, hi = sorted(band)
        return float(rng.uniform(lo + margin, hi - margin)) if hi - lo > 2 * margin else 0.5 * (lo + hi)

    for _ in range(_count(rng, style.n_people)):
        side = sides[int(rng.integers(2))]
        u = on_band(side, SIDEWALK)
        if u is not None:
            at(u, depth(3.0, 30.0), _draw_person, _uniform(rng, style.person_scale))

    # one sign and one traffic light near the camera in every scene, so both small classes are always present
    poles = ["sign", "light"] + [str(rng.choice(["sign", "light"])) for _ in range(_count(rng, style.n_poles))]
    for k, kind in enumerate(poles):
        side = sides[int(rng.integers(2))]
        u = side.road_edge + side.sign * 0.45  # just behind the kerb, on the sidewalk or grass strip
        z = depth(4.0, 12.0) if k < 2 else depth(4.0, 35.0)
        at(u, z, _draw_pole, kind, -side.sign)

    for _ in range(_count(rng, style.n_trees)):
        side = sides[int(rng.integers(2))]
        u = on_band(side, TERRAIN, 0.3)
        if u is None:  # no grass strip: trees stand at the outer edge of the sidewalk
            u = side.facade - side.sign * 0.5
        at(u, depth(4.0, 40.0), _draw_tree)
    for side in sides:
        if side.band_range(TERRAIN) is not None:
            for _ in range(int(rng.integers(0, 3))):
                at(on_band(side, TERRAIN, 0.3) or 0.0, depth(4.0, 30.0), _draw_bush)
    return objects


# ---------------------------------------------------------------------------------------- the looks
_TEXTURE_AMPLITUDE = {  # (fine grain, medium blotches, coarse stains), in 0..255 units, real look only
    ROAD: (7.0, 5.0, 10.0), SIDEWALK: (5.0, 4.0, 8.0), BUILDING: (3.0, 5.0, 10.0), POLE: (2.0, 2.0, 4.0),
    LIGHT: (2.0, 2.0, 3.0), SIGN: (2.0, 2.0, 4.0), VEGETATION: (10.0, 20.0, 12.0), TERRAIN: (9.0, 12.0, 12.0),
    SKY: (0.0, 0.0, 0.0), PERSON: (3.0, 3.0, 3.0), CAR: (2.0, 2.0, 6.0),
}


def _class_lut(values: dict[int, float], default: float = 0.0) -> np.ndarray:
    lut = np.full(256, default, np.float32)
    for lid, v in values.items():
        lut[lid] = v
    return lut


_AMP_LUTS = [_class_lut({lid: amp[k] for lid, amp in _TEXTURE_AMPLITUDE.items()}) for k in range(3)]
_GROUND_LUT = _class_lut({lid: 1.0 for lid in _GROUND}).astype(bool)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an HxWxC float image with edge padding."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    h, w = img.shape[:2]
    pad = np.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    out = sum(t * pad[k:k + h] for k, t in enumerate(taps))
    pad = np.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(t * pad[:, k:k + w] for k, t in enumerate(taps))


def _real_look(cv: _Canvas, img: np.ndarray, cam: _Camera, u: np.ndarray) -> np.ndarray:
    """Turn the flat-colour render into the 'real' look: textures, sky, light, shadows, cast, blur, noise, JPEG.

    How strong each effect is comes from the canvas's style (cv.style): the synth-to-real target and both
    cities of the cross-city scenario go through here.
    """
    rng, style = cv.rng, cv.style
    h, w = cv.h, cv.w
    label = cv.label
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    scale = h / 128.0  # texture feature sizes follow the image size, so every size looks alike

    fine = rng.standard_normal((h, w)).astype(np.float32)
    medium = _value_noise(rng, h, w, 3.0 * scale)
    coarse = _value_noise(rng, h, w, 18.0 * scale)
    gain = style.texture_gain
    texture = gain * (_AMP_LUTS[0][label] * fine + _AMP_LUTS[1][label] * medium + _AMP_LUTS[2][label] * coarse)

    # patterns: bricks on facades, paving slabs in perspective on sidewalks
    course = max(2, int(round(2.5 * scale)))
    brick_row = (yy.astype(np.int64) // course)
    brick_x = (xx.astype(np.int64) + 3 * (brick_row % 2)) % max(4, int(round(6 * scale)))
    bricks = ((yy.astype(np.int64) % course) == 0) | (brick_x == 0)
    texture -= np.where((label == BUILDING) & bricks, 9.0 * gain, 0.0).astype(np.float32)
    depth = cam.f / np.maximum(yy - cam.horizon, 1e-3)
    slab = float(rng.uniform(0.6, 1.0))
    joints = ((depth / slab) % 1.0 < 0.12) | ((u / slab) % 1.0 < 0.1)
    texture -= np.where((label == SIDEWALK) & joints, 12.0 * gain, 0.0).astype(np.float32)
    img = img + texture[..., None]

    # sky: hazier towards the horizon, with clouds
    sky = label == SKY
    haze = np.clip((yy / max(cam.horizon, 1.0)), 0.0, 1.0) * _uniform(rng, style.haze)
    cloud_field = _value_noise(rng, h, w, 22.0 * scale) + 0.5 * _value_noise(rng, h, w, 7.0 * scale)
    clouds = np.clip((cloud_field - _uniform(rng, style.cloud_threshold)) * 1.5, 0.0, 0.85)
    cloud_colour = np.asarray(rng.uniform(*style.cloud_brightness) * np.ones(3), np.float32)
    sky_img = img * (1 - haze[..., None]) + haze[..., None] * style.haze_level
    sky_img = sky_img * (1 - clouds[..., None]) + clouds[..., None] * cloud_colour
    img = np.where(sky[..., None], sky_img, img)

    # cast shadows on the ground: from the buildings on the sun-facing side, plus objects' own
    shade = cv.shade.copy()
    if rng.random() < style.shadow_prob:
        side = int(rng.choice([-1, 1]))
        facade = float(rng.uniform(2.5, 6.0)) * side  # the shadow edge is a line through the vanishing point
        in_shadow = (side * u > abs(facade)) if rng.random() < 0.5 else (side * u > float(rng.uniform(0.0, 2.0)))
        shade = np.where(in_shadow & (yy > cam.horizon), shade * _uniform(rng, style.shadow_factor), shade)
    img = img * np.where(_GROUND_LUT[label], shade, 1.0)[..., None]

    # light falling off across the image, and a colour cast (white balance)
    angle = float(rng.uniform(0, 2 * math.pi))
    strength = _uniform(rng, style.light_strength)
    light = 1.0 + strength * (math.cos(angle) * (xx / w - 0.5) + math.sin(angle) * (yy / h - 0.5))
    exposure = _uniform(rng, style.exposure)
    cast = 1.0 + rng.normal(0.0, style.cast_std, 3).astype(np.float32)
    if style.cast_tint != (1.0, 1.0, 1.0):
        cast = cast * np.asarray(style.cast_tint, np.float32)
    img = img * (light * exposure)[..., None] * cast

    img = _gaussian_blur(img.astype(np.float32), _uniform(rng, style.blur_sigma))
    img = img + rng.normal(0.0, _uniform(rng, style.noise_std), img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=_count(rng, style.jpeg_quality))
    buf.seek(0)
    with Image.open(buf) as jpeg:
        return np.asarray(jpeg.convert("RGB"), dtype=np.uint8).copy()


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """(H, W) as ints, or a ValueError saying why the size cannot be rendered."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}x{MIN_SIZE} (HxW), got {h}x{w}")
    return h, w


def resolve_style(domain: str | DomainStyle) -> DomainStyle:
    """A DomainStyle, or the name of one in STYLES ("source", "target", "city-a", "city-b")."""
    if isinstance(domain, DomainStyle):
        return domain
    if domain not in STYLES:
        raise ValueError(f"domain must be one of {sorted(STYLES)} or a DomainStyle, got {domain!r}")
    return STYLES[domain]


def render_scene(rng: np.random.Generator, size: tuple[int, int], domain: str | DomainStyle
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (RGB image HxWx3 uint8, label HxW uint8 of Cityscapes label ids).

    `domain` is a DomainStyle or its name: "source" (flat synthetic look), "target" (textured 'real' look,
    JPEG-compressed), "city-a" / "city-b" (the two 'real'-looking cities of the cross-city scenario).
    The style's `real_look` flag picks the look; its other fields the layout, palette and light.
    """
    style = resolve_style(domain)
    h, w = check_size(size)
    cv = _Canvas(h, w, rng, style)
    cv.colours[0] = cv.colour("sky")

    horizon = _uniform(rng, style.horizon) * h
    cam = _Camera(horizon=horizon, vx=w * float(np.clip(rng.normal(0.5, 0.06), 0.35, 0.65)),
                  f=(h - horizon) * _uniform(rng, style.bottom_depth))
    # the road: 2 or 3 lanes of 2.0-2.6 camera heights, the camera in one of them
    lane_w = float(rng.uniform(2.0, 2.6))
    n_lanes = int(rng.integers(2, 4))
    cam_lane = int(rng.integers(n_lanes))
    road_left = -lane_w * (cam_lane + float(rng.uniform(0.35, 0.65)))
    road_right = road_left + n_lanes * lane_w
    lane_bounds = [road_left + lane_w * k for k in range(1, n_lanes)]
    lane_centres = [road_left + lane_w * (k + 0.5) for k in range(n_lanes)]

    def side_bands() -> list[tuple[int, float]]:
        bands = [(SIDEWALK, float(rng.uniform(1.5, 3.0)))]
        if rng.random() < style.terrain_strip_prob:  # grass between kerb and sidewalk, or along the facades
            strip = (TERRAIN, float(rng.uniform(0.8, 1.8)))
            bands.insert(0 if rng.random() < 0.5 else 1, strip)
        return bands

    sides = (_Side(-1, road_left, side_bands()), _Side(1, road_right, side_bands()))
    street_end = float(rng.uniform(45.0, 90.0))

    u = _layout_ground(cv, cam, sides, lane_bounds, edge_lines=bool(rng.random() < 0.6))
    _layout_facades(cv, cam, sides, street_end)
    objects = _place_objects(cv, cam, sides, lane_centres, street_end)
    for _, draw in sorted(objects, key=lambda o: -o[0]):
        draw()

    img = np.asarray(cv.colours, np.float32)[cv.part]
    if style.real_look:
        image = _real_look(cv, img, cam, u)
    else:
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, cv.label.copy()


# ---------------------------------------------------------------------------------------- statistics
@dataclass
class DomainStats:
    """Per-domain sums accumulated image by image; the derived numbers are properties."""

    n_images: int = 0
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(len(SYNTH_LABEL_IDS), np.int64))
    class_rgb_sum: np.ndarray = field(default_factory=lambda: np.zeros((len(SYNTH_LABEL_IDS), 3), np.float64))
    grad_sum: float = 0.0
    grad_count: int = 0
    edge_grad_sum: float = 0.0
    edge_grad_count: int = 0
    noise: list[float] = field(default_factory=list)
    brightness: list[float] = field(default_factory=list)

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        ids = np.asarray(SYNTH_LABEL_IDS)
        flat = label.ravel()
        self.n_images += 1
        self.class_pixels += np.bincount(flat, minlength=256)[ids]
        for c in range(3):
            self.class_rgb_sum[:, c] += np.bincount(flat, weights=image[..., c].ravel(), minlength=256)[ids]
        grey = image.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
        gx = grey[:-1, 1:] - grey[:-1, :-1]
        gy = grey[1:, :-1] - grey[:-1, :-1]
        mag = np.sqrt(gx * gx + gy * gy)
        boundary = (label[:-1, 1:] != label[:-1, :-1]) | (label[1:, :-1] != label[:-1, :-1])
        self.grad_sum += float(mag.sum())
        self.grad_count += mag.size
        self.edge_grad_sum += float(mag[boundary].sum())
        self.edge_grad_count += int(boundary.sum())
        self.noise.append(noise_estimate(grey))
        self.brightness.append(float(grey.mean()))

    @property
    def class_frequency(self) -> np.ndarray:
        return 100.0 * self.class_pixels / max(int(self.class_pixels.sum()), 1)

    @property
    def class_mean_rgb(self) -> np.ndarray:
        """Mean RGB per class (NaN where the class never occurs)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.class_rgb_sum / self.class_pixels[:, None]

    @property
    def mean_gradient(self) -> float:
        return self.grad_sum / max(self.grad_count, 1)

    @property
    def edge_sharpness(self) -> float:
        """Mean gradient magnitude on label boundaries: high for hard edges, low for blurred ones."""
        return self.edge_grad_sum / max(self.edge_grad_count, 1)

    @property
    def noise_level(self) -> float:
        return float(np.mean(self.noise)) if self.noise else 0.0

    def to_json(self) -> dict:
        rgb = self.class_mean_rgb
        return {
            "images": self.n_images,
            "class_frequency_percent": {_LABEL_NAMES[lid]: round(float(f), 3)
                                        for lid, f in zip(SYNTH_LABEL_IDS, self.class_frequency)},
            "class_mean_rgb": {_LABEL_NAMES[lid]: (None if np.isnan(c).any() else [round(float(v), 2) for v in c])
                               for lid, c in zip(SYNTH_LABEL_IDS, rgb)},
            "mean_gradient": round(self.mean_gradient, 4),
            "edge_sharpness": round(self.edge_sharpness, 4),
            "noise": round(self.noise_level, 4),
            "brightness_mean": round(float(np.mean(self.brightness)), 3) if self.brightness else None,
            "brightness_std": round(float(np.std(self.brightness)), 3) if self.brightness else None,
        }


def noise_estimate(grey: np.ndarray) -> float:
    """Robust noise level: 1.4826 x median |image - its 3x3 median|; edges are too sparse to move it."""
    h, w = grey.shape
    shifts = np.stack([grey[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3)])
    med = np.partition(shifts, 4, axis=0)[4]
    return float(1.4826 * np.median(np.abs(grey[1:-1, 1:-1] - med)))


@dataclass
class SynthStats:
    """What `render_benchmark` wrote and how the two domains differ (printed by `corte-ray synth`)."""

    seed: int
    size: tuple[int, int]
    counts: dict[str, int]
    domains: dict[str, DomainStats]
    seconds: float = 0.0   # wall-clock of the render: printed, never written (the files stay byte-identical)
    scenario: str = DEFAULT_SCENARIO

    def colour_distance(self) -> np.ndarray:
        """Euclidean distance (RGB, 0..255) between each class's mean colour in source and in target."""
        return np.linalg.norm(self.domains["source"].class_mean_rgb - self.domains["target"].class_mean_rgb,
                              axis=1)

    def format_table(self) -> str:
        src, tgt = self.domains["source"], self.domains["target"]
        h, w = self.size
        sc = SCENARIOS.get(self.scenario)
        lines = [f"synthetic benchmark ({self.scenario}): seed {self.seed}, {h}x{w}, {self.counts['source']} source "
                 f"train / {self.counts.get('source_val', 0)} source val / {self.counts['target_train']} target "
                 f"train / {self.counts['target_val']} target val images, {self.seconds:.1f} s"]
        if sc is not None:
            lines.append(f"source = {sc.source_text}; target = {sc.target_text}")
        lines.append(f"{'class':<14}{'src px %':>9}{'tgt px %':>9}   {'src mean RGB':<16}{'tgt mean RGB':<16}"
                     f"{'dist':>6}")

        def rgb(c: np.ndarray) -> str:
            return "-" if np.isnan(c).any() else "({:3.0f},{:3.0f},{:3.0f})".format(*c)

        for k, lid in enumerate(SYNTH_LABEL_IDS):
            dist = self.colour_distance()[k]
            lines.append(f"{_LABEL_NAMES[lid]:<14}{src.class_frequency[k]:9.2f}{tgt.class_frequency[k]:9.2f}   "
                         f"{rgb(src.class_mean_rgb[k]):<16}{rgb(tgt.class_mean_rgb[k]):<16}"
                         f"{'-' if np.isnan(dist) else f'{dist:.1f}':>6}")
        lines.append("")
        lines.append(f"{'image statistic':<44}{'source':>10}{'target':>10}")
        rows = [
            ("edge sharpness (mean |grad| on label edges)", src.edge_sharpness, tgt.edge_sharpness),
            ("mean |grad| (all pixels)", src.mean_gradient, tgt.mean_gradient),
            ("noise (1.48 x MAD of image - 3x3 median)", src.noise_level, tgt.noise_level),
            ("brightness mean over images", float(np.mean(src.brightness or [0])),
             float(np.mean(tgt.brightness or [0]))),
            ("brightness std over images", float(np.std(src.brightness or [0])),
             float(np.std(tgt.brightness or [0]))),
        ]
        lines += [f"{name:<44}{a:10.2f}{b:10.2f}" for name, a, b in rows]
        return "\n".join(lines)

    def to_json(self) -> dict:
        # No wall-clock here: stats.json must be the same bytes for the same arguments.
        sc = SCENARIOS.get(self.scenario)
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "size": list(self.size),
            "counts": dict(self.counts),
            "styles": {"source": sc.source.name, "target": sc.target.name} if sc else None,
            "label_ids": {_LABEL_NAMES[lid]: lid for lid in SYNTH_LABEL_IDS},
            "domains": {name: d.to_json() for name, d in self.domains.items()},
            "class_colour_distance": {_LABEL_NAMES[lid]: (None if np.isnan(d) else round(float(d), 2))
                                      for lid, d in zip(SYNTH_LABEL_IDS, self.colour_distance())},
        }


# ---------------------------------------------------------------------------------------- files
def _png_bytes(array: np.ndarray) -> bytes:
    """PNG with a fixed compression level and no metadata, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(array, "RGB" if array.ndim == 3 else "L").save(buf, format="PNG",
                                                                   compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


SOURCE_VAL_PREFIX = "val_"   # held-out source images: source/images/val_NNNNN.png, next to the training ones


@dataclass(frozen=True)
class _Job:
    domain: str
    split: str
    index: int
    image_path: Path
    label_path: Path
    style: DomainStyle
    seed_tag: tuple[int, ...] = ()

    @property
    def seed_key(self) -> tuple[int, ...]:
        """(domain, split, index[, scenario tag]): each image has its own stream, whatever the counts."""
        return (DOMAINS.index(self.domain), ("train", "val").index(self.split), self.index, *self.seed_tag)


def _jobs(out: Path, scenario: Scenario, n_source: int, n_source_val: int, n_target: int, n_val: int
          ) -> list[_Job]:
    src = out / "source"
    jobs = [_Job("source", split, i, src / "images" / f"{prefix}{i:05d}.png", src / "labels" / f"{prefix}{i:05d}.png",
                 scenario.source, scenario.seed_tag)
            for split, n, prefix in (("train", n_source, ""), ("val", n_source_val, SOURCE_VAL_PREFIX))
            for i in range(n)]
    for split, n, cities in (("train", n_target, scenario.target_train_cities),
                             ("val", n_val, scenario.target_val_cities)):
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_{CITYSCAPES_FRAME:06d}"
            jobs.append(_Job("target", split, i,
                             out / "target" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                             out / "target" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                             scenario.target, scenario.seed_tag))
    return jobs


def _split_list(jobs: list[_Job], split: str) -> str:
    """A GTA5 split list (root/{split}.txt): one image file name per line."""
    return "".join(f"{job.image_path.name}\n" for job in jobs if job.domain == "source" and job.split == split)


def _remove_stale(out: Path, written: set[Path]) -> int:
    """Delete PNGs of an earlier, larger (or other-scenario) render in this benchmark's own folders, so none
    leaks into a dataset, and the city folders that leaves empty."""
    removed = 0
    for folder in (out / "source" / "images", out / "source" / "labels", out / "target" / "leftImg8bit",
                   out / "target" / "gtFine"):
        if folder.is_dir():
            for path in folder.rglob("*.png"):
                if path not in written:
                    path.unlink()
                    removed += 1
            for sub in sorted(folder.glob("*/*"), reverse=True):  # {split}/{city} of the Cityscapes layout
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
    return removed


_README = """Street-scene benchmark rendered by `corte-ray synth --scenario {scenario}` (seed {seed}, size {h}x{w}).

Scenario {scenario}: source = {source_text}; target = {target_text}.
source/  labelled, GTA5 layout: images/NNNNN.png training images ({n_source}, listed in train.txt),
         images/val_NNNNN.png held-out images ({n_source_val}, listed in val.txt where there are any),
         labels/ the same names (Cityscapes label ids)
target/  Cityscapes layout: leftImg8bit/{{train,val}}/CITY/*_leftImg8bit.png ({n_target} train, {n_val} val),
         gtFine/{{train,val}}/CITY/*_gtFine_labelIds.png (train labels are for oracle runs/diagnostics only)
Dataset `synth` splits: source = source/train.txt, source_val = source/val.txt, train / val = target/.
Classes (Cityscapes label ids): {classes}
stats.json holds the per-domain statistics printed by the command.
"""


def render_benchmark(out: Path | str, seed: int = 0, n_source: int = 200, n_target: int = 200, n_val: int = 50,
                     size: tuple[int, int] = (128, 256), n_source_val: int = 0,
                     scenario: str = DEFAULT_SCENARIO) -> SynthStats:
    """Render the two-domain benchmark into `out` and return its statistics (also written to out/stats.json).

    `n_source_val` held-out source images (source/images/val_NNNNN.png, listed in source/val.txt; the training
    images are listed in source/train.txt) measure a source model on its own domain; each has its own seed key,
    so adding them changes no other image. `scenario` picks the two domains (SCENARIOS): "synth-to-real"
    (flat synthetic source, 'real' target) or "cross-city" (two 'real'-looking cities). The same arguments give
    byte-identical files.
    """
    h, w = check_size(size)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for name, n in (("n_source", n_source), ("n_source_val", n_source_val), ("n_target", n_target),
                    ("n_val", n_val)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    sc = SCENARIOS[scenario]
    out = Path(out)
    jobs = _jobs(out, sc, n_source, n_source_val, n_target, n_val)
    stats = SynthStats(seed=seed, size=(h, w),
                       counts={"source": n_source, "source_val": n_source_val, "target_train": n_target,
                               "target_val": n_val},
                       domains={d: DomainStats() for d in DOMAINS}, scenario=scenario)
    start = time.perf_counter()
    for job in progress(jobs, desc="synth", total=len(jobs), unit="img"):
        rng = np.random.default_rng(np.random.SeedSequence([seed, *job.seed_key]))
        image, label = render_scene(rng, (h, w), job.style)
        write_bytes_atomic(job.image_path, _png_bytes(image))
        write_bytes_atomic(job.label_path, _png_bytes(label))
        stats.domains[job.domain].add(image, label)
    removed = _remove_stale(out, {p for job in jobs for p in (job.image_path, job.label_path)})
    if removed:
        log.warning("removed %d PNG(s) of an earlier render from %s", removed, out)
    # split lists in the GTA5 convention (source/{split}.txt), read by the `synth` and `gta5` datasets
    write_text_atomic(out / "source" / "train.txt", _split_list(jobs, "train"))
    val_list = out / "source" / "val.txt"
    if n_source_val:
        write_text_atomic(val_list, _split_list(jobs, "val"))
    elif val_list.exists():  # an earlier render's list would name images that are gone
        val_list.unlink()
    stats.seconds = time.perf_counter() - start
    write_json_atomic(out / "stats.json", stats.to_json())
    classes = ", ".join(f"{_LABEL_NAMES[lid]} {lid}" for lid in SYNTH_LABEL_IDS)
    write_text_atomic(out / "README.txt", _README.format(
        scenario=scenario, seed=seed, h=h, w=w, classes=classes, source_text=sc.source_text,
        target_text=sc.target_text, n_source=n_source, n_source_val=n_source_val, n_target=n_target, n_val=n_val))
    log.info("rendered %d images into %s in %.1f s", len(jobs), out, stats.seconds)
    return stats


# ---------------------------------------------------------------------------------------- previews
def colourise(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids -> RGB with the train-id palette (black for ignored ids)."""
    lut = np.zeros((256, 3), np.uint8)
    for lid, tid in CITYSCAPES_ID_TO_TRAIN.items():
        if tid != 255:
            lut[lid] = TRAIN_PALETTE[tid]
    return lut[label_ids]


def contact_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray]], gap: int = 2) -> np.ndarray:
    """Rows of (image | colourised label) for each (image, label-id map) pair, all of one size."""
    if not pairs:
        raise ValueError("contact_sheet needs at least one (image, label) pair")
    h, w = pairs[0][1].shape
    sheet = np.full((len(pairs) * (h + gap) - gap, 2 * w + gap, 3), 255, np.uint8)
    for k, (image, label) in enumerate(pairs):
        y = k * (h + gap)
        sheet[y:y + h, :w] = image
        sheet[y:y + h, w + gap:] = colourise(label)
    return sheet
