"""Store entries on object stores (S3, GCS, Azure, the Hub): the local store's layout and guarantees without rename.

An entry is `<store>/<task>/<model>/<key>/eva.safetensors` plus its spectrum sidecar, as locally. Visibility:
an object store PUTs a whole object at once, so the state object is the commit. `publish` uploads the sidecar
first under a name carrying its spectrum_id (`.eva.spectrum.safetensors.<id>`, hidden, never listed), then the
state object (complete and checksummed, written locally first), and only then copies the sidecar to its usual
name. A reader pairs a state with its sidecar by spectrum_id (under either name), so a crash or a lost connection
at any point leaves either no state or a complete one, never a torn or mixed one.

Two jobs on one key on different machines both compute; the state object is written create-if-absent (S3
`If-None-Match: *`), so the first to finish wins and the other discards its result and takes the winner's.
On one machine the second job waits on a local lock and takes the cache hit, as with a local store.
"""

from __future__ import annotations

import logging
import time

from ..core.errors import StateError
from ..core.remote import copy, exists, find, is_url, name_of, remove, upload, with_name
from .state import atomic_write, read_header, read_metadata, refuse_existing, spectrum_path

log = logging.getLogger("evapipe")

SPECTRUM_SUFFIX = ".spectrum.safetensors"


def sidecar_url(state_url: str) -> str:
    return str(with_name(state_url, name_of(state_url).removesuffix(".safetensors") + SPECTRUM_SUFFIX))


def pending_sidecar_url(state_url: str, spectrum_id: str) -> str:
    """Where a sidecar waits for its state (the local pending_spectrum_path's name)."""
    return str(with_name(state_url, f".{name_of(sidecar_url(state_url))}.{spectrum_id}"))


def lookup(url: str, key: str) -> str | None:
    """The state at `url` if it is readable and was computed for `key` (read from its header only: nothing is
    downloaded); None: compute it. Anything else there is kept aside under another name, never deleted."""
    if not exists(url):
        return None
    try:
        meta = read_metadata(url)
    except StateError as err:
        log.warning("the stored state %s is unreadable (%s); keeping it as %s and computing it again", url, err,
                    name_of(set_aside(url)))
        return None
    if meta.get("store_key") != key:
        log.warning("%s was computed for store key %s, not %s; keeping it as %s and computing it again", url,
                    meta.get("store_key"), key, name_of(set_aside(url)))
        return None
    return url


def set_aside(url: str) -> str:
    """Copy an object out of the way (`eva.safetensors.unreadable-<UTC time>`), then remove it: no rename here."""
    aside = f"{url}.unreadable-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    copy(url, aside)
    remove(url)
    return aside


def publish(local_state, url: str, create: bool = True) -> bool:
    """Upload a local state (and its sidecar) to `url` so that it becomes visible only once complete (see the
    module docstring). With `create`, only if no state is there yet: False means another job's state won."""
    sid = read_metadata(local_state).get("spectrum_id")
    side = spectrum_path(local_state)
    pending = pending_sidecar_url(url, sid) if sid and side.is_file() else None
    if pending:
        upload(side, pending)
    if not upload(local_state, url, create=create):
        if pending:
            remove(pending)
        return False
    if pending:
        copy(pending, sidecar_url(url))
        remove(pending)
    return True


def remote_sidecar(state_url: str, spectrum_id: str | None) -> str | None:
    """The sidecar written with a remote state: under its usual name or still under its pending one."""
    if not spectrum_id:
        return None
    for candidate in (sidecar_url(state_url), pending_sidecar_url(state_url, spectrum_id)):
        if not exists(candidate):
            continue
        try:
            if (read_header(candidate).get("__metadata__") or {}).get("spectrum_id") == spectrum_id:
                return candidate
        except StateError:
            continue
    return None


def list_remote(url: str) -> list[tuple[str, int]]:
    """What `evapipe list` reads on a store URL: every candidate state object with its size (sidecar included)."""
    objects = find(url)
    entries = []
    for obj, size in sorted(objects.items()):
        rel = obj[len(url):].strip("/").split("/")
        name = rel[-1]
        if (not name.endswith(".safetensors") or name.endswith(SPECTRUM_SUFFIX)
                or any(p.startswith(".") or p.endswith(".zarr") for p in rel)):
            continue
        entries.append((obj, size + objects.get(sidecar_url(obj), 0)))
    return entries


def save_state(state, dst, overwrite: bool = False) -> None:
    """EvaState.save to a path or a URL (a URL: written locally first, then published, refusing an existing state
    unless `overwrite`)."""
    import tempfile
    from pathlib import Path

    if not is_url(dst):
        refuse_existing(dst, overwrite)
        state.save(dst)
        return
    with tempfile.TemporaryDirectory(prefix="evapipe-") as tmp:
        local = state.save(Path(tmp) / name_of(dst))
        if not publish(local, str(dst), create=not overwrite):
            raise StateError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")


def write_file(dst, write, overwrite: bool = False) -> None:
    """atomic_write to a path, or write locally and upload one object to a URL (create-if-absent without
    `overwrite`)."""
    import tempfile
    from pathlib import Path

    if not is_url(dst):
        refuse_existing(dst, overwrite)
        atomic_write(dst, write)
        return
    with tempfile.TemporaryDirectory(prefix="evapipe-") as tmp:
        local = atomic_write(Path(tmp) / name_of(dst), write)
        if not upload(local, str(dst), create=not overwrite):
            raise StateError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
