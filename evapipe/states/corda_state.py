"""The CorDA state file: every target layer's cropped decomposition, plus metadata that says what it is.

Tensors are keyed as PEFT's CordaConfig.cache_file is (`<module>.eigens.S_WC` (r,), `.U_WC` (out, r), `.V_WC`
(in, r), float32), so the cache file PEFT reads is these tensors torch.saved (`peft_cache`). Metadata values are
strings (JSON where structured), sealed with checksums the way EVA states are (state.py), so a changed byte is an
error. It is a state of the base weights it was computed on: applying it changes those weights (the residual
model), so the metadata records the model's architecture fingerprint, and apply checks it.

Format versions (`format_version`, format `evapipe.corda`):
  1  the first: r, lora_alpha, corda_method, ranks / in_features / out_features / samples / layer_tokens per layer,
     tokens, shared_inputs, target_modules, task, store_key, batches, world_size, model, dataset, versions, created.

`read_state_metadata` reads either kind of state (EVA or CorDA) from its header, without torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import JobConfig
from ..core.errors import StateError
from .metadata import MetaRecord, utc_now
from .state import (
    FLOAT_DTYPES,
    LayerState,
    _checksums,
    _contiguous,
    _load_tensors,
    atomic_write,
    check_finite,
    parse_metadata,
    read_header,
    read_metadata,
    sealed_metadata,
)

if TYPE_CHECKING:
    import torch

    from ..corda.decompose import Eigens

CORDA_FORMAT = "evapipe.corda"
CORDA_FORMAT_VERSION = 1
TEXT_KEYS = ("format", "task", "created", "method", "corda_method")
EIGEN_KEYS = ("S_WC", "U_WC", "V_WC")  # PEFT's CordaEigens fields, in its cache file's key suffixes

log = logging.getLogger("evapipe")


@dataclass
class CordaMeta(MetaRecord):
    """Everything a CorDA state file says besides its tensors; per-layer maps keyed by module name."""

    r: int
    lora_alpha: float
    corda_method: str
    ranks: dict[str, int]
    in_features: dict[str, int]
    out_features: dict[str, int]
    samples: dict[str, int] = field(default_factory=dict)  # samples each layer's covariance averages over
    layer_tokens: dict[str, int] = field(default_factory=dict)  # token rows each layer's covariance summed
    tokens: int | None = None  # token rows of the data read (the most any layer saw)
    shared_inputs: list[list[str]] = field(default_factory=list)
    target_modules: Any = None
    task: str = "default"
    store_key: str | None = None
    batches: int | None = None
    world_size: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    method: str = "corda"
    format: str = CORDA_FORMAT
    format_version: int = CORDA_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


def eigen_key(name: str, part: str) -> str:
    return f"{name}.eigens.{part}"


@dataclass
class CordaState(LayerState):
    """A CorDA result: the cropped (S, U, V) of every target layer, and the metadata."""

    @classmethod
    def of(cls, eigens: Mapping[str, Eigens], meta: CordaMeta) -> CordaState:
        tensors = {}
        for name, e in eigens.items():
            tensors |= {eigen_key(name, "S_WC"): e.S, eigen_key(name, "U_WC"): e.U, eigen_key(name, "V_WC"): e.V}
        return cls(_contiguous(tensors), meta.to_dict())

    def eigens(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, U, V) of one layer."""
        return tuple(self.tensors[eigen_key(name, part)] for part in EIGEN_KEYS)  # type: ignore[return-value]

    def peft_cache(self) -> dict[str, torch.Tensor]:
        """The dict PEFT's CordaConfig.cache_file holds (torch.save it)."""
        return dict(self.tensors)

    def save(self, path: str | Path) -> Path:
        """Write the state atomically; non-finite values are refused before anything is written."""
        from safetensors.torch import save_file

        path = Path(path)
        check_finite(self.tensors, path)
        meta = dict(self.meta, format=CORDA_FORMAT, format_version=CORDA_FORMAT_VERSION)
        tensors = _contiguous(self.tensors)
        raw = sealed_metadata({k: (v if k in TEXT_KEYS else json.dumps(v)) for k, v in meta.items()}, tensors)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=raw))
        self.meta = meta
        return path


