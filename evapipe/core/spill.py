"""Tensors parked in an unlinked temporary file (in TMPDIR) until read back.

A sequential round keeps what its replay may need again -- each PCA's copy after every batch, each block's inputs
-- and those are the round's largest host costs, read back once or never. Written as they are made, they cost disk
(which the job can have plenty of) instead of host memory (which sequential exists to save). The file is unlinked
from the start: a crash or a kill leaves nothing behind.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import IO

import torch

from .errors import StorageError

HOST = torch.device("cpu")


@dataclass(frozen=True)
class Parked:
    """Where one tensor lies in the file."""

    offset: int
    dtype: torch.dtype
    shape: torch.Size


def _bytes(t: torch.Tensor) -> memoryview:
    """A host tensor's bytes, without another copy (any dtype: viewed as bytes before numpy sees it)."""
    return memoryview(t.detach().to(HOST).contiguous().reshape(-1).view(torch.uint8).numpy())


class Spill:
    """One temporary file of tensors, made at the first `park`; `what` names them in errors."""

    def __init__(self, what: str):
        self.what = what
        self._file: IO[bytes] | None = None
        self._end = 0

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._end = None, 0

    def park(self, t: torch.Tensor) -> Parked:
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile()
            self._file.seek(self._end)
            self._file.write(_bytes(t))
        except OSError as err:
            raise StorageError(
                f"model.offload: sequential keeps a round's {self.what} in a temporary file, and writing it in "
                f"{tempfile.gettempdir()} failed ({err}); point TMPDIR at a folder with room, or lower "
                "model.sequential_round"
            ) from None
        parked = Parked(self._end, t.dtype, t.shape)
        self._end += t.numel() * t.element_size()
        return parked

    def read(self, p: Parked) -> torch.Tensor:
        """A new host tensor with the parked bytes."""
        out = torch.empty(p.shape, dtype=p.dtype)
        want = out.numel() * out.element_size()
        got = 0
        if want:
            assert self._file is not None
            self._file.seek(p.offset)
            got = self._file.readinto(_bytes(out))
        if got != want:
            raise StorageError(f"the round's temporary file of {self.what} returned {got} of {want} bytes")
        return out
