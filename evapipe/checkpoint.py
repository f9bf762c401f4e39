"""Checkpoints of a running EVA job (zarr), so a job killed at any moment resumes where it was.

Beside the output `X.safetensors` lives `X.ckpt.zarr`, one group per checkpointed step:

    X.ckpt.zarr/step-00000012/rank-0/pca-000/{mean,var,components,singular_values,similarity}  (+ attrs)
                             /rank-1/...                     each rank writes the PCAs it owns
                             zarr.json                       rank 0, last: loop state, job key, world size

Every rank writes its own PCAs; once all have (an agreement), rank 0 writes the step's group metadata (loop state,
`complete: true`) atomically, then removes older steps. A step killed before that has no metadata and is ignored,
so the previous complete step is used; resuming removes every other step. The data position is the step: `rank_batches(start_step=N)`
replays the same stream from there, and the PCAs' random directions are seeded by (layer, step), so a resumed job
computes what an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .state import atomic_write, writing

log = logging.getLogger("evapipe")

CKPT_FORMAT = "evapipe.checkpoint"
CKPT_VERSION = 1
STEP_PREFIX = "step-"
LOOP_KEYS = ("progress", "done", "done_at", "ratios", "similar")


def checkpoint_dir(output: str | Path) -> Path:
    """Where the checkpoint of a job writing `output` goes: `X.safetensors` -> `X.ckpt.zarr`."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + ".ckpt.zarr")


