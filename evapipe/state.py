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

import json
import logging
import os
import struct
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StateError
from .metadata import FORMAT, LAYER_KEYED, StateMeta, migrate

if TYPE_CHECKING:
    import torch

log = logging.getLogger("evapipe")

SPECTRUM_FORMAT = FORMAT + ".spectrum"
TEXT_KEYS = ("format", "task", "created")  # every other metadata value is JSON
PEFT_PREFIX = "base_model.model."
MAX_HEADER = 100_000_000


@dataclass
class EvaState:
    """An EVA result: A inits per layer (rank > 0 only), every layer's rank, and the metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    spectrum: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.meta["ranks"].items()}

    @property
    def layers(self) -> list[str]:
        return list(self.meta["ranks"])

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
        return EvaState({prefix + n: a for n, a in self.tensors.items()}, meta,
                        {prefix + k: v for k, v in self.spectrum.items()})

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """{module name: A}, as PEFT's get_eva_state_dict returns; zero-row tensors for rank-0 layers."""
        import torch

        out = {}
        for name in self.ranks:
            t = self.tensors.get(name)
            if t is None:
                t = torch.zeros(0, self.meta["in_features"][name])
            out[prefix + name] = t
        return out

    def save(self, path: str | Path) -> Path:
        """Write the state and its spectrum sidecar atomically.

        Both go to temporary files first and are renamed only once both are complete (sidecar first), so a crash
        at any moment leaves the previous state file as it was. A new `spectrum_id` ties the pair together.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, spectrum_id=uuid.uuid4().hex[:16] if self.spectrum else None)
        raw = {k: (v if k in TEXT_KEYS else json.dumps(v)) for k, v in meta.items()}
        temps = []
        try:
            if self.spectrum:
                side_meta = {"format": SPECTRUM_FORMAT, "spectrum_id": meta["spectrum_id"]}
                temps.append((write_temp(spectrum_path(path),
                                         lambda tmp: save_file(_contiguous(self.spectrum), tmp, metadata=side_meta)),
                              spectrum_path(path)))
            temps.append((write_temp(path, lambda tmp: save_file(_contiguous(self.tensors), tmp, metadata=raw)), path))
            for tmp, final in temps:
                os.replace(tmp, final)
        finally:
            for tmp, _ in temps:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        self.meta = meta
        return path


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def spectrum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".spectrum.safetensors")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(write_temp(path, write), path)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The safetensors header of a file, checked against the file's size (so truncation is caught here)."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file not found: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or n > size - 8:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if ends and max(ends) > size - 8 - n:
            raise ValueError(f"tensor data ends at byte {max(ends)}, the file holds {size - 8 - n}")
    except (struct.error, ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError) as err:
        raise StateError(f"{path} is not a readable safetensors file (truncated or corrupt: {err})") from None
    return header


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Parsed metadata of a state file, checked and migrated to this version, without reading its tensors."""
    path = Path(path)
    raw = read_header(path).get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise StateError(f"{path} is a safetensors file but not an evapipe EVA state (format={raw.get('format')!r})")
    try:
        meta = {k: (v if k in TEXT_KEYS else json.loads(v)) for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise StateError(f"{path}: metadata is corrupt ({err})") from None
    return migrate(meta, path)


def load_state(path: str | Path, with_spectrum: bool = True) -> EvaState:
    """Load a state file (and its spectrum sidecar when present); corrupt or foreign files raise StateError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise StateError(f"{path} is corrupt: {err}") from None
    for name, t in tensors.items():
        if name not in meta["ranks"] or t.ndim != 2 or t.shape[0] != meta["ranks"][name]:
            raise StateError(f"{path}: tensor {name} {tuple(t.shape)} disagrees with the metadata's ranks")
    spectrum = {}
    side = spectrum_path(path)
    if with_spectrum and side.is_file():
        side_meta = read_header(side).get("__metadata__") or {}
        want = meta.get("spectrum_id")
        if side_meta.get("format") != SPECTRUM_FORMAT or (want is not None and side_meta.get("spectrum_id") != want):
            log.warning("ignoring %s: it is not the spectrum written with %s (interrupted save?)", side, path)
        else:
            try:
                spectrum = load_file(str(side))
            except (SafetensorError, OSError, RuntimeError, ValueError) as err:
                raise StateError(f"{side} is corrupt: {err}") from None
    return EvaState(tensors, meta, spectrum)


def strip_peft_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT returns keys with or without `base_model.model.`; evapipe keys are base-model names."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state_dict.items()}
