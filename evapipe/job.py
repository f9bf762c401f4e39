"""The compute job, its torch-free half: config -> store key -> lock -> cache hit, or the work (run/execute.py).

Launched by `python -m evapipe.compute` / `evapipe compute` (see compute.py), on every rank. Everything here reads
configs and file headers only, so a cache hit answers without torch, transformers or the drivers (about a second
instead of several); run_job imports run/execute.py once there is work to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.config import JobConfig, import_callable
from .core.errors import DistributedError, EvapipeError
from .core.remote import cache_root, check_reachable
from .core.sources import json_digest, local_data_files, resolve_data_path, resolve_model_path
from .run.result import JobResult
from .states.corda_state import read_state_metadata, serve_cache_hit
from .states.joblock import POLL_S, acquire
from .states.state import atomic_write, spectrum_path
from .states.statecache import fetch
from .states.store import (
    STATE_FILE,
    job_identity,
    lock_path,
    lookup,
    remote_entry,
    state_dir,
    state_file,
    world_size,
)

if TYPE_CHECKING:

    from .core.distributed import Comm

log = logging.getLogger("evapipe")


def setup_logging(rank: int, quiet: bool = False) -> None:
    """INFO on rank 0 (unless `quiet`), warnings and errors only (no loading progress bars) on the others."""
    logging.basicConfig(format="%(asctime)s evapipe: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if rank != 0:  # read when transformers / datasets are imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    log.setLevel(logging.INFO if rank == 0 and not quiet else logging.WARNING)


def output_paths(cfg: JobConfig, key: str) -> list[Path]:
    """Where the state goes: the store entry (when output.store is set; a local work path for a store on object
    storage) first, then output.path."""
    remote = remote_entry(cfg, key)
    if remote:
        paths = [cache_root() / "work" / json_digest(remote, 16) / state_file(cfg)]
    else:
        paths = [state_dir(cfg.output.store, cfg, key) / state_file(cfg)] if cfg.output.store else []
    path = cfg.output.path
    if path == STATE_FILE and cfg.method != "eva":  # the default output.path names EVA's file
        path = state_file(cfg)
    if path and Path(path).resolve() not in [p.resolve() for p in paths]:
        paths.append(Path(path))
    return paths


def cached_result(key: str, paths: list[Path], start: float, remote: str | None = None) -> JobResult | None:
    """A store hit for this job (copied to output.path too), or None. Reads file headers only: no torch import
    (and, for a store on object storage, no download unless output.path wants a copy)."""
    hit = lookup(remote or paths[0], key)
    if hit is None:
        return None
    meta = read_state_metadata(hit)
    log.info("cache hit: %s already holds this job's state (task %s, model %s, r=%s, rho=%s, computed %s); "
             "no forward pass. --force recomputes it.", hit, meta["task"], (meta.get("model") or {}).get("id"),
             meta["r"], meta.get("rho"), meta.get("created"))
    local = hit
    if remote and paths[1:]:

        local = fetch(remote)
    for extra in paths[1:]:
        for src, dst in ((spectrum_path(local), spectrum_path(extra)), (local, extra)):
            if src.is_file():
                atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
        log.info("copied it to %s", extra)
    return JobResult(hit, None, time.perf_counter() - start, [], cached=True)


@dataclass
class Plan:
    """What rank 0 decided before the work, and every rank follows: the job's key, where the state goes, whether
    it is a cache hit. Node-local copies of a model can hash differently on other ranks, so only rank 0's counts."""

    job: dict[str, Any]
    paths: list[Path]
    cached: JobResult | None = None


