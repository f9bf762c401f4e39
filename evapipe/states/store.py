"""The per-task store: STORE/<task>/<model>/<key>/eva.safetensors, one state per (model, data, EVA settings).

The key is a short hash of everything that changes the computed state: the model (its config.json and files for
a local folder, name + revision for a hub id, dtype, quantization, kind), the data (the bytes of local files, or
hub id/name/split; fields, max_length, max_samples, shuffle, seed, and the global batch = batch_size x world size,
which fixes the token order) and the EVA settings and hooks. It is computed from the config and the files it
names, never from a loaded model or dataset, so a cache hit costs file reads, not a torch import. Two tasks on
one model, or one task on two models, sit side by side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import DataConfig, JobConfig, ModelConfig, plain_name
from ..core.errors import ConfigError, StateError
from ..core.remote import check_reachable, is_url, join, location
from ..core.sources import (
    VOLATILE_CONFIG_KEYS,
    data_files,
    file_sha,
    files_digest,
    files_under,
    json_digest,
    resolve_data_path,
    resolve_model_path,
)
from .corda_state import CORDA_FORMAT, read_state_metadata
from .state import FORMAT, read_header, spectrum_path

log = logging.getLogger("evapipe")

STATE_FILE = "eva.safetensors"
STATE_FILES = {"eva": STATE_FILE, "corda": "corda.safetensors"}  # a store entry's file, per method
KEY_LENGTH = 12
CONTENT_HASH_LIMIT = 16 * 2**20  # model-folder files up to this size are hashed by content, larger by size + mtime
# config fields that do not change the computed state (batch_size enters as the global batch instead)
OFFLOAD_FIELDS = {"offload", "sequential_round", "device_map", "max_memory", "offload_folder"}  # how the model is held, not what it computes
IGNORED_FIELDS = {
    "model": {"device", "trust_remote_code", *OFFLOAD_FIELDS}, "data": {"batch_size"}, "eva": {"on_unconverged"},
}


def model_folder_digest(folder: Path) -> str:
    """config.json without its load/save-only keys, small files by content, large (weights) by size and mtime."""
    entries = []
    for f in files_under(folder):
        rel = f.relative_to(folder).as_posix()
        if rel == "config.json":
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                cfg = file_sha(f).hexdigest()
            if isinstance(cfg, dict):
                cfg = {k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG_KEYS}
            entries.append((rel, cfg))
            continue
        st = f.stat()
        if st.st_size <= CONTENT_HASH_LIMIT:
            entries.append((rel, file_sha(f).hexdigest()))
        else:
            entries.append((rel, st.st_size, st.st_mtime_ns))
    return json_digest(entries, 32)


def model_part(cfg: ModelConfig) -> dict[str, Any]:
    part = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in IGNORED_FIELDS["model"]}
    folder = Path(resolve_model_path(cfg.name_or_path)).expanduser()
    if folder.is_dir():
        part["files"] = model_folder_digest(folder)
    return part


def order_ignored(cfg: DataConfig) -> set[str]:
    """Data fields that do not change which rows each step holds, so they stay out of the key: read unshuffled, a
    stream gives a table's steps; only a shuffled stream's order depends on streaming and its buffer. A hub
    revision left at its default stays out too, so keys from before these fields existed still hit."""
    ignored = {"revision"} if cfg.revision is None else set()
    if not (cfg.streaming and cfg.shuffle):
        ignored |= {"streaming", "shuffle_buffer"}
    return ignored


def data_part(cfg: DataConfig, world: int) -> dict[str, Any]:
    ignored = IGNORED_FIELDS["data"] | order_ignored(cfg)
    part = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    part["global_batch"] = cfg.batch_size * world
    files = data_files(resolve_data_path(cfg.path))
    if files is not None:  # same bytes under another path or name: same data
        part["path"], part["content"] = None, files_digest(files)
    return part


def world_size() -> int:
    """The world size torchrun / accelerate launch announce (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# data fields that only order or group the samples: a CorDA covariance sums every sample of one pass
ORDER_FIELDS = ("global_batch", "shuffle", "seed", "shuffle_buffer", "streaming")
CORDA_KEY_IGNORES = ("covariance_file", "cache_file")  # where copies go, not what is computed


def key_parts(cfg: JobConfig, world: int | None = None) -> dict[str, Any]:
    """What the store key hashes, section by section (readable, so a changed key can be explained). An EVA job's
    parts have no `method` entry, so the keys of existing EVA configs stay what they were."""
    if cfg.method == "corda":
        corda = {k: v for k, v in dataclasses.asdict(cfg.corda).items() if k not in CORDA_KEY_IGNORES}
        data = {k: v for k, v in data_part(cfg.data, world or world_size()).items() if k not in ORDER_FIELDS}
        return {"method": "corda", "model": model_part(cfg.model), "data": data, "corda": corda,
                "hooks": {"forward_fn": hook_identity(cfg.hooks.forward_fn)}}
    eva = {k: v for k, v in dataclasses.asdict(cfg.eva).items() if k not in IGNORED_FIELDS["eva"]}
    return {
        "model": model_part(cfg.model),
        "data": data_part(cfg.data, world or world_size()),
        "eva": eva,
        "hooks": {k: hook_identity(v) for k, v in dataclasses.asdict(cfg.hooks).items()},
    }


def hook_identity(spec: str | None) -> Any:
    """A hook named `module:function`, keyed by its module's source: editing the hook changes the key. The module
    file is found on sys.path without importing anything (a cache hit stays free of torch)."""
    if spec is None:
        return None
    source = _module_file(spec.partition(":")[0])
    return {"spec": spec, "source": None if source is None else file_sha(source).hexdigest()[:32]}


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    for root in sys.path:
        base = Path(root or ".").joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def job_identity(cfg: JobConfig, world: int | None = None) -> dict[str, Any]:
    """{"key": the store key, "parts": what it hashes}: recorded with checkpoints, so a mismatch can be explained."""
    parts = key_parts(cfg, world)
    return {"key": json_digest(parts, KEY_LENGTH), "parts": parts}


def job_key(cfg: JobConfig, world: int | None = None) -> str:
    """The short hash that names a job's state in the store."""
    return job_identity(cfg, world)["key"]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries two key_parts differ in, e.g. ['eva.r: 8 -> 4']."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def model_slug(name_or_path: str) -> str:
    """A folder name for a model: `org--name` for a hub id, the folder's name for a local path."""
    name = name_or_path.rstrip("/")
    if Path(name).expanduser().is_dir() and not name.startswith("builtin:"):
        name = Path(name).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-.") or "model"


def state_file(cfg: JobConfig) -> str:
    """The file name of a job's state in its store entry (`eva.safetensors`, `corda.safetensors`)."""
    return STATE_FILES[cfg.method]


def state_dir(store: str | Path, cfg: JobConfig, key: str) -> Path | str:
    """The entry's folder: a Path in a local store, a URL string in one on object storage (remote.py)."""
    if not plain_name(cfg.task):  # also for configs built without validation: never a path out of the store
        raise ConfigError(f"`task` must be a plain name (no '/', '\\', '..' or leading '.'), got {cfg.task!r}")
    return join(store, cfg.task, model_slug(cfg.model.name_or_path), key)


def lock_path(store: str | Path, cfg: JobConfig, key: str) -> Path:
    """The lock of one store entry: in the store's hidden `.locks/` folder, so the entry holds only its files."""
    if is_url(store):  # a lock on this machine only: jobs elsewhere both compute and one wins (remote_store.py)
        from ..core.remote import cache_root

        return cache_root() / "locks" / f"{json_digest(str(store), 16)}--{cfg.task}--{key}.lock"
    entry = state_dir(store, cfg, key)
    return location(store) / ".locks" / f"{cfg.task}--{entry.parent.name}--{key}.lock"


def lookup(path: Path | str, key: str) -> Path | str | None:
    """The stored state at `path` (a path or a URL) if it is readable and was computed for `key`; None means:
    compute it.

    Anything else found there is kept aside (renamed, never deleted) so the recomputed state cannot overwrite it.
    """
    if is_url(path):
        from .remote_store import lookup as remote_lookup

        return remote_lookup(str(path), key)
    if not path.is_file():
        return None
    try:
        meta = read_state_metadata(path)
    except StateError as err:
        log.warning("the stored state %s is unreadable (%s); keeping it as %s and computing it again", path, err,
                    set_aside(path).name)
        return None
    if meta.get("store_key") != key:
        log.warning("%s was computed for store key %s, not %s; keeping it as %s and computing it again", path,
                    meta.get("store_key"), key, set_aside(path).name)
        return None
    return path


def set_aside(path: Path) -> Path:
    """Rename a stored file out of the way (`eva.safetensors.unreadable-<UTC time>`), keeping its content."""
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    os.replace(path, aside)
    return aside


@dataclass
class StoreEntry:
    """One state found under a directory: what `evapipe list` shows."""

    path: Path | str  # a URL string in a store on object storage
    task: str | None = None
    model: str | None = None
    r: int | None = None
    rho: float | None = None
    total_rank: int | None = None
    tokens: int | None = None
    created: str | None = None
    size: int = 0
    key: str | None = None
    error: str | None = None
    method: str = "eva"


def _is_foreign(path: Path | str) -> bool:
    """A readable safetensors file that is not a state (EVA or CorDA) (model weights, a spectrum sidecar ...)."""
    try:
        return (read_header(path).get("__metadata__") or {}).get("format") not in (FORMAT, CORDA_FORMAT)
    except StateError:
        return False


def entry_of(path: Path | str, meta: dict[str, Any], size: int) -> StoreEntry:
    """What `evapipe list` shows of one readable state."""
    return StoreEntry(
        path, task=meta.get("task"), model=(meta.get("model") or {}).get("id"), r=meta.get("r"),
        rho=meta.get("rho"), total_rank=sum(int(v) for v in meta["ranks"].values()), tokens=meta.get("tokens"),
        created=meta.get("created"), size=size, key=meta.get("store_key"), method=meta.get("method", "eva"),
    )


def list_states(directory: str | Path) -> list[StoreEntry]:
    """Every state (EVA or CorDA) under `directory` (a store or any folder, a path or a URL), sorted by task, model
    and creation time.

    Unreadable states are listed with their error; other safetensors files, hidden folders, checkpoints
    (`*.zarr`) and temporary files are skipped.
    """
    directory = location(directory)
    if isinstance(directory, str):
        from .remote_store import list_remote

        check_reachable(directory)
        return _sorted([e for path, size in list_remote(directory) for e in entry_at(path, size)])
    if not directory.is_dir():
        raise StateError(f"not a directory: {directory}")
    entries = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".zarr"))
        for name in sorted(files):
            if not name.endswith(".safetensors") or name.endswith(".spectrum.safetensors") or name.startswith("."):
                continue
            path = Path(root) / name
            size = path.stat().st_size + (spectrum_path(path).stat().st_size if spectrum_path(path).is_file() else 0)
            entries += entry_at(path, size)
    return _sorted(entries)


def entry_at(path: Path | str, size: int) -> list[StoreEntry]:
    """The listing of one safetensors file: its entry, an unreadable one with its error, or none (not a state)."""
    try:
        return [entry_of(path, read_state_metadata(path), size)]
    except StateError as err:
        return [] if _is_foreign(path) else [StoreEntry(path, size=size, error=str(err))]


def _sorted(entries: list[StoreEntry]) -> list[StoreEntry]:
    return sorted(entries, key=lambda e: (e.task or "", e.model or "", e.created or "", str(e.path)))


def remote_entry(cfg: JobConfig, key: str) -> str | None:
    """The store entry's URL when output.store is on object storage: the state is computed into a local work
    folder (checkpoints included), then published there (remote_store.py)."""
    if not (cfg.output.store and is_url(cfg.output.store)):
        return None
    return str(join(state_dir(cfg.output.store, cfg, key), state_file(cfg)))
