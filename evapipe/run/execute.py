"""The heavy half of the compute job: join the process group, load the model and the data, run a driver, write the
state (and publish it to a store on object storage). job.py decides first, without torch, whether there is work.

    join        the process group (gloo on CPU, NCCL on GPU), on every rank
    load        the model whole (EvaRun) or block by block (SequentialRun), the rows and their collator
    compute     resume from a checkpoint, run the driver over this rank's batches, write the state on rank 0
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import JobConfig, import_callable
from ..core.distributed import Comm, collectively, init_comm, local_device
from ..data import TaskRows, make_collator, open_rows, rank_batches
from ..model.forward import UserHooks
from ..model.loading import load_blocks, load_model, load_processor
from ..states import checkpoint, remote_store
from ..states.statecache import adopt
from ..states.store import remote_entry
from .corda_job import compute_corda
from .driver import Driver
from .engine import EvaRun
from .provenance import provenance
from .result import JobResult
from .sequential import SequentialRun

log = logging.getLogger("evapipe")


def publish_state(local: Path, url: str, force: bool, ckpt: Path | None) -> str | None:
    """Upload a state computed for a store on object storage; keep it in the local cache (apply then needs no
    download). None: another job's state was stored first (create-if-absent), ours is discarded."""
    won = remote_store.publish(local, url, create=not force)
    if ckpt is not None:
        checkpoint.remove(ckpt)
    if not won:
        log.warning("another job stored %s first while this one computed; keeping its state (this one is "
                    "discarded)", url)
        return None
    adopt(local, url)
    log.info("stored %s", url)
    return url


def join(cfg: JobConfig) -> Comm:
    """This process in the job's process group (one process: a group of one)."""
    return init_comm(local_device(cfg.model.device), cfg.distributed.timeout_s, cfg.distributed.backend)


@dataclass
class _Loaded:
    """What a job computes on: the run around the model, the rows, and how they become batches."""

    run: Driver  # EvaRun in memory, SequentialRun with model.offload: sequential
    rows: TaskRows  # a table, or a stream with data.streaming
    collate: Any  # rows -> a batch (data.make_collator)
    kind: str
    fingerprint: str | None  # of the data read: on rank 0, taken before the work


def load(cfg: JobConfig, comm: Comm, device: torch.device) -> _Loaded:
    hooks = UserHooks(import_callable(cfg.hooks.forward_fn, "hooks.forward_fn"),
                      import_callable(cfg.hooks.prepare_model_inputs_fn, "hooks.prepare_model_inputs_fn"),
                      import_callable(cfg.hooks.prepare_layer_inputs_fn, "hooks.prepare_layer_inputs_fn"))
    log.info("loading %s on %s (world size %d)", cfg.model.name_or_path, device, comm.world)
    if cfg.model.offload == "sequential":
        blocks, kind = load_blocks(cfg.model, device)
        run = SequentialRun(blocks, cfg.eva, comm, hooks, cfg.model.sequential_round)
    else:
        model, kind = load_model(cfg.model, device)
        run = EvaRun(model, cfg.eva, comm, hooks)
    processor = load_processor(cfg.model, kind)
    rows = open_rows(cfg.data, kind)
    # once, before the work, in bounded memory: a failure here costs nothing computed yet
    fingerprint = rows.fingerprint() if comm.is_main else None
    return _Loaded(run, rows, make_collator(processor, cfg.data, kind), kind, fingerprint)


def job_provenance(cfg: JobConfig, job: dict[str, Any], loaded: _Loaded) -> dict[str, Any]:
    """The metadata a job adds to the engine's: task, store key, where the model and the data came from."""
    return provenance(cfg, job, loaded.run.source.model, loaded.kind, loaded.rows, loaded.fingerprint)


def compute(cfg: JobConfig, comm: Comm, job: dict[str, Any], paths: list[Path], show_progress: bool, restart: bool,
            start: float, force: bool, cache_hit: Callable[[], JobResult | None]) -> JobResult | None:
    """Run the job on every rank; rank 0 writes the state. `cache_hit` answers when another job stored this key
    on object storage first (its state is kept, ours discarded)."""
    device = local_device(cfg.model.device)
    if cfg.method == "corda":
        return compute_corda(cfg, comm, device, job, paths, show_progress, restart, start)
    ckpt = checkpoint.checkpoint_dir(paths[0])
    with collectively(comm):  # every rank stops with the first rank's error
        loaded = load(cfg, comm, device)
    run = loaded.run
    samples = loaded.rows.samples()
    log.info("%s samples, %d target layers, rank budget %d", "streamed" if samples is None else samples,
             len(run.names), run.budget)
    snapshot = checkpoint.resume(ckpt, comm, job, restart)
    with collectively(comm):  # a checkpoint that cannot be restored on one rank stops every rank
        if snapshot is not None:
            run.restore(snapshot)
    global_batch = cfg.data.batch_size * comm.world
    batches = rank_batches(loaded.rows, loaded.collate, cfg.data.batch_size, comm.world, comm.rank, run.progress.step)
    every, max_batches = cfg.output.checkpoint_every, cfg.eva.max_batches

    def on_step(r: Driver) -> None:
        step = r.progress.step
        if every and step % every == 0 and not r.done and (max_batches is None or step < max_batches):
            checkpoint.save(ckpt, r.snapshot(), comm, job)

    with torch.no_grad():
        run.run(batches, show_progress=show_progress, on_step=on_step,
                pass_steps=lambda: loaded.rows.pass_steps(global_batch))
    state, path = None, None
    with collectively(comm):  # e.g. rank 0 cannot write: every rank exits non-zero with its message
        state = run.result(job_provenance(cfg, job, loaded))
        if comm.is_main:
            for p in reversed(paths):  # the primary output last, so it is never older than a copy
                path = state.save(p)
    remote = remote_entry(cfg, job["key"])
    if remote:
        with collectively(comm):  # a failed upload stops every rank with its message
            if comm.is_main:
                path = publish_state(path, remote, force, ckpt if not cfg.output.keep_checkpoint else None)
        if comm.is_main and path is None:  # another job stored this key first: the store keeps its state
            return cache_hit()
    elif comm.is_main and not cfg.output.keep_checkpoint:
        checkpoint.remove(ckpt)
    return JobResult(path, state, time.perf_counter() - start, run.rank_stats)


def on_every_rank(comm: Comm, check: Callable[[], None]) -> None:
    """Run `check` on every rank, agreed: a failure on one rank stops all of them with its message."""
    with collectively(comm):
        check()
