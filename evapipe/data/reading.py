"""How a data split is read: which `datasets` builder and files, which columns a model kind reads, and
one DataError naming the data for anything `datasets` raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.config import DataConfig
from ..core.errors import ConfigError, DataError
from ..core.sources import FILE_BUILDERS, local_data_files, resolve_data_path


def data_columns(cfg: DataConfig, kind: str) -> list[str]:
    """The columns a model kind reads from the data (checked on load, hashed into the dataset fingerprint)."""
    if kind == "image-cls":
        return [cfg.image_field]
    if kind == "seq2seq" and not cfg.prompt_field:
        raise ConfigError(
            "seq2seq models need data.prompt_field (the encoder input) and data.completion_field (the decoder target)"
        )
    if cfg.messages_field:
        return [cfg.messages_field]
    if cfg.prompt_field:
        return [cfg.prompt_field, cfg.completion_field]
    if cfg.text_field is None:
        raise ConfigError("set data.text_field, data.prompt_field/completion_field or data.messages_field")
    return [cfg.text_field]


@contextmanager
def reading(cfg: DataConfig) -> Iterator[None]:
    """`datasets` raises many types for unreadable input: each becomes one DataError that names the data."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read data from `{cfg.path}` (split {cfg.split!r}): {err}") from None


def source_args(cfg: DataConfig) -> tuple[str, dict[str, Any]]:
    """What `datasets.load_dataset` / `load_dataset_builder` are called with: the builder of local files (found
    by suffix, checked to be one kind, empty files dropped) with them as the split, or the hub id with its
    configuration and revision."""
    path = resolve_data_path(cfg.path)
    files = local_data_files(path, cfg.path)
    if files is None:
        return path, {"name": cfg.name, "revision": cfg.revision}
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if len(builders) != 1 or None in builders:
        raise DataError(f"data files must be all of one kind ({', '.join(FILE_BUILDERS)}); got {sorted(suffixes)}")
    return builders.pop(), {"data_files": {cfg.split: files}}


def missing_columns(cfg: DataConfig, kind: str, columns: Sequence[str]) -> None:
    """A DataError naming the first column `kind` reads that the data does not have."""
    for name in data_columns(cfg, kind):
        if name not in columns:
            raise DataError(f"dataset `{cfg.path}` has no column `{name}`; columns: {', '.join(columns)}")
