"""The task's rows as a job reads them: a table or a stream behind one protocol, and each rank's batches.

Step k of the global stream is what one process with batch_size x world_size would see at step k; rank r takes
the r-th slice of it. So N processes x batch B give the same union of samples per step as 1 process x batch N*B,
including the last, uneven step of each pass over the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from ..core.config import DataConfig
from .reading import data_columns
from .streaming import open_stream
from .tables import TableRows, load_task_data


class TaskRows(Protocol):
    """The task's rows as a job reads them, step by step: a table (TableRows) or a stream (streaming.StreamRows).

    Step k of the global stream holds `batch_size x world` rows; rank r reads its r-th slice (see the module
    docstring), so both kinds give the same steps on the same rows in the same order.
    """

    skipped: int  # rows left out because a used column is null (so far, for a stream)

    def samples(self) -> int | None:
        """Rows in one pass over the data; None while a stream has not been read to its end."""

    def pass_steps(self, global_batch: int) -> int | None:
        """Steps in one pass over the data; None while a stream has not been read to its end."""

    def fingerprint(self) -> str:
        """What identifies the data read, in bounded memory (the state's provenance)."""

    def steps(self, batch_size: int, world: int, rank: int, start_step: int = 0) -> Iterator[list[dict[str, Any]]]:
        """This rank's rows for every global step from `start_step` on, endlessly (an empty share is [])."""


def open_rows(cfg: DataConfig, kind: str = "causal-lm") -> TaskRows:
    """The task's rows, checked (not empty, the columns `kind` reads): a stream with data.streaming, else a table."""
    if cfg.streaming:
        return open_stream(cfg, kind)
    ds, skipped = load_task_data(cfg, kind)
    return TableRows(ds, data_columns(cfg, kind), cfg.shuffle, cfg.seed, skipped)


def rank_batches(rows: TaskRows, collate: Any, batch_size: int, world: int, rank: int,
                 start_step: int = 0) -> Iterator[Any]:
    """This rank's batch (None for an empty share) for every global step from `start_step` on."""
    for share in rows.steps(batch_size, world, rank, start_step):
        yield collate(share) if share else None
