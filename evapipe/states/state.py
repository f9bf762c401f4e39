"""The EVA state file: safetensors of LoRA A inits keyed by module name, plus metadata that says what it is.

Tensor key = the module's name in the base model (`model.named_modules()`), value = float32 (rank, in_features).
Rank-0 layers have no tensor but appear in the metadata. Metadata values are strings (JSON where structured).
Beside the state, `<stem>.spectrum.safetensors` keeps every shared PCA's full spectrum (round(r*rho) components
and singular values), so the state can be re-budgeted without a forward pass; both files carry the same
`spectrum_id`, so a sidecar from another write is never mistaken for this state's.

The metadata's fields, format versions and migrations are in metadata.py.
Reading metadata needs neither torch nor the tensors, so `evapipe show/list` and cache lookups stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import StateError, StorageError, require_path
from ..core.names import split_key
from ..core.remote import is_url, location, ranged
from .metadata import FORMAT, FORMAT_VERSION, LAYER_KEYED, SEALED_SINCE, StateMeta, migrate

if TYPE_CHECKING:
    import torch

log = logging.getLogger("evapipe")

SPECTRUM_FORMAT = FORMAT + ".spectrum"
TEXT_KEYS = ("format", "task", "created")  # every other metadata value is JSON
PEFT_PREFIX = "base_model.model."
MAX_HEADER = 100_000_000
HEAD_BYTES = 65536  # the first read of a header: most state headers whole, so a remote one costs one request
CHECKSUM_KEY = "checksum"  # {"metadata": sha256 of the other raw entries, "tensors": sha256 of names, shapes, bytes}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class LayerState:
    """What every method's state is: tensors and metadata whose `ranks` names the target layers."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def ranks(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.meta["ranks"].items()}

    @property
    def layers(self) -> list[str]:
        return list(self.meta["ranks"])


