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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.distributed import Comm, collectively
from ..core.errors import ConfigError
from ..eva.ipca import PCAState
from ..eva.planning import Verdict
from ..model.layout import Layout
from .metadata import utc_now
from .state import atomic_write, writing
from .store import changed_keys

log = logging.getLogger("evapipe")

CKPT_FORMAT = "evapipe.checkpoint"
CKPT_VERSION = 1
STEP_PREFIX = "step-"


@dataclass
class Snapshot:
    """A run at the end of a step: the loop state every rank shares, and this rank's own PCAs (on the CPU)."""

    step: int
    tokens: int
    layout: Layout
    ranks: dict[str, int]
    verdict: Verdict
    ratios: dict[str, list[float]]  # the latest agreed ratios and similarities, per PCA (owner layer)
    similar: dict[str, list[float]]
    states: dict[str, PCAState] = field(default_factory=dict)
    state_cls = PCAState  # what a rank's states are read back as (another method's snapshot names its own)

    def loop(self) -> dict[str, Any]:
        """The shared part as JSON (a step's attributes; the layout of CKPT_VERSION 1)."""
        groups, order = [list(g) for g in self.layout.groups], list(self.layout.order)
        progress = {"step": self.step, "tokens": self.tokens, "groups": groups, "order": order, "ranks": self.ranks}
        return {"progress": progress, "done": dict(self.verdict.done), "done_at": dict(self.verdict.done_at),
                "ratios": self.ratios, "similar": self.similar}

    @classmethod
    def from_loop(cls, loop: dict[str, Any], states: dict[str, PCAState]) -> Snapshot:
        p = loop["progress"]
        return cls(p["step"], p["tokens"], Layout.of(p["groups"], p["order"]), dict(p["ranks"]),
                   Verdict(dict(loop["done"]), dict(loop.get("done_at", {}))), loop["ratios"], loop["similar"], states)


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


def _write_states(group_dir: Path, states: dict[str, PCAState]) -> None:
    import zarr  # zarr (and numpy below) only when a checkpoint is written or read, not for every EvaRun

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


def _read_states(group_dir: Path, state_cls: type = PCAState) -> dict[str, Any]:
    import numpy as np
    import zarr

    group = zarr.open_group(str(group_dir), mode="r")
    states = {}
    for name in sorted(group.group_keys()):
        sub = group[name]
        attrs = dict(sub.attrs)
        kwargs = dict(attrs["fields"])
        for t, dtype in attrs["tensors"].items():
            kwargs[t] = torch.from_numpy(np.asarray(sub[t][...])).to(getattr(torch, dtype))  # 0-d reads as a scalar
        states[attrs["owner"]] = state_cls(**kwargs)
    return states


def save(directory: str | Path, snapshot: Snapshot, comm: Comm, job: dict[str, Any]) -> Path:
    """Checkpoint one step (called on every rank at the same step); returns the step's folder."""
    directory = Path(directory)
    step_dir = directory / f"{STEP_PREFIX}{snapshot.step:08d}"
    with collectively(comm), writing(step_dir):  # e.g. a full disk on one rank: every rank stops with it
        _write_states(step_dir / f"rank-{comm.rank}", snapshot.states)
    with collectively(comm), writing(step_dir / "zarr.json"):  # the others wait here, not in the next step
        if comm.is_main:
            _mark_complete(directory, step_dir, snapshot, comm.world, job)
    return step_dir


def _mark_complete(directory: Path, step_dir: Path, snapshot: Snapshot, world: int, job: dict[str, Any]) -> None:
    """Rank 0, once every rank's PCAs are written: the step's metadata (the completion mark), then pruning."""
    import zarr

    if not (directory / "zarr.json").is_file():
        zarr.create_group(store=str(directory), attributes={"format": CKPT_FORMAT})
    attrs = {
        "format": CKPT_FORMAT, "version": CKPT_VERSION, "complete": True, "world_size": world,
        "job": job, "written": utc_now(), "loop": snapshot.loop(),
    }
    # the completion mark: the step's zarr v3 group metadata, written last and atomically
    group_meta = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    atomic_write(step_dir / "zarr.json", lambda tmp: Path(tmp).write_text(group_meta))
    _prune(directory, keep=step_dir)


