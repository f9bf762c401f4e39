"""Task data as a table (a `datasets.Dataset` read by index): loaded, null rows dropped, fingerprinted, and each
global step's rows shared out between ranks (rank r takes the r-th slice of step k).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import DataConfig
from ..core.errors import DataError
from .reading import data_columns, missing_columns, reading, source_args

log = logging.getLogger("evapipe")
FINGERPRINT_ROWS = 1024  # rows hashed at a time: the fingerprint's memory does not grow with the dataset


def load_task_data(cfg: DataConfig, kind: str = "causal-lm") -> tuple[Any, int]:
    """The configured split as a datasets.Dataset, checked non-empty and holding the columns `kind` reads, without
    rows whose used columns are null (which would be read as the text "None"); and how many such rows it skipped.

    Local files go through the matching `datasets` builder; a folder of images through `imagefolder` (one class per
    sub-folder).
    """
    import datasets

    with reading(cfg):
        name, kwargs = source_args(cfg)
        ds = datasets.load_dataset(name, split=cfg.split, **kwargs)
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    if len(ds) == 0:
        raise DataError(f"dataset `{cfg.path}` split {cfg.split!r} is empty")
    missing_columns(cfg, kind, ds.column_names)
    return drop_null_rows(ds, data_columns(cfg, kind), cfg.path)


def _arrow_batches(ds: Any, columns: list[str]) -> Iterator[Any]:
    """The used columns as arrow tables of FINGERPRINT_ROWS rows each (one contiguous chunk): bounded memory."""
    yield from ds.select_columns(columns).with_format("arrow").iter(batch_size=FINGERPRINT_ROWS)


def drop_null_rows(ds: Any, columns: list[str], where: str = "data") -> tuple[Any, int]:
    """Rows whose used columns all hold a value, and how many were left out; all rows null is a DataError."""
    import pyarrow.compute as pc

    keep, start = [], 0
    for table in _arrow_batches(ds, columns):
        valid = None
        for name in columns:
            ok = pc.is_valid(table[name])
            valid = ok if valid is None else pc.and_(valid, ok)
        keep += [start + i for i, ok in enumerate(valid.to_pylist()) if ok]
        start += table.num_rows
    skipped = len(ds) - len(keep)
    if not keep:
        raise DataError(f"every row of `{where}` has a null {' or '.join(columns)}: there is no text to read")
    if skipped:
        log.warning("skipping %d of %d rows of %s whose %s is null", skipped, len(ds), where, " or ".join(columns))
        ds = ds.select(keep)
    return ds, skipped


def dataset_fingerprint(ds: Any, columns: list[str]) -> str:
    """Content hash of the columns used, so the same data under another path or clone hashes the same.

    Streamed over fixed-size row blocks, each copied and written as one arrow IPC record batch: the same rows give
    the same bytes whatever the storage's chunking, and memory stays at one block, however large the dataset.
    """
    import pyarrow as pa

    h = hashlib.sha256()
    for table in _arrow_batches(ds, columns):
        table = table.take(pa.array(range(table.num_rows)))  # a fresh copy: no slice offsets in the bytes
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue())
    h.update(str(len(ds)).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Shard:
    """Which samples rank `rank` of `world` reads at global step `step`."""

    step: int
    epoch: int
    indices: list[int]


def sharded_steps(
    n_samples: int, batch_size: int, world: int, rank: int, shuffle: bool, seed: int, start_step: int = 0
) -> Iterator[Shard]:
    """Endless global steps (passes over the data repeat, reshuffled per pass), this rank's slice of each."""
    if n_samples == 0:
        raise DataError("no samples to read")
    global_batch = batch_size * world
    per_epoch = math.ceil(n_samples / global_batch)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        if shuffle:
            order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = list(range(n_samples))
        while k < per_epoch:
            lo = k * global_batch + rank * batch_size
            hi = min(lo + batch_size, (k + 1) * global_batch, n_samples)
            yield Shard(step, epoch, order[lo:hi] if lo < hi else [])
            step += 1
            k += 1


def rows_at(ds: Any, indices: list[int]) -> list[dict[str, Any]]:
    """Rows in order, decoded (image columns as PIL images, not stored bytes)."""
    columns = ds[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@dataclass
class TableRows:
    """A datasets.Dataset read by index: shuffled as a whole per pass (seeded), any step reachable at once."""

    ds: Any
    columns: list[str]
    shuffle: bool
    seed: int
    skipped: int = 0

    def samples(self) -> int:
        return len(self.ds)

    def pass_steps(self, global_batch: int) -> int:
        return math.ceil(len(self.ds) / global_batch)

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.ds, self.columns)

    def steps(self, batch_size: int, world: int, rank: int, start_step: int = 0) -> Iterator[list[dict[str, Any]]]:
        for shard in sharded_steps(len(self.ds), batch_size, world, rank, self.shuffle, self.seed, start_step):
            yield rows_at(self.ds, shard.indices) if shard.indices else []