@dataclass
class EvaState(LayerState):
    """An EVA result: A inits per layer (rank > 0 only), every layer's rank, and the metadata."""

    spectrum: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rank_pattern(self) -> dict[str, int]:
        return self.meta["rank_pattern"]

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return self.meta["alpha_pattern"]

    @property
    def metadata(self) -> StateMeta:
        """The metadata, typed."""
        return StateMeta.from_dict(self.meta)

    def total_rank(self) -> int:
        return sum(self.ranks.values())

    def under(self, prefix: str) -> EvaState:
        """The same state for a model that holds the one it was computed on at `prefix` (`bert.` in a
        BertForSequenceClassification around the BertModel the state was computed on): every name gains it."""
        if not prefix:
            return self
        meta = dict(self.meta)
        for key in LAYER_KEYED:
            if isinstance(meta.get(key), dict):
                meta[key] = {prefix + n: v for n, v in meta[key].items()}
        meta["shared_inputs"] = [[prefix + n for n in g] for g in meta.get("shared_inputs") or []]
        meta["unrouted"] = [prefix + n for n in meta.get("unrouted") or []]
        return EvaState({prefix + n: a for n, a in self.tensors.items()}, meta,
                        {prefix + k: v for k, v in self.spectrum.items()})

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """{module name: A}, as PEFT's get_eva_state_dict returns; zero-row tensors for rank-0 layers.

        Experts are left out: PEFT's EVA loader knows only linear layers (`evapipe apply` adapts experts)."""
        import torch

        experts = {n for n in self.ranks if split_key(n) is not None}
        if experts:
            log.warning("leaving out %d experts: PEFT's EVA loader takes linear layers only (use evapipe apply)",
                        len(experts))
        out = {}
        for name in self.ranks:
            if name in experts:
                continue
            t = self.tensors.get(name)
            if t is None:
                t = torch.zeros(0, self.meta["in_features"][name])
            out[prefix + name] = t
        return out

    def save(self, path: str | Path) -> Path:
        """Write the state and its spectrum sidecar so that a crash at any instant leaves a matching pair.

        The state file is the commit, as a checkpoint's metadata file is: the new sidecar goes first to a name
        that carries its `spectrum_id` (the old pair stays as it was), then the state replaces the old one, and
        only then the sidecar takes its usual name. A reader that finds the new state before that last rename
        takes the sidecar from its pending name (load_state). Non-finite values are refused before anything is
        written; both files carry checksums, so a corrupted byte is an error, never a wrong state.
        """
        from safetensors.torch import save_file

        path = Path(path)
        check_finite({**self.tensors, **self.spectrum}, path)
        sid = uuid.uuid4().hex[:16] if self.spectrum else None
        meta = dict(self.meta, spectrum_id=sid, format_version=FORMAT_VERSION)  # always the layout written here
        tensors = _contiguous(self.tensors)
        raw = sealed_metadata({k: (v if k in TEXT_KEYS else json.dumps(v)) for k, v in meta.items()}, tensors)
        pending = None
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.spectrum:
                side = _contiguous(self.spectrum)
                side_meta = {"format": SPECTRUM_FORMAT, "spectrum_id": sid, CHECKSUM_KEY: tensors_digest(side)}
                pending = atomic_write(pending_spectrum_path(path, sid),
                                       lambda tmp: save_file(side, tmp, metadata=side_meta))
            try:
                atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=raw))
            except BaseException:
                if pending is not None:
                    pending.unlink(missing_ok=True)
                raise
            if pending is not None:
                os.replace(pending, spectrum_path(path))
            else:  # a sidecar left by an earlier state at this path belongs to no state now
                spectrum_path(path).unlink(missing_ok=True)
            for orphan in path.parent.glob(f".{spectrum_path(path).name}.*"):  # pending sidecars of crashed saves
                orphan.unlink(missing_ok=True)
            _sync_dir(path.parent)
        self.meta = meta
        return path


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Refuse to write NaN or Inf: such a state would poison every adapter trained from it."""
    import torch

    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise StateError(f"refusing to write {path}: non-finite values (NaN/Inf) in {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}")


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of CPU contiguous tensors (what the file holds)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _metadata_digest(raw: Mapping[str, str]) -> str:
    body = {k: v for k, v in raw.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed_metadata(raw: dict[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Raw (string) metadata plus the checksums of itself and of the tensors it describes."""
    raw = {k: v for k, v in raw.items() if k != CHECKSUM_KEY}
    return raw | {CHECKSUM_KEY: json.dumps({"metadata": _metadata_digest(raw), "tensors": tensors_digest(tensors)})}


def _checksums(raw: Mapping[str, str], path: Path) -> dict[str, str] | None:
    """The recorded checksums, the metadata one checked (None for the versions before SEALED_SINCE)."""
    if CHECKSUM_KEY not in raw:
        if raw.get("format_version") in [str(v) for v in range(1, SEALED_SINCE)]:
            return None
        raise StateError(f"{path}: metadata lacks its checksum (the file was modified or is corrupt)")
    try:
        sums = json.loads(raw[CHECKSUM_KEY])
        ok = isinstance(sums, dict) and sums.get("metadata") == _metadata_digest(raw)
    except ValueError:
        ok = False
    if not ok or not isinstance(sums.get("tensors"), str):
        raise StateError(f"{path}: metadata does not match its checksum (the file was modified or is corrupt)")
    return sums


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def spectrum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".spectrum.safetensors")


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Never replace a file silently: an existing output needs --overwrite (overwrite=True)."""
    if Path(path).exists() and not overwrite:
        raise StateError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


def pending_spectrum_path(path: str | Path, spectrum_id: str) -> Path:
    """Where a new sidecar waits until its state is in place (see EvaState.save)."""
    side = spectrum_path(path)
    return side.with_name(f".{side.name}.{spectrum_id}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """OS failures while writing (full disk, I/O error, permissions) as one clear StorageError line."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}; the previous file, if any, is unchanged") \
            from None


