"""Exceptions evapipe raises for bad input: each says what is wrong and what to do next."""

from __future__ import annotations

import os
from pathlib import Path


class EvapipeError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(EvapipeError, ValueError):
    """A job config is unknown, mistyped or impossible; raised before any model is loaded."""


class DataError(EvapipeError, ValueError):
    """The task data is missing, empty or lacks the fields the config names."""


class StateError(EvapipeError, ValueError):
    """A state file is corrupt, not an evapipe state, from a newer evapipe, or for another model."""


class ConvergenceError(EvapipeError, RuntimeError):
    """Layers were still unconverged when the batch budget ran out."""


class DistributedError(EvapipeError, RuntimeError):
    """Another rank failed; carries its error so every rank can stop with it."""


class StorageError(EvapipeError, OSError):
    """A file could not be written (full disk, I/O error, permissions); what was there before is left as it was."""


def require_path(path: os.PathLike | str, what: str, error: type[EvapipeError], directory: bool = False) -> Path:
    """`path` as a Path if it is an existing file (a folder with `directory`), else `error` saying which it is not:
    the one wording for "not found" and "a folder where a file belongs" (and the reverse) across commands."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir() != directory:
        raise error(f"{what} {path} is a {'file' if directory else 'directory'}; give "
                    f"{'a directory' if directory else 'a file'}")
    return path
