"""Atomic file writes: a killed job never leaves a half-written result behind.

`write_atomic` writes a temporary file beside the target, fsyncs it, renames it into place and fsyncs the
directory, so after a crash (or a power cut) the target is the old file or the new one, never a torn one.
`append_line` adds one whole line to a log such as metrics.jsonl by an atomic rewrite, so a kill never
leaves a torn line. A path that cannot be written is an InputError naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import InputError


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open directories: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cannot_write(path: Path, err: OSError) -> InputError:
    return InputError(path, f"cannot write here ({err.strerror or err or type(err).__name__})")


def write_atomic(path, write: Callable[[Path], None]):
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place (both fsynced).

    `path` may be an object-store URI (storage.RemotePath): then `write` fills a local temporary file that is
    uploaded as one object, which readers see whole or not at all."""
    from .storage import RemotePath, as_path

    path = as_path(path) if not isinstance(path, Path) else path
    if isinstance(path, RemotePath):
        return _write_remote(path, write)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        write(Path(tmp))
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 minus umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)   # the data on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)   # the rename itself on disk
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError,)):
            raise _cannot_write(path, err) from None
        raise
    return path


def _write_remote(path, write: Callable[[Path], None]):
    with tempfile.TemporaryDirectory(prefix="corte-upload-") as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        write(tmp)
        try:
            with open(tmp, "rb") as src, path.open("wb") as out:
                while block := src.read(8 << 20):
                    out.write(block)
        except OSError as err:
            raise InputError(path, f"cannot write here ({err})") from None
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda p: p.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append `line` (no newline in it) as one whole line: the file is rewritten atomically with the line added.

    An append in place can be torn by a kill (Linux stops a write() at a page boundary on SIGKILL), leaving
    half a JSON line; a rename is whole or not at all. Logs written this way (metrics.jsonl: a line per
    evaluation or checkpoint) stay small, so rewriting costs nothing. A torn last line left by an older
    writer is dropped. On object storage the whole file is one new object."""
    from .storage import as_path

    path = as_path(path) if not isinstance(path, Path) else path
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    except OSError as err:
        raise _cannot_write(path, err) from None
    if old and not old.endswith(b"\n"):
        old = old[: old.rfind(b"\n") + 1]
    write_bytes_atomic(path, old + (line.rstrip("\n") + "\n").encode())