def _sync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (a power cut after a rename must not bring the old name back)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(path: Path, write: Callable[[str], None]) -> str:
    """Write through `write(tmp)` to a synced temporary file beside `path` (normal file permissions); the caller
    renames it over `path`. The temporary file is removed if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        make_public(tmp, 0o666)  # mkstemp (and safetensors) make it private; a state file is not
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def make_public(path: str | Path, mode: int) -> None:
    """chmod `path` to `mode` less the process umask: what a plain open() or mkdir() would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write a file so that readers see the old content or the complete new one, never a part."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = write_temp(path, write)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The safetensors header of a file, checked entry by entry against the file's size (so truncation and
    corrupt offsets are caught here, before safetensors reads the file). A URL's header is read with ranged
    reads: the object itself is not downloaded."""
    if is_url(path):
        try:
            size, read = ranged(str(path))
        except FileNotFoundError:
            raise StateError(f"state file not found: {path}") from None
        return parse_header(path, size, read)
    path = require_path(path, "state file", StateError)
    with open(path, "rb") as f:
        def read(start: int, end: int) -> bytes:
            f.seek(start)
            return f.read(end - start)

        return parse_header(path, path.stat().st_size, read)


def parse_header(path: str | Path, size: int, read: Callable[[int, int], bytes]) -> dict[str, Any]:
    """read_header on any byte source: `read(start, end)` returns those bytes of a file of `size` bytes."""
    try:
        first = read(0, min(size, HEAD_BYTES))
        (n,) = struct.unpack("<Q", first[:8])
        if n > MAX_HEADER or n > size - 8:
            raise ValueError("header length past end of file")
        raw = first[8:8 + n] if len(first) >= 8 + n else first[8:] + read(len(first), 8 + n)
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        _check_layout(header, size - 8 - n)
    except (struct.error, ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, RecursionError) as err:
        raise StateError(f"{path} is not a readable safetensors file (truncated or corrupt: {err})") from None
    return header


def _counts(v: Any) -> bool:
    """A JSON list of non-negative integers (a shape, or offsets)."""
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


def _check_layout(header: dict[str, Any], data_size: int) -> None:
    """Metadata is {str: str}; every tensor has a known dtype, a shape and offsets that tile the data exactly."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("__metadata__ is not a mapping of strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_SIZES:
            raise ValueError(f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _counts(shape) or not _counts(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ValueError(f"tensor {name!r} has a malformed shape or offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[entry["dtype"]]:
            raise ValueError(f"tensor {name!r}: offsets do not match its shape")
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise ValueError("tensor data overlaps or leaves gaps")
        end = stop
    if end != data_size:
        raise ValueError(f"tensor data ends at byte {end}, the file holds {data_size}")


def parse_metadata(raw: Mapping[str, str], path: str | Path, text_keys: tuple[str, ...] = TEXT_KEYS) -> dict[str, Any]:
    """A header's string metadata parsed (JSON but for `text_keys`), without its checksum entry."""
    try:
        return {k: (v if k in text_keys else json.loads(v)) for k, v in raw.items() if k != CHECKSUM_KEY}
    except (ValueError, RecursionError) as err:
        raise StateError(f"{path}: metadata is corrupt ({err})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Parsed metadata of a state file (a path or a URL), checked and migrated to this version, without reading
    its tensors."""
    path = location(path)
    header = read_header(path)
    raw = header.get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise StateError(f"{path} is a safetensors file but not an evapipe EVA state (format={raw.get('format')!r})")
    meta = migrate(parse_metadata(raw, path), path)  # refuses newer and unknown versions first, naming them
    _checksums(raw, path)
    check_layers(meta, path)
    _check_tensor_entries(header, meta, path)
    return meta


def _check_tensor_entries(header: Mapping[str, Any], meta: Mapping[str, Any], path: str | Path) -> None:
    """The tensors the header lists are the metadata's: one float (rank, in_features) per layer of rank > 0."""
    ranks, width = meta["ranks"], meta["in_features"]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if name not in ranks or entry["shape"] != [ranks[name], width[name]] or entry["dtype"] not in FLOAT_DTYPES:
            want = f"float ({ranks[name]}, {width[name]})" if name in ranks else "no tensor (not a layer of ranks)"
            raise StateError(f"{path}: tensor {name} {entry['dtype']} {tuple(entry['shape'])} disagrees with the "
                             f"metadata's ranks / in_features ({want})")
    missing = [n for n, k in ranks.items() if k > 0 and n not in header]
    if missing:
        raise StateError(f"{path}: layers {', '.join(missing[:3])} have rank > 0 but no tensor")


def check_layers(meta: Mapping[str, Any], path: str | Path = "state") -> None:
    """Every per-layer entry a reader relies on has the right type and covers the same layers as `ranks`."""
    def count(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    ranks = meta["ranks"]
    problems = []
    if not isinstance(ranks, dict) or not ranks or not all(count(k, 0) for k in ranks.values()):
        problems.append("ranks must map layer names to ranks >= 0")
    elif not all(isinstance(n, str) for n in ranks):
        problems.append("ranks must be keyed by layer name")
    else:
        for key, ok in (("in_features", lambda v: count(v, 1)), ("layer_r", lambda v: count(v, 0)),
                        ("layer_alpha", number), ("explained_variance", lambda v: isinstance(v, list)),
                        ("converged", lambda v: isinstance(v, bool))):
            table = meta[key]
            if not isinstance(table, dict) or not all(n in table and ok(table[n]) for n in ranks):
                problems.append(f"{key} does not describe every layer of ranks")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(meta[key], dict):
                problems.append(f"{key} is not a mapping")
        if not problems:
            wide = [n for n, k in ranks.items() if k > meta["in_features"][n]]
            if wide:
                problems.append(f"rank above in_features for {', '.join(wide[:3])}")
    if not count(meta["r"], 1) or not number(meta["lora_alpha"]):
        problems.append("r must be an integer >= 1 and lora_alpha a number")
    if not isinstance(meta["task"], str):
        problems.append("task is not a name")
    if problems:
        raise StateError(f"{path}: metadata is inconsistent ({'; '.join(problems)})")


def load_state_file(path: str | Path, with_spectrum: bool = True) -> EvaState:
    """Load a local state file (and its spectrum sidecar when present); corrupt, foreign or inconsistent files
    raise StateError, so a file that loads is the state that was written. (`statecache.load_state` takes URLs.)"""
    path = location(path)
    meta = read_metadata(path)
    raw = read_header(path)["__metadata__"]
    tensors = _load_tensors(path, _checksums(raw, path))  # shapes and dtypes: checked on the header already
    check_finite(tensors, path)
    spectrum = _load_spectrum(path, meta.get("spectrum_id")) if with_spectrum else {}
    return EvaState(tensors, meta, spectrum)


def _load_tensors(path: Path, sums: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as err:
        raise StateError(f"{path} is corrupt: {err}") from None
    if sums is not None and tensors_digest(tensors) != sums["tensors"]:
        raise StateError(f"{path}: tensor data does not match its checksum (the file was modified or is corrupt)")
    return tensors


def _load_spectrum(path: Path, spectrum_id: str | None) -> dict[str, torch.Tensor]:
    """The sidecar written with this state: under its usual name, or still under its pending one (a save
    interrupted between its last two renames); any other sidecar is ignored with a warning."""
    candidates = [spectrum_path(path)] + ([pending_spectrum_path(path, spectrum_id)] if spectrum_id else [])
    for side in candidates:
        if not side.is_file():
            continue
        raw = read_header(side).get("__metadata__") or {}
        if raw.get("format") == SPECTRUM_FORMAT and raw.get("spectrum_id") == spectrum_id:
            sums = {"tensors": raw[CHECKSUM_KEY]} if CHECKSUM_KEY in raw else None
            return _load_tensors(side, sums)
    if candidates[0].is_file():
        log.warning("ignoring %s: it is not the spectrum written with %s (interrupted save?)", candidates[0], path)
    return {}


def strip_peft_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT returns keys with or without `base_model.model.`; evapipe keys are base-model names."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state_dict.items()}