def _step_attrs(step_dir: Path) -> dict[str, Any] | None:
    """A step group's attributes if rank 0 marked it complete, else None (killed mid-write, or not ours)."""
    try:
        attrs = json.loads((step_dir / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return None
    ok = attrs.get("format") == CKPT_FORMAT and attrs.get("version") == CKPT_VERSION and attrs.get("complete") is True
    return attrs if ok else None


def latest(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete step of a checkpoint and its attributes."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = sorted((p for p in directory.iterdir() if p.name.startswith(STEP_PREFIX)), reverse=True)
    for step_dir in steps:
        attrs = _step_attrs(step_dir)
        if attrs is not None:
            return step_dir, attrs
    return None


def _write_states(group_dir: Path, states: dict[str, Any]) -> None:
    import torch
    import zarr

    group = zarr.open_group(str(group_dir), mode="w")
    for i, (owner, state) in enumerate(states.items()):
        sub = group.create_group(f"pca-{i:03d}")
        plain, dtypes = {}, {}
        for f in fields(state):
            if not f.init:
                continue
            value = getattr(state, f.name)
            if isinstance(value, torch.Tensor):
                dtypes[f.name] = str(value.dtype).removeprefix("torch.")
                data = value.detach().cpu()
                data = (data.float() if data.dtype == torch.bfloat16 else data).numpy()
                sub.create_array(f.name, data=data, compressors=None)  # float noise: compression gains nothing
            else:
                plain[f.name] = value
        sub.attrs.update({"owner": owner, "fields": plain, "tensors": dtypes})


def _read_states(group_dir: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    import zarr

    from .ipca import PCAState

    group = zarr.open_group(str(group_dir), mode="r")
    states = {}
    for name in sorted(group.group_keys()):
        sub = group[name]
        attrs = dict(sub.attrs)
        kwargs = dict(attrs["fields"])
        for t, dtype in attrs["tensors"].items():
            kwargs[t] = torch.from_numpy(np.asarray(sub[t][...])).to(getattr(torch, dtype))  # 0-d reads as a scalar
        states[attrs["owner"]] = PCAState(**kwargs)
    return states


def save(directory: str | Path, snapshot: dict[str, Any], comm: Any, job: dict[str, Any]) -> Path:
    """Checkpoint one step (called on every rank at the same step); returns the step's folder."""
    directory = Path(directory)
    step_dir = directory / f"{STEP_PREFIX}{snapshot['progress']['step']:08d}"
    error = None
    try:
        with writing(step_dir):
            _write_states(step_dir / f"rank-{comm.rank}", snapshot["states"])
    except Exception as err:  # e.g. a full disk: every rank stops with it
        error = err
    comm.agree(error)
    try:  # rank 0 alone marks the step; the others wait in the agreement below, not in the next step's
        if comm.is_main:
            with writing(step_dir / "zarr.json"):
                _mark_complete(directory, step_dir, snapshot, comm.world, job)
    except Exception as err:
        error = err
    comm.agree(error)
    return step_dir


def _mark_complete(directory: Path, step_dir: Path, snapshot: dict[str, Any], world: int, job: dict[str, Any]) -> None:
    """Rank 0, once every rank's PCAs are written: the step's metadata (the completion mark), then pruning."""
    import zarr

    if not (directory / "zarr.json").is_file():
        zarr.create_group(store=str(directory), attributes={"format": CKPT_FORMAT})
    attrs = {
        "format": CKPT_FORMAT, "version": CKPT_VERSION, "complete": True, "world_size": world,
        "job": job, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loop": {k: snapshot[k] for k in LOOP_KEYS},
    }
    # the completion mark: the step's zarr v3 group metadata, written last and atomically
    group_meta = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    atomic_write(step_dir / "zarr.json", lambda tmp: Path(tmp).write_text(group_meta))
    _prune(directory, keep=step_dir)


def _prune(directory: Path, keep: Path) -> None:
    for old in directory.iterdir():
        if old.name.startswith(STEP_PREFIX) and old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _decide(directory: Path, job: dict[str, Any], world: int, restart: bool) -> tuple:
    """Rank 0's verdict on an existing checkpoint: ("resume", step folder, loop) / ("fresh", note) / ("refuse", why)."""
    if not directory.exists():
        return ("fresh", None)
    if restart:
        return ("fresh", f"discarding the checkpoint {directory} (--restart)")
    found = latest(directory)
    if found is None:
        return ("fresh", f"{directory} holds no complete checkpoint; starting fresh")
    step_dir, attrs = found
    step = attrs["loop"]["progress"]["step"]
    where = f"the checkpoint {directory} (at batch {step})"
    if attrs.get("world_size") != world:
        return ("refuse", f"{where} was written by a job with world size {attrs.get('world_size')}, this job has "
                          f"world size {world}; run it with {attrs.get('world_size')} processes to resume, or rerun "
                          "with --restart to discard it and start fresh")
    old = attrs.get("job") or {}
    if old.get("key") != job["key"]:
        from .store import changed_keys

        changes = changed_keys(old.get("parts") or {}, job["parts"]) or ["unknown"]
        return ("refuse", f"{where} was written for a different job ({'; '.join(changes[:5])}); rerun with "
                          "--restart to discard it and start fresh")
    return ("resume", str(step_dir), attrs["loop"])


def resume(directory: str | Path, run: Any, comm: Any, job: dict[str, Any], restart: bool = False) -> int | None:
    """Restore `run` (on every rank) from the newest complete checkpoint in `directory`; its step, or None when
    starting fresh. A checkpoint of another job or world size raises ConfigError unless `restart` discards it."""
    directory = Path(directory)
    verdict = None
    if comm.is_main:
        try:
            verdict = _decide(directory, job, comm.world, restart)
        except Exception as err:  # a malformed mark: refused on every rank, not raised on rank 0 alone
            verdict = ("refuse", f"the checkpoint {directory} is malformed ({err!r}); rerun with --restart to "
                                 "discard it and start fresh")
    verdict = comm.broadcast(verdict)
    if verdict[0] == "refuse":
        raise ConfigError(verdict[1])
    if verdict[0] == "fresh":
        if comm.is_main and directory.exists():
            log.info(verdict[1])
            remove(directory)
        return None
    step_dir, loop = Path(verdict[1]), verdict[2]
    if comm.is_main:  # steps of the killed run past this one (incomplete) must not meet the new ones
        _prune(directory, keep=step_dir)
    error = None
    try:
        run.restore(dict(loop, states=_read_states(step_dir / f"rank-{comm.rank}")))
    except Exception as err:
        error = ConfigError(f"the checkpoint {step_dir} cannot be read ({err!r}); rerun with --restart to discard it")
    comm.agree(error)
    log.info("resuming from %s at batch %d", directory, run.progress.step)
    return run.progress.step


def remove(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