def _prune(directory: Path, keep: Path) -> None:
    for old in directory.iterdir():
        if old.name.startswith(STEP_PREFIX) and old != keep:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Decision:
    """Rank 0's verdict on an existing checkpoint, broadcast to every rank."""

    action: Literal["resume", "fresh", "refuse"]
    note: str | None = None  # why (fresh: logged; refuse: the error)
    step_dir: str | None = None  # resume: the step to resume
    loop: dict[str, Any] | None = None  # resume: its loop state


def _decide(directory: Path, job: dict[str, Any], world: int, restart: bool) -> Decision:
    if not directory.exists():
        return Decision("fresh")
    if restart:
        return Decision("fresh", f"discarding the checkpoint {directory} (--restart)")
    found = latest(directory)
    if found is None:
        return Decision("fresh", f"{directory} holds no complete checkpoint; starting fresh")
    step_dir, attrs = found
    step = attrs["loop"]["progress"]["step"]
    where = f"the checkpoint {directory} (at batch {step})"
    if attrs.get("world_size") != world:
        return Decision("refuse", f"{where} was written by a job with world size {attrs.get('world_size')}, this job "
                                  f"has world size {world}; run it with {attrs.get('world_size')} processes to resume, "
                                  "or rerun with --restart to discard it and start fresh")
    old = attrs.get("job") or {}
    if old.get("key") != job["key"]:
        changes = changed_keys(old.get("parts") or {}, job["parts"]) or ["unknown"]
        return Decision("refuse", f"{where} was written for a different job ({'; '.join(changes[:5])}); rerun with "
                                  "--restart to discard it and start fresh")
    return Decision("resume", step_dir=str(step_dir), loop=attrs["loop"])


def _decide_safely(directory: Path, job: dict[str, Any], world: int, restart: bool) -> Decision:
    """_decide, with a malformed mark refused on every rank (broadcast) instead of raised on rank 0 alone."""
    try:
        return _decide(directory, job, world, restart)
    except Exception as err:
        return Decision("refuse", f"the checkpoint {directory} is malformed ({err!r}); rerun with --restart to "
                                  "discard it and start fresh")


def resume(directory: str | Path, comm: Comm, job: dict[str, Any], restart: bool = False,
           kind: type = Snapshot) -> Any:
    """The newest complete checkpoint in `directory`, on every rank (this rank's states in it), or None when
    starting fresh. A checkpoint of another job or world size raises ConfigError unless `restart` discards it.
    `kind`: the snapshot class (its `from_loop` and `state_cls`): EVA's Snapshot, or another method's."""
    directory = Path(directory)
    decision: Decision = comm.broadcast(_decide_safely(directory, job, comm.world, restart) if comm.is_main else None)
    if decision.action == "refuse":
        raise ConfigError(decision.note)
    if decision.action == "fresh":
        if comm.is_main and directory.exists():
            log.info(decision.note)
            remove(directory)
        return None
    step_dir = Path(decision.step_dir)
    if comm.is_main:  # steps of the killed run past this one (incomplete) must not meet the new ones
        _prune(directory, keep=step_dir)
    states = {}
    with collectively(comm):
        try:
            states = _read_states(step_dir / f"rank-{comm.rank}", kind.state_cls)
        except Exception as err:
            raise ConfigError(f"the checkpoint {step_dir} cannot be read ({err}); rerun with --restart to "
                              "discard it") from None
    snapshot = kind.from_loop(decision.loop, states)
    log.info("resuming from %s at batch %d", directory, snapshot.step)
    return snapshot


def remove(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
