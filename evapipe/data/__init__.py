"""Task data: where it comes from, rows read as a table or a stream, each rank's share of every step, and
the collation that turns rows into model inputs with labels.

`open_rows(cfg.data, kind)`, `make_collator(processor, cfg.data, kind)` and `rank_batches(...)` are what a
training script needs to read the same batches as an EVA job (see examples/).
"""

from .collate import make_collator
from .rows import TaskRows, open_rows, rank_batches

__all__ = ["TaskRows", "make_collator", "open_rows", "rank_batches"]
