"""Where corte-ray's files live: local paths, or `s3://` / `gs://` URIs read and written through `pyarrow.fs`.

On a cluster no two nodes share a disk, so datasets, label stores, model files and run directories may be
object-store URIs that every worker and actor reads and writes directly. `as_path(p)` turns what the user typed
into a `pathlib.Path` (local: the code paths and tests of one machine are unchanged) or a `RemotePath`, which
answers the part of the `pathlib` API the package uses (`/`, `name`, `exists`, `glob`, `read_bytes`, ...) against
the object store. Code that must differ (opening a Parquet file, atomic writes) asks `is_remote`.

Why pyarrow.fs and not fsspec: pyarrow is already a dependency, Ray Train persists checkpoints through a
`pyarrow.fs.FileSystem` (`RunConfig(storage_filesystem=...)`), and Parquet reads take its files natively.

Credentials and endpoints come from the standard AWS / Google variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION; AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an
S3-compatible server such as MinIO, or moto's in the tests; GOOGLE_APPLICATION_CREDENTIALS), read in each process:
nothing secret is pickled into a Ray task. Writes of one object are atomic for readers (an S3 PUT or completed
multipart upload, a finalised GCS upload: an object is the old one or the new one), so `write_bytes` is the
remote form of io_utils.write_atomic.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Union
from urllib.parse import urlparse

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs")
_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def is_uri(p: object) -> bool:
    """True for an `s3://` or `gs://` URI (or a RemotePath)."""
    return isinstance(p, RemotePath) or (isinstance(p, str) and p.split("://", 1)[0].lower() in SCHEMES
                                          and "://" in p)


def is_remote(p: object) -> bool:
    return isinstance(p, RemotePath)


@functools.lru_cache(maxsize=8)
def _make_filesystem(scheme: str, env: tuple) -> pafs.FileSystem:
    settings = dict(zip(_ENV_KEYS, env))
    if scheme == "s3":
        kwargs: dict = {}
        endpoint = settings["AWS_ENDPOINT_URL_S3"] or settings["AWS_ENDPOINT_URL"]
        if endpoint:
            url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        region = settings["AWS_REGION"] or settings["AWS_DEFAULT_REGION"]
        if region:
            kwargs["region"] = region
        # No keys passed: the AWS default chain (env vars, profile, instance role) runs in every process, and a
        # pickled filesystem (Ray Train ships it to its workers) carries no secret.
        return pafs.S3FileSystem(**kwargs)
    return pafs.GcsFileSystem()


def filesystem(scheme: str) -> pafs.FileSystem:
    """The filesystem of `scheme` ("s3", "gs", "file") as this process's environment configures it."""
    if scheme == "file":
        return pafs.LocalFileSystem()
    return _make_filesystem(scheme, tuple(os.environ.get(k) for k in _ENV_KEYS))


def resolve(p: str | os.PathLike | "RemotePath") -> tuple[pafs.FileSystem, str]:
    """(FileSystem, path inside it) of a local path or an s3:// / gs:// URI: what pyarrow and Ray Train take."""
    loc = as_path(p)
    if isinstance(loc, RemotePath):
        return loc.fs, loc.fs_path
    return pafs.LocalFileSystem(), str(loc.resolve())


