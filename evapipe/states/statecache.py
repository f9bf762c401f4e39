"""Remote states cached locally: a state read from a URL is downloaded once, verified, and kept by checksum.

`EVAPIPE_CACHE` (default: `$XDG_CACHE_HOME/evapipe`, else `~/.cache/evapipe`) holds `states/<digest>/` with the
state and its sidecar, where the digest hashes the checksums the state's header records, so a changed state at
the same URL is a new entry and an entry is never stale. A download goes to a temporary file, is verified (header,
metadata and tensor checksums, finite values) and only then renamed into place. `urls/<hash of the URL>` remembers
which entry a URL last resolved to, so a cached state loads while the store is unreachable (offline).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..core.errors import StateError, StorageError
from ..core.remote import cache_root, download, is_url
from .remote_store import remote_sidecar
from .state import CHECKSUM_KEY, EvaState, _load_tensors, atomic_write, load_state_file, read_header, spectrum_path

log = logging.getLogger("evapipe")

STATE_NAME = "eva.safetensors"
SIDECAR_NAME = "eva.spectrum.safetensors"


def header_digest(header: dict) -> str:
    """The cache key of a state: a hash of its recorded checksums (of its whole header for older formats)."""
    raw = header.get("__metadata__") or {}
    basis = raw.get("checksum") or json.dumps(header, sort_keys=True)
    return hashlib.sha256(basis.encode()).hexdigest()[:24]


def _url_record(url: str) -> Path:
    return cache_root() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:24]


def fetch(url: str, with_spectrum: bool = True) -> Path:
    """The local, verified copy of the state at `url` (and of its sidecar when `with_spectrum`), downloaded only
    if the cache lacks it. If the store cannot be reached, the copy this URL last resolved to is used."""
    try:
        header = read_header(url)
    except StorageError as err:
        record = _url_record(url)
        cached = cache_root() / "states" / record.read_text().strip() / STATE_NAME if record.is_file() else None
        if cached is None or not cached.is_file():
            raise
        log.warning("%s; using the copy of %s cached at %s", err, url, cached)
        return cached
    entry = cache_root() / "states" / header_digest(header)
    state = entry / STATE_NAME
    if not state.is_file():
        _download_verified(url, state, header)
    sid = json.loads((header.get("__metadata__") or {}).get("spectrum_id") or "null")
    if with_spectrum and sid and not (entry / SIDECAR_NAME).is_file():
        _fetch_sidecar(url, entry / SIDECAR_NAME, sid)
    _url_record(url).parent.mkdir(parents=True, exist_ok=True)

    atomic_write(_url_record(url), lambda tmp: Path(tmp).write_text(entry.name))
    return state


def _download_verified(url: str, dst: Path, header: dict) -> None:
    """Download to a temporary file, check it is the state whose header was read, and rename it into place."""
    def write(tmp: str) -> None:
        download(url, Path(tmp))
        if read_header(tmp) != header:
            raise StateError(f"{url} changed while it was downloaded; try again")
        load_state_file(tmp, with_spectrum=False)  # every checksum and value: a cached state is a verified one

    log.info("downloading %s into the local cache %s", url, dst.parent)
    atomic_write(dst, write)


def _fetch_sidecar(url: str, dst: Path, spectrum_id: str) -> None:
    side = remote_sidecar(url, spectrum_id)
    if side is None:
        log.warning("%s has no spectrum sidecar in its store: it loads without its spectrum", url)
        return

    def write(tmp: str) -> None:
        download(side, Path(tmp))
        raw = read_header(tmp).get("__metadata__") or {}
        if raw.get("spectrum_id") != spectrum_id:
            raise StateError(f"{side} is not the spectrum of {url} (it was replaced while downloading); try again")
        _load_tensors(Path(tmp), {"tensors": raw[CHECKSUM_KEY]} if CHECKSUM_KEY in raw else None)

    atomic_write(dst, write)


def adopt(local_state: Path, url: str) -> None:
    """Keep a state just stored at `url` in the cache (moved, not copied), so applying it needs no download."""
    entry = cache_root() / "states" / header_digest(read_header(local_state))
    entry.mkdir(parents=True, exist_ok=True)
    if spectrum_path(local_state).is_file():
        os.replace(spectrum_path(local_state), entry / SIDECAR_NAME)
    os.replace(local_state, entry / STATE_NAME)
    _url_record(url).parent.mkdir(parents=True, exist_ok=True)
    _url_record(url).write_text(entry.name)


def load_state(path: str | Path, with_spectrum: bool = True) -> EvaState:
    """Load a state from a path or a URL: a URL is downloaded once into the local cache, verified, and loaded from
    there; corrupt, foreign or inconsistent files raise StateError, so a state that loads is the one written."""
    return load_state_file(fetch(str(path), with_spectrum) if is_url(path) else path, with_spectrum)
