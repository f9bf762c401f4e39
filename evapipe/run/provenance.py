"""What every method's state records about where it came from: task, store key, the model and the data."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.config import JobConfig
from ..data import TaskRows
from ..model.loading import model_info


def provenance(cfg: JobConfig, job: dict[str, Any], model: nn.Module, kind: str, rows: TaskRows,
               fingerprint: str | None) -> dict[str, Any]:
    """Task, store key, where the model and the data came from: what every method's state records."""
    info = model_info(model, cfg.model.name_or_path, cfg.model.revision)
    d = cfg.data
    return {
        "task": cfg.task,
        "store_key": job["key"],
        "model": info | {"dtype": cfg.model.dtype, "quantization": cfg.model.quantization, "kind": kind},
        "dataset": {
            "id": d.path, "name": d.name, "revision": d.revision, "split": d.split, "streaming": d.streaming,
            "samples": rows.samples(), "skipped_null_rows": rows.skipped,
            "fingerprint": fingerprint, "max_length": d.max_length,
        },
    }