def as_path(p: str | os.PathLike | "RemotePath") -> Union[Path, "RemotePath"]:
    """A RemotePath for an s3:// or gs:// URI, else a local Path (as given, `~` expanded). `file://` URIs are
    local paths. Never `Path(uri)`: that turns `s3://b/run` into `s3:/b/run`."""
    if isinstance(p, RemotePath):
        return p
    s = os.fspath(p) if not isinstance(p, str) else p
    if is_uri(s):
        return RemotePath(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(os.path.expanduser(s))


@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mtime: float


@dataclass(frozen=True, order=True)
class RemotePath:
    """An object-store path, `scheme://bucket/key`, with the part of pathlib's API that corte-ray uses.

    It pickles as its URI (the filesystem is built again in each process from its environment). A
    "directory" is a key prefix: it exists when something is stored under it."""

    uri: str
    # "file" / "dir" when this path came from a listing (saves a request per entry in is_file / is_dir).
    kind: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        scheme, rest = self.uri.split("://", 1)
        rest = "/".join(part for part in rest.split("/") if part)   # no doubled or trailing slashes
        if not rest:
            raise ValueError(f"{self.uri}: a storage URI needs a bucket (scheme://bucket/path)")
        object.__setattr__(self, "uri", f"{scheme.lower()}://{rest}")

    # -------------------------------------------------------------------------------------- naming
    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def fs_path(self) -> str:
        """bucket/key: the path inside `fs`."""
        return self.uri.split("://", 1)[1]

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme)

    @property
    def bucket(self) -> str:
        return self.fs_path.split("/", 1)[0]

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self):  # noqa: D105 - a URI is not a local path; fail loudly where one is expected
        raise TypeError(f"{self.uri} is an object-store URI, not a local file path")

    def __truediv__(self, other: str | os.PathLike) -> "RemotePath":
        other = str(other)
        return RemotePath(f"{self.uri}/{other}") if other else self

    def joinpath(self, *parts: str) -> "RemotePath":
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return self.fs_path.rsplit("/", 1)[-1] if "/" in self.fs_path else ""

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> "RemotePath":
        if "/" not in self.fs_path:
            return self
        return RemotePath(f"{self.scheme}://{self.fs_path.rsplit('/', 1)[0]}")

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "RemotePath":
        return self.with_name(Path(self.name).with_suffix(suffix).name)

    def resolve(self) -> "RemotePath":
        return self

    absolute = expanduser = resolve

    # --------------------------------------------------------------------------------------- queries
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        if self.kind is not None:
            return self.kind == "file"
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        if self.kind is not None:
            return self.kind == "dir"
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.uri)
        return _Stat(int(info.size or 0), info.mtime.timestamp() if info.mtime else 0.0)

    def iterdir(self) -> Iterator["RemotePath"]:
        """The entries directly under this prefix (files and "directories"), sorted by name."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True))
        except FileNotFoundError:
            infos = []
        for info in sorted(infos, key=lambda i: i.path):
            kind = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type)
            yield RemotePath(f"{self.scheme}://{info.path}", kind)

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """pathlib's glob for patterns without `**`: each "/"-separated part matched against one level."""
        head, _, rest = pattern.partition("/")
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, head):
                if not rest:
                    yield child
                elif child.is_dir():
                    yield from child.glob(rest)

    # ------------------------------------------------------------------------------ reads and writes
    def open(self, mode: str = "rb") -> IO[bytes]:
        if mode == "rb":
            return self.fs.open_input_file(self.fs_path)
        if mode == "wb":
            return self.fs.open_output_stream(self.fs_path)
        raise ValueError(f"{self.uri}: open mode {mode!r} (only 'rb' and 'wb' on object storage)")

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.fs_path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(self.uri) from None
        except OSError as err:
            if "not found" in str(err).lower() or "nosuchkey" in str(err).lower():
                raise FileNotFoundError(self.uri) from None
            raise

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One object, whole: readers see the old bytes or these, never a part (S3/GCS upload semantics)."""
        with self.fs.open_output_stream(self.fs_path) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no directories, keys under a prefix make one."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(self.uri) from None

    def rmtree(self) -> None:
        try:
            self.fs.delete_dir(self.fs_path)
        except FileNotFoundError:
            pass


StoragePath = Union[Path, RemotePath]


# ------------------------------------------------------------------------------------- helpers
def open_input(p: str | os.PathLike | RemotePath) -> IO[bytes]:
    """A seekable binary file to read (pyarrow takes it for Parquet, Pillow for images)."""
    loc = as_path(p) if not isinstance(p, Path) else p
    return loc.open("rb")


def read_bytes(p) -> bytes:
    loc = as_path(p) if not isinstance(p, Path) else p
    return loc.read_bytes()


def exists(p) -> bool:
    loc = as_path(p) if not isinstance(p, Path) else p
    return loc.exists()


def write_bytes(p, data: bytes) -> None:
    """Atomic for readers: a local file is written beside and renamed into place, an object is one upload."""
    from .io_utils import write_bytes_atomic

    write_bytes_atomic(p, data)


def listdir(p) -> list[StoragePath]:
    loc = as_path(p) if not isinstance(p, Path) else p
    if isinstance(loc, Path) and not loc.is_dir():
        return []
    return sorted(loc.iterdir(), key=str)


def remove_tree(p) -> None:
    loc = as_path(p) if not isinstance(p, Path) else p
    if isinstance(loc, RemotePath):
        loc.rmtree()
    else:
        shutil.rmtree(loc, ignore_errors=True)


def move(src: StoragePath, dst: StoragePath) -> None:
    """Rename a local file; on object storage copy then delete (readers of `dst` see a whole object)."""
    if isinstance(src, Path) and isinstance(dst, Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    fs, path = resolve(src)
    dfs, dpath = resolve(dst)
    if fs.type_name == dfs.type_name:
        fs.copy_file(path, dpath)
    else:
        pafs.copy_files(path, dpath, source_filesystem=fs, destination_filesystem=dfs)
    fs.delete_file(path)


def upload(local: str | os.PathLike, dst) -> None:
    """Copy a local file, or a directory tree, to `dst` (local or remote); each file lands whole."""
    local = Path(local)
    dst = as_path(dst) if not isinstance(dst, Path) else dst
    if local.is_dir():
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            upload(f, dst / f.relative_to(local).as_posix())
        return
    if isinstance(dst, Path):
        from .io_utils import write_atomic

        write_atomic(dst, lambda tmp: shutil.copyfile(local, tmp))
        return
    with open(local, "rb") as src, dst.open("wb") as out:
        shutil.copyfileobj(src, out, 8 << 20)


def download(src, local: str | os.PathLike) -> Path:
    """Copy `src` (a file or a prefix, local or remote) to the local path `local`; returns it."""
    src = as_path(src) if not isinstance(src, Path) else src
    local = Path(local)
    if src.is_dir():
        for child in src.iterdir():
            download(child, local / child.name)
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as f, open(local, "wb") as out:
        shutil.copyfileobj(f, out, 8 << 20)
    return local


def local_copy(p) -> Path:
    """A local file with the bytes of `p`: `p` itself when local, else a download into this process's cache
    (one per URI and size, reused), for readers that need a real file (TorchScript, ONNX Runtime)."""
    loc = as_path(p) if not isinstance(p, Path) else p
    if isinstance(loc, Path):
        return loc
    import hashlib

    size = loc.stat().st_size
    cache = Path(tempfile.gettempdir()) / f"corte-ray-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
    target = cache / hashlib.sha256(f"{loc.uri}:{size}".encode()).hexdigest()[:24] / loc.name
    if not target.is_file() or target.stat().st_size != size:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        download(loc, tmp)
        os.replace(tmp, target)
    return target


def load_torch(p, map_location=None) -> object:
    """torch.load(weights_only=True) of a local file or an object."""
    import torch

    loc = as_path(p) if not isinstance(p, Path) else p
    if isinstance(loc, Path):
        return torch.load(loc, map_location=map_location, weights_only=True)
    return torch.load(io.BytesIO(loc.read_bytes()), map_location=map_location, weights_only=True)
