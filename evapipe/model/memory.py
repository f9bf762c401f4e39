"""Sizes and memory budgets of a model, from its structure alone (a meta-device build holds no weights)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import ConfigError


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers at their dtypes (meta tensors count as if materialised)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def largest_unit(model: nn.Module) -> tuple[str, int]:
    """The biggest piece that must sit on one device at once: the largest module of a class transformers never
    splits (`_no_split_modules`: a decoder layer, a ViT layer), else the largest module holding parameters itself."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    units = [(n, m) for n, m in model.named_modules() if type(m).__name__ in no_split]
    if not units:
        units = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    name, module = max(units, key=lambda nm: module_bytes(nm[1]))
    return name, module_bytes(module)


def budget_bytes(size: int | str) -> int:
    """`20GiB`, `500MB`, or a byte count, as accelerate reads max_memory."""
    from accelerate.utils import convert_file_size_to_int

    try:
        return int(size) if isinstance(size, int) else convert_file_size_to_int(size)
    except ValueError:
        raise ConfigError(f"model.max_memory: {size!r} is not a size (use bytes or 20GiB / 500MB)") from None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_budget(max_memory: Mapping[Any, int | str], model: nn.Module) -> None:
    """Refuse a max_memory in which no device holds one block: the block that runs needs all its weights there."""
    name, need = largest_unit(model)
    budgets = {str(k): budget_bytes(v) for k, v in max_memory.items() if str(k) != "disk"}
    if not budgets:
        return
    device, most = max(budgets.items(), key=lambda kv: kv[1])
    if most < need:
        raise ConfigError(
            f"model.max_memory allows at most {fmt_bytes(most)} on any device ({device}), below one block of the "
            f"model ({name}, {type(model.get_submodule(name)).__name__}: {fmt_bytes(need)}); raise it to at least that"
        )


def check_writable(folder: str | Path, key: str) -> Path:
    """Create `folder` if needed and prove it takes a file, so a bad offload folder fails before any loading."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".evapipe-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"`{key}` {folder} is not a writable folder: {err.strerror or err}") from None
    return path