def read_corda_metadata(path: str | Path) -> dict[str, Any]:
    """Parsed metadata of a CorDA state file, checked against its checksum and tensor entries (no torch)."""
    path = Path(path)
    header = read_header(path)
    raw = header.get("__metadata__") or {}
    if raw.get("format") != CORDA_FORMAT:
        raise StateError(f"{path} is not an evapipe CorDA state (format={raw.get('format')!r})")
    meta = parse_metadata(raw, path, TEXT_KEYS)
    version = meta.get("format_version")
    if version != CORDA_FORMAT_VERSION:
        raise StateError(f"{path} has CorDA format_version {version!r}; this evapipe reads {CORDA_FORMAT_VERSION} "
                         "(upgrade evapipe to read a newer one)")
    _checksums(raw, path)
    _check_entries(header, meta, path)
    return meta


def _check_entries(header: Mapping[str, Any], meta: Mapping[str, Any], path: Path) -> None:
    """Every layer has float S (r,), U (out, r), V (in, r), and nothing else is in the file."""
    try:
        want = {}
        for name, r in meta["ranks"].items():
            want[eigen_key(name, "S_WC")] = [r]
            want[eigen_key(name, "U_WC")] = [meta["out_features"][name], r]
            want[eigen_key(name, "V_WC")] = [meta["in_features"][name], r]
    except (KeyError, TypeError, AttributeError) as err:
        raise StateError(f"{path}: metadata is inconsistent ({err!r})") from None
    have = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, entry in have.items():
        if key not in want or entry["shape"] != want[key] or entry["dtype"] not in FLOAT_DTYPES:
            raise StateError(f"{path}: tensor {key} {entry['dtype']} {tuple(entry['shape'])} disagrees with the "
                             "metadata's ranks / in_features / out_features")
    missing = sorted(set(want) - set(have))
    if missing:
        raise StateError(f"{path}: tensors {', '.join(missing[:3])} are missing")


def load_corda_state(path: str | Path) -> CordaState:
    """Load a CorDA state file; corrupt, foreign or inconsistent files raise StateError."""
    path = Path(path)
    meta = read_corda_metadata(path)
    raw = read_header(path)["__metadata__"]
    tensors = _load_tensors(path, _checksums(raw, path))
    check_finite(tensors, path)
    return CordaState(tensors, meta)


def state_format(path: str | Path) -> str | None:
    """The `format` a safetensors file's metadata names (None when it names none); StateError if unreadable."""
    return (read_header(path).get("__metadata__") or {}).get("format")


def read_state_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an EVA or a CorDA state, whichever `path` holds (`method` says which: EVA's has none)."""
    if state_format(path) == CORDA_FORMAT:
        return read_corda_metadata(path)
    return read_metadata(path)


def is_corda_state(path: str | Path) -> bool:
    return state_format(path) == CORDA_FORMAT


def serve_cache_hit(cfg: JobConfig, hit: Path) -> None:
    """A stored CorDA state answers the job: PEFT's cache file is written from it; a covariance file cannot be (the
    state keeps no covariance), so its absence is said, with the way to get it."""
    if cfg.corda.cache_file:
        write_cache_file(cfg.corda.cache_file, load_corda_state(hit))
    cov = cfg.corda.covariance_file
    if cov and not Path(cov).is_file():
        log.warning("corda.covariance_file %s is not written on a cache hit (the state keeps no covariance); "
                    "--force recomputes the job and writes it", cov)


def write_cache_file(path: str | Path, state: CordaState) -> Path:
    """PEFT's CordaConfig.cache_file: torch.save of the state's eigens, atomically."""
    import torch  # PEFT reads this file with torch.load; the rest of this module stays torch-free

    return atomic_write(path, lambda tmp: torch.save(state.peft_cache(), tmp))
