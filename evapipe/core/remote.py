"""Locations anywhere fsspec reaches: `s3://`, `gs://`, `az://`, `hf://` URLs beside local paths.

A location is a local `Path` (a plain path, or a `file://` URL, so the local store keeps its renames and file locks)
or a URL string handled by fsspec. Credentials and endpoints come from each filesystem's usual place: the AWS
variables (`AWS_ENDPOINT_URL` included, for MinIO and other S3-compatible stores), Google's default credentials,
`HF_TOKEN` / `huggingface-cli login`. A URL whose filesystem is not installed names the extra to install; any
failure talking to a store becomes one StorageError naming the URL (each fsspec backend raises its own types).

Object stores have no rename: `upload` PUTs a whole object (readers see the old object or the complete new one),
and with `create=True` only if none is there yet (S3's `If-None-Match: *`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, EvapipeError, StorageError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "adl": "azure"}  # protocol -> evapipe extra that installs its filesystem
PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}
HUB_TYPES = ("datasets", "spaces", "models")  # hf://<type>/org/name; a bare hf://org/name is a model repo


def is_url(location: str | Path) -> bool:
    """True for a URL fsspec handles (`s3://...`); False for local paths and `file://` URLs."""
    match = URL.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def location(where: str | Path) -> str | Path:
    """A local Path (plain paths and `file://` URLs) or a normalised URL string (no trailing slash)."""
    text = str(where)
    if is_url(text):
        return text.rstrip("/")
    if text.lower().startswith("file://"):
        return Path(text[len("file://"):])
    return Path(where)


def join(base: str | Path, *parts: str) -> str | Path:
    """`base / parts` for a Path, `base/parts` for a URL (Path would fold the `//` of `s3://`)."""
    base = location(base)
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base, *parts])


def name_of(where: str | Path) -> str:
    return str(where).rstrip("/").rsplit("/", 1)[-1]


def parent_of(where: str | Path) -> str | Path:
    where = location(where)
    return where.parent if isinstance(where, Path) else where.rsplit("/", 1)[0]


def with_name(where: str | Path, name: str) -> str | Path:
    return join(parent_of(where), name)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; a missing filesystem package names the extra to install."""
    import fsspec

    protocol = URL.match(url).group(1).lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        extra = EXTRAS.get(protocol)
        how = (f"pip install 'evapipe[{extra}]' (or {PACKAGES[extra]})" if extra else
               f"install the fsspec filesystem for {protocol}://")
        raise ConfigError(f"{url}: the {protocol}:// filesystem is not installed; {how}") from None
    except ValueError as err:
        raise ConfigError(f"{url}: not a location evapipe can read ({err})") from None


def speaks(fs: Any, protocol: str) -> bool:
    """Whether an fsspec filesystem is the one for `protocol` (its `protocol` is a name or a tuple of names)."""
    names = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return protocol in names


@contextlib.contextmanager
def talking_to(url: str, doing: str, passing: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Any failure of a remote call as one StorageError naming the URL and what was being done. fsspec backends
    raise their own types (botocore, aiohttp, requests ...), so everything but evapipe's errors and the `passing`
    types the caller handles is translated."""
    try:
        yield
    except (EvapipeError, *passing):
        raise
    except Exception as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StorageError(f"cannot {doing} {url}: {type(err).__name__}: {why}") from None


def check_reachable(url: str) -> None:
    """Fail early, before any model weight is read, if the store at `url` cannot be reached or its bucket (Hub
    repo) does not exist: one StorageError naming the URL."""
    fs, path = filesystem(url)
    hub = speaks(fs, "hf")
    root = hub_repo(url)[1] if hub else path.split("/")[0]
    with talking_to(url, "reach the store", (FileNotFoundError,)):
        try:
            fs.resolve_path(path) if hub else fs.info(root)
        except FileNotFoundError:
            raise StorageError(f"cannot use the store {url}: its bucket (repository) {root!r} does not exist; "
                               "create it first") from None


def ranged(url: str) -> tuple[int, Callable[[int, int], bytes]]:
    """(size, read(start, end)) of a remote object, for reading a header without downloading the object. A
    missing object raises FileNotFoundError."""
    fs, path = filesystem(url)
    with talking_to(url, "read", (FileNotFoundError,)):
        size = int(fs.size(path))

    def read(start: int, end: int) -> bytes:
        with talking_to(url, "read"):
            return fs.cat_file(path, start=start, end=min(end, size))

    return size, read


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with talking_to(url, "look up"):
        return bool(fs.exists(path))


def download(url: str, local: Path) -> None:
    """Copy a remote object to a local file (the caller renames it into place once verified)."""
    fs, path = filesystem(url)
    with talking_to(url, "download", (FileNotFoundError,)):
        fs.get_file(path, str(local))


def upload(local: Path, url: str, create: bool = False) -> bool:
    """PUT a local file as one object; with `create`, only if no object is at `url` yet (conditional write where the
    store has one, else a check just before). False: another writer's object was there first."""
    fs, path = filesystem(url)
    with talking_to(url, "upload to", (FileExistsError,)):
        if not create:
            fs.put_file(str(local), path)
            return True
        if speaks(fs, "s3"):
            try:
                fs.put_file(str(local), path, mode="create")
            except FileExistsError:
                return False
            return True
        if fs.exists(path):  # no create-if-absent here: a narrow window where the last writer wins (docs)
            return False
        fs.put_file(str(local), path)
        return True


def copy(src: str, dst: str) -> None:
    fs, path = filesystem(src)
    with talking_to(src, "copy"):
        fs.copy(path, filesystem(dst)[1])


def remove(url: str) -> None:
    fs, path = filesystem(url)
    with talking_to(url, "remove", (FileNotFoundError,)):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


def find(url: str) -> dict[str, int]:
    """{URL: size} of every object under `url` (empty if there is none)."""
    fs, path = filesystem(url)
    with talking_to(url, "list", (FileNotFoundError,)):
        try:
            found = fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
    prefix = URL.match(url).group(0)
    return {prefix + p.removeprefix(prefix): int(info.get("size") or 0) for p, info in found.items()
            if info.get("type") != "directory"}


def hub_repo(url: str) -> tuple[str, str, str | None, str]:
    """`hf://[datasets/|spaces/|models/]org/name[@revision]/path` -> (repo type, repo id, revision, path in repo).
    Pure: reads no network, so it can say what a Hub URL means offline."""
    match = URL.match(url)
    if not match or match.group(1).lower() != "hf":
        raise ConfigError(f"{url} is not a Hub URL (hf://org/name/...)")
    parts = [p for p in url[match.end():].split("/") if p]
    repo_type = "model"
    if parts and parts[0] in HUB_TYPES:
        repo_type = parts.pop(0).removesuffix("s")
    if len(parts) < 2:
        raise ConfigError(f"{url}: a Hub URL names a repository, hf://[datasets/]org/name[/path]")
    name, _, revision = parts[1].partition("@")
    return repo_type, f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def cache_root() -> Path:
    """Where remote states, work folders and local locks of remote stores go."""
    if os.environ.get("EVAPIPE_CACHE"):
        return Path(os.environ["EVAPIPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "evapipe"
