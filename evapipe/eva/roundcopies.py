"""The PCA states a sequential round keeps for its replay, their bulk in a temporary file instead of host memory.

A round (sequential.py) pushes every batch through one block before the next, so the in-memory loop's decisions are
replayed after the last block: each PCA must be set back to its state after any batch of the round. Those copies are
the round's largest host cost -- per batch, every PCA's components and mean (n_track x n_features), 8 x 660 MiB for
Llama-3.1-70B at the default round -- and the replay reads each once, in batch order. So they are written to an
unlinked temporary file (in TMPDIR) as they are made and read back one at a time: host memory holds the live PCAs,
not a round of their copies. The small fields (counts, variance, singular values, similarities) stay in memory.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields, replace
from typing import IO

import torch

from ..core.errors import StorageError
from .ipca import PCAState

HOST = torch.device("cpu")
FILED = ("components", "mean")  # the per-feature tensors; the others (a few numbers per component) stay in memory


@dataclass(frozen=True)
class _Stored:
    """Where one tensor of a copy lies in the file."""

    offset: int
    dtype: torch.dtype
    shape: torch.Size


def _bytes(t: torch.Tensor) -> memoryview:
    """A host tensor's bytes, without another copy (any dtype: viewed as bytes before numpy sees it)."""
    return memoryview(t.detach().to(HOST).contiguous().reshape(-1).view(torch.uint8).numpy())


class RoundCopies:
    """Per PCA, its copies after each batch of a round, in the order kept; their FILED tensors wait in the file
    (made at the first of them)."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._end = 0
        self._kept: dict[str, list[tuple[PCAState, dict[str, _Stored]]]] = {}

    def __enter__(self) -> RoundCopies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the copies; the file (unlinked from the start) goes with them."""
        if self._file is not None:
            self._file.close()
        self._file, self._kept = None, {}

    def keep(self, name: str, state: PCAState) -> None:
        """Append a copy of `state` that later updates of it cannot change."""
        small, stored = {}, {}
        for f in fields(state):
            if not f.init:
                continue
            v = getattr(state, f.name)
            if isinstance(v, torch.Tensor) and f.name in FILED:
                stored[f.name] = self._write(v)
                small[f.name] = None
            elif isinstance(v, torch.Tensor):
                small[f.name] = v.to(HOST, copy=True)
        light = replace(state, **small, history=list(state.history))
        self._kept.setdefault(name, []).append((light, stored))

    def get(self, name: str, j: int, device: torch.device) -> PCAState:
        """`name`'s copy number j (after the round's j-th batch), every tensor on `device`."""
        light, stored = self._kept[name][j]
        values = {f.name: getattr(light, f.name) for f in fields(light) if f.init}
        values = {k: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        values |= {k: self._read(s).to(device) for k, s in stored.items()}
        return replace(light, **(values | {"history": list(light.history)}))

    def _write(self, t: torch.Tensor) -> _Stored:
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile()
            self._file.seek(self._end)
            self._file.write(_bytes(t))
        except OSError as err:
            raise StorageError(
                f"model.offload: sequential keeps a round's PCA copies in a temporary file, and writing it in "
                f"{tempfile.gettempdir()} failed ({err}); point TMPDIR at a folder with room, or lower "
                "model.sequential_round"
            ) from None
        stored = _Stored(self._end, t.dtype, t.shape)
        self._end += t.numel() * t.element_size()
        return stored

    def _read(self, s: _Stored) -> torch.Tensor:
        out = torch.empty(s.shape, dtype=s.dtype)
        assert self._file is not None
        self._file.seek(s.offset)
        want = out.numel() * out.element_size()
        got = self._file.readinto(_bytes(out)) if want else 0
        if got != want:
            raise StorageError(f"the round's temporary file of PCA copies returned {got} of {want} bytes")
        return out
