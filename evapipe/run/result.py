"""What a job returns, on every rank: torch-free, so the cache-hit path of the job can build one too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..states.state import EvaState
    from .runcore import RankStats


@dataclass
class JobResult:
    """The state a job wrote (or found in the store), and what each rank did for it."""

    path: Path | str | None  # a URL string for a store on object storage
    state: EvaState | None  # on rank 0, None elsewhere (and on a cache hit)
    seconds: float
    rank_stats: list[RankStats]
    cached: bool = False
