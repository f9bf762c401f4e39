"""Streamed task data (data.streaming): a `datasets` IterableDataset read row by row as the job needs it.

Nothing is converted to Arrow up front, so the first batch of a multi-GB corpus comes after one row is read, not
after the whole corpus. Every process reads the same stream (same seed: a shuffled stream is shuffled alike
everywhere) and keeps its slice of each global step, as a table is read (data.py's module docstring): N processes
x batch B give the steps of 1 process x batch N*B, and an unshuffled stream gives exactly a table's steps, so
states and store keys agree between the two. This is `split_dataset_by_node`'s read-all-keep-a-share mode with
contiguous shares instead of every N-th row; its other mode (whole files per node) would tie the steps to the
world size. Reading costs I/O on every process, never memory: a step's rows at a time.

A shuffled stream is shuffled through `data.shuffle_buffer` rows (IterableDataset.shuffle: shard order and a
buffer), reshuffled per pass (set_epoch), so its order differs from a table's full permutation. Resuming at step
N reads the stream up to that step again without collating it: the buffer's state is not kept in a checkpoint,
and re-reading is the way to land on the same rows.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ..core.config import DataConfig
from ..core.errors import DataError
from ..core.sources import data_files, files_digest, json_digest, resolve_data_path
from .reading import data_columns, missing_columns, reading, source_args

log = logging.getLogger("evapipe")
T = TypeVar("T")


def global_steps(passes: Callable[[int], Iterable[T]], size: int) -> Iterator[list[T]]:
    """Endless steps of `size` rows over repeated passes (`passes(e)` yields pass e's rows); the last step of a
    pass holds what is left, as a table's does. A pass without a row is a DataError, not an endless loop."""
    for epoch in itertools.count():
        chunk, n = [], 0
        for row in passes(epoch):
            chunk.append(row)
            n += 1
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        if n == 0:
            raise DataError("the data stream yielded no row" if epoch == 0 else f"the data stream ran dry in pass {epoch}")


class StreamRows:
    """A streamed split as data.TaskRows: null rows skipped as they come, one pass's length known once read."""

    def __init__(self, ds: Any, cfg: DataConfig, columns: list[str], source: Callable[[], Any]):
        self.ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer) if cfg.shuffle else ds
        self.columns, self.cfg, self._source = columns, cfg, source
        self.skipped = 0
        self._pass_rows: int | None = None

    def samples(self) -> int | None:
        return self._pass_rows

    def pass_steps(self, global_batch: int) -> int | None:
        return None if self._pass_rows is None else math.ceil(self._pass_rows / global_batch)

    def fingerprint(self) -> str:
        """The data's source (see open_stream), its split, the columns read and the sample cap: asked for on rank 0
        only, so the other ranks never hash the files."""
        return json_digest([self._source(), self.cfg.split, self.columns, self.cfg.max_samples], 16)

    def _rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Pass `epoch` (reshuffled per pass, as a table is), rows whose used columns hold a value."""
        self.ds.set_epoch(epoch)
        kept = skipped = 0
        with reading(self.cfg):  # a bad line deep in a corpus fails here, mid-job: one DataError naming the data
            for row in self.ds:
                if any(row.get(c) is None for c in self.columns):
                    skipped += 1
                    self.skipped = max(self.skipped, skipped)
                    continue
                kept += 1
                yield row
        if self._pass_rows is None:
            if kept == 0 and skipped:
                raise DataError(f"every row of `{self.cfg.path}` has a null {' or '.join(self.columns)}: there is no "
                                "text to read")
            if skipped:
                log.warning("skipped %d of %d streamed rows of %s whose %s is null", skipped, kept + skipped,
                            self.cfg.path, " or ".join(self.columns))
            self._pass_rows = kept

    def steps(self, batch_size: int, world: int, rank: int, start_step: int = 0) -> Iterator[list[dict[str, Any]]]:
        if start_step:
            log.info("reading the stream up to step %d to resume there", start_step)
        lo = rank * batch_size
        for chunk in itertools.islice(global_steps(self._rows, batch_size * world), start_step, None):
            yield chunk[lo:lo + batch_size]


def open_stream(cfg: DataConfig, kind: str) -> StreamRows:
    """The configured split as a stream, checked on its first row (not empty, the columns `kind` reads).

    Its source, for the fingerprint, is read in bounded memory: the content hash of local files (the one the store
    key takes), or the hub dataset's commit as `datasets` resolved it.
    """
    import datasets

    with reading(cfg):
        name, kwargs = source_args(cfg)
        builder = datasets.load_dataset_builder(name, **kwargs)
        ds = builder.as_streaming_dataset(split=cfg.split)
        if cfg.max_samples is not None:
            ds = ds.take(cfg.max_samples)
        first = next(iter(ds), None)
    if first is None:
        raise DataError(f"dataset `{cfg.path}` split {cfg.split!r} is empty")
    missing_columns(cfg, kind, ds.column_names or list(first))
    files = data_files(resolve_data_path(cfg.path))

    def source() -> Any:
        return files_digest(files) if files is not None else [cfg.path, cfg.name, builder.hash]

    return StreamRows(ds, cfg, data_columns(cfg, kind), source)