def plan_job(cfg: JobConfig, force: bool, start: float, waiting: Callable[[], None] = lambda: None) -> tuple[Plan, Any]:
    """Rank 0's plan, and the store entry's lock it now holds (None without a store): the lock is taken before the
    cache lookup, so a second run of a job still computing waits for it and then takes its state."""
    job = job_identity(cfg)
    paths = output_paths(cfg, job["key"])
    if not cfg.output.store:
        return Plan(job, paths), None
    remote = remote_entry(cfg, job["key"])
    if remote:

        check_reachable(str(cfg.output.store))  # one clear error naming the URL, before any weight is read
    lock = acquire(lock_path(cfg.output.store, cfg, job["key"]), f"store key {job['key']}", waiting,
                   min(POLL_S, cfg.distributed.timeout_s / 4))
    try:
        cached = None if force else cached_result(job["key"], paths, start, remote)
        if cached is not None and cfg.method == "corda":
            serve_cache_hit(cfg, cached.path)
        return Plan(job, paths, cached), lock
    except BaseException:
        lock.release()
        raise


def agreed_plan(cfg: JobConfig, comm: Comm, force: bool, start: float) -> tuple[Plan, Any]:
    """plan_job on rank 0, broadcast to every rank; while rank 0 waits for the store lock it broadcasts "wait"
    every few seconds, so the others never sit in one collective for longer than distributed.timeout_s."""
    if not comm.is_main:
        while True:
            message = comm.broadcast(None)
            if message[0] == "error":
                raise message[1]
            if message[0] == "plan":
                return message[1], None
    try:
        plan, lock = plan_job(cfg, force, start, waiting=lambda: comm.broadcast(("wait",)))
    except Exception as err:
        comm.broadcast(("error", err if isinstance(err, EvapipeError) else DistributedError(f"rank 0: {err}")))
        raise
    comm.broadcast(("plan", plan))
    return plan, lock


def run_job(cfg: JobConfig, show_progress: bool = True, force: bool = False, restart: bool = False,
            quiet: bool = False) -> JobResult:
    """Run a validated job config; rank 0 writes the state file and returns it (report.job_summary / job_record
    describe the result; `evapipe compute` prints them). `quiet`: warnings and errors only, no progress bar.

    With output.store, a state already stored for the same job is returned at once (JobResult.cached, .state None:
    load_state(result.path)) unless `force`; a job with the same key running elsewhere is waited for first. A
    checkpoint beside the output (output.checkpoint_every) is resumed from; one of another config or world size is
    refused unless `restart` discards it.
    """
    start = time.perf_counter()
    setup_logging(launcher_rank(), quiet)
    lock, comm, plan = None, None, None
    try:
        if world_size() == 1:  # one process: a cache hit answers without importing torch
            check_inputs(cfg)
            plan, lock = plan_job(cfg, force, start)
            if plan.cached is not None:
                return plan.cached
        from .run import execute  # torch, transformers and the drivers: only now that there is work to do

        comm = execute.join(cfg)
        setup_logging(comm.rank, quiet)
        if plan is None:  # several processes: rank 0 plans, every rank follows
            execute.on_every_rank(comm, lambda: check_inputs(cfg))  # a file missing on one node stops all now
            plan, lock = agreed_plan(cfg, comm, force, start)
            if plan.cached is not None:
                return plan.cached
        key = plan.job["key"]
        return execute.compute(cfg, comm, plan.job, plan.paths, show_progress and not quiet, restart, start, force,
                               lambda: cached_result(key, plan.paths, start, remote_entry(cfg, key)))
    finally:
        if lock is not None:
            lock.release()
        if comm is not None:
            comm.close()


def launcher_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate) set it: the process group's, before it exists."""
    return int(os.environ.get("RANK", "0"))


def check_inputs(cfg: JobConfig) -> None:
    """Every file the config names exists (model folder, data files, with data.streaming too) and every hook
    imports, before any weight is read: a typo costs a second, not a model load. Torch-free."""
    resolve_model_path(cfg.model.name_or_path)
    local_data_files(resolve_data_path(cfg.data.path), cfg.data.path)
    for key in ("forward_fn", "prepare_model_inputs_fn", "prepare_layer_inputs_fn"):
        import_callable(getattr(cfg.hooks, key), f"hooks.{key}")
