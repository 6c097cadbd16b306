"""Reading image and label files into arrays, with one clear error naming the file when that fails.

Images come back as HxWx3 uint8 RGB. Label files come back as the raw integer ids stored in them (the
dataset's label space turns them into train ids). Three label encodings need care:
* palette ('P') PNGs, like the real GTA5 labels: the palette *indices* are the ids, so they are read as
  indices and never converted to RGB;
* 16-bit PNGs: single-channel ones Pillow reads exactly, but 16-bit RGB/RGBA PNGs (SYNTHIA's labels,
  id in the first channel, instance ids in the others) Pillow silently truncates to their high byte,
  which turns every id below 256 into 0. Those are decoded with the pure-Python `pypng` package instead;
* colour-coded labels (8-bit RGB) are refused unless the caller names the channel that holds the id.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .. import storage
from ..errors import InputError

try:  # only needed for 16-bit multi-channel label PNGs (SYNTHIA); everything else reads without it
    import png as _pypng
except ImportError:  # pragma: no cover - depends on the environment
    _pypng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types that carry more than one sample per pixel without a palette: grey+alpha, RGB, RGBA.
_PNG_MULTI_SAMPLE_TYPES = {4: "grey+alpha", 2: "RGB", 6: "RGBA"}

# What Pillow, pypng and zlib raise on a file that is not a (valid) image. Anything else is a bug.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
    Image.DecompressionBombError,
) + ((_pypng.Error,) if _pypng is not None else ())


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line: the CLI prints every error as a single line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(path, f"{what} not found")
    if not path.is_file():
        raise InputError(path, f"{what} is not a file")


def _source(path, what: str):
    """What Pillow opens: the local path (checked to be a file), or the object's bytes (one GET, no HEAD)."""
    if storage.is_remote(path):
        try:
            return io.BytesIO(path.read_bytes())
        except FileNotFoundError:
            raise InputError(path, f"{what} not found") from None
        except OSError as err:
            raise InputError(path, f"cannot read {what}: {_one_line(err)}") from None
    _require_file(path, what)
    return path


def png_header(path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None if `path` (a path or a binary file) is not a PNG."""
    if isinstance(path, io.BytesIO):
        head = path.getvalue()[:26]
    else:
        with open(path, "rb") as f:
            head = f.read(26)
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def read_image(path: str | Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array (grey, palette and alpha images are converted)."""
    path = storage.as_path(path)
    src = _source(path, "image file")
    try:
        with Image.open(src) as im:
            im.load()  # decode all pixels now, so a truncated file fails here and names itself
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            array = np.array(rgb, dtype=np.uint8)
    except _DECODE_ERRORS as exc:
        raise InputError(path, f"cannot read image: {_one_line(exc)}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(path, f"cannot read image: decoded to an array of shape {array.shape}")
    return array


def read_label_ids(path: str | Path, channel: int | None = None, what: str = "label") -> np.ndarray:
    """The raw ids stored in a label image, as a 2-D integer array (uint8, uint16 or int32).

    `channel`: for multi-channel label files, the channel that holds the id (SYNTHIA: 0). With None,
    a multi-channel label is an error: it is most likely a colour-coded label, whose colours are not ids.
    `what` names the file's role in error messages ("label", "prediction").
    """
    path = storage.as_path(path)
    src = _source(path, f"{what} file")
    try:
        header = png_header(src)
        if header is not None and header[0] == 16 and header[1] in _PNG_MULTI_SAMPLE_TYPES:
            array = _read_png16_multichannel(src, path, what)
        else:
            with Image.open(src) as im:
                im.load()
                if im.mode == "F":
                    raise InputError(path, f"{what} image holds floating-point values; expected integer ids")
                # 'P' gives the palette indices here (never the colours); 'I;16*' gives uint16; 'I' int32.
                array = np.asarray(im)
                if im.mode == "1":
                    array = array.astype(np.uint8)
    except InputError:
        raise
    except _DECODE_ERRORS as exc:
        raise InputError(path, f"cannot read {what} image: {_one_line(exc)}") from None
    if array.ndim == 3:
        if channel is None:
            raise InputError(path, f"{what} image has {array.shape[2]} channels; expected one channel of ids "
                                   f"(a colour-coded {what} cannot be read as ids)")
        if not 0 <= channel < array.shape[2]:
            raise InputError(path, f"{what} image has {array.shape[2]} channels; the ids were expected in "
                                   f"channel {channel}")
        array = array[..., channel]
    if array.ndim != 2 or array.size == 0:
        raise InputError(path, f"cannot read {what} image: decoded to an array of shape {array.shape}")
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


def _read_png16_multichannel(src, path, what: str) -> np.ndarray:
    """A 16-bit grey+alpha/RGB/RGBA PNG as HxWxC uint16, exactly (Pillow would keep only the high byte)."""
    if _pypng is None:
        raise InputError(path, f"16-bit multi-channel {what} PNG: reading it exactly needs the 'pypng' "
                               "package (pip install pypng)")
    # read(), not asDirect(): asDirect rescales values by an sBIT chunk, which would corrupt ids.
    reader = _pypng.Reader(bytes=src.getvalue()) if isinstance(src, io.BytesIO) else _pypng.Reader(filename=str(src))
    width, height, rows, info = reader.read()
    planes = int(info["planes"])
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    return array.reshape(height, width, planes)
