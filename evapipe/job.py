"""The compute job: config -> model + data -> EVA loop -> state file, on one process or many.

Launched by `python -m evapipe.compute` / `evapipe compute` (see compute.py), on every rank. Imports of torch,
transformers and the engine happen inside `run_job`, after the store lookup, so that a cache hit answers without
them (about a second instead of several).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import JobConfig
from .errors import ConfigError, DistributedError, EvapipeError
from .joblock import POLL_S

if TYPE_CHECKING:
    import torch

    from .data import TaskRows
    from .distributed import Comm
    from .driver import Driver
    from .engine import RankStats
    from .state import EvaState

log = logging.getLogger("evapipe")


@dataclass
class JobResult:
    path: Path | str | None  # a URL string for a store on object storage
    state: EvaState | None  # on rank 0, None elsewhere (and on a cache hit)
    seconds: float
    rank_stats: list[RankStats]
    cached: bool = False


def import_callable(spec: str | None, key: str) -> Any:
    """`package.module:function` -> the function, for hooks named in a config."""
    if spec is None:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"`{key}` must look like `package.module:function`, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"`{key}`: cannot import {spec!r} ({err})") from None
    if not callable(fn):
        raise ConfigError(f"`{key}`: {spec!r} is not callable")
    return fn


def setup_logging(rank: int, quiet: bool = False) -> None:
    """INFO on rank 0 (unless `quiet`), warnings and errors only (no loading progress bars) on the others."""
    logging.basicConfig(format="%(asctime)s evapipe: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if rank != 0:  # read when transformers / datasets are imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    log.setLevel(logging.INFO if rank == 0 and not quiet else logging.WARNING)


def remote_entry(cfg: JobConfig, key: str) -> str | None:
    """The store entry's URL when output.store is on object storage: the state is computed into a local work
    folder (checkpoints included), then published there (remote_store.py)."""
    from .remote import is_url, join
    from .store import state_dir, state_file

    if not (cfg.output.store and is_url(cfg.output.store)):
        return None
    return str(join(state_dir(cfg.output.store, cfg, key), state_file(cfg)))


def output_paths(cfg: JobConfig, key: str) -> list[Path]:
    """Where the state goes: the store entry (when output.store is set; a local work path for a store on object
    storage) first, then output.path."""
    from .remote import cache_root
    from .sources import json_digest
    from .store import STATE_FILE, state_dir, state_file

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
    import shutil

    from .corda_state import read_state_metadata
    from .state import atomic_write, spectrum_path
    from .store import lookup

    hit = lookup(remote or paths[0], key)
    if hit is None:
        return None
    meta = read_state_metadata(hit)
    log.info("cache hit: %s already holds this job's state (task %s, model %s, r=%s, rho=%s, computed %s); "
             "no forward pass. --force recomputes it.", hit, meta["task"], (meta.get("model") or {}).get("id"),
             meta["r"], meta.get("rho"), meta.get("created"))
    local = hit
    if remote and paths[1:]:
        from .statecache import fetch

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
    from .joblock import acquire
    from .store import job_identity, lock_path

    job = job_identity(cfg)
    paths = output_paths(cfg, job["key"])
    if not cfg.output.store:
        return Plan(job, paths), None
    remote = remote_entry(cfg, job["key"])
    if remote:
        from .remote import check_reachable

        check_reachable(str(cfg.output.store))  # one clear error naming the URL, before any weight is read
    lock = acquire(lock_path(cfg.output.store, cfg, job["key"]), f"store key {job['key']}", waiting,
                   min(POLL_S, cfg.distributed.timeout_s / 4))
    try:
        cached = None if force else cached_result(job["key"], paths, start, remote)
        if cached is not None and cfg.method == "corda":
            from .corda_job import serve_cache_hit

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
    from .store import world_size

    start = time.perf_counter()
    setup_logging(launcher_rank(), quiet)
    show_progress = show_progress and not quiet
    lock, comm = None, None
    try:
        if world_size() == 1:  # one process: a cache hit answers without importing torch
            check_inputs(cfg)
            plan, lock = plan_job(cfg, force, start)
            if plan.cached is not None:
                return plan.cached
            comm = _join(cfg, quiet)
        else:
            comm = _join(cfg, quiet)
            from .distributed import collectively

            with collectively(comm):  # a file missing on one node's rank stops every rank now, not at a timeout
                check_inputs(cfg)
            plan, lock = agreed_plan(cfg, comm, force, start)
            if plan.cached is not None:
                return plan.cached
        from .distributed import local_device

        if cfg.method == "corda":
            from .corda_job import compute_corda

            return compute_corda(cfg, comm, local_device(cfg.model.device), plan.job, plan.paths, show_progress,
                                 restart, start)
        return _compute(cfg, comm, local_device(cfg.model.device), plan.job, plan.paths, show_progress, restart, start,
                        force)
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
    from .sources import local_data_files, resolve_data_path, resolve_model_path

    resolve_model_path(cfg.model.name_or_path)
    local_data_files(resolve_data_path(cfg.data.path), cfg.data.path)
    for key in ("forward_fn", "prepare_model_inputs_fn", "prepare_layer_inputs_fn"):
        import_callable(getattr(cfg.hooks, key), f"hooks.{key}")


def _publish(local: Path, url: str, force: bool, ckpt: Path | None) -> str | None:
    """Upload a state computed for a store on object storage; keep it in the local cache (apply then needs no
    download). None: another job's state was stored first (create-if-absent), ours is discarded."""
    from . import checkpoint
    from .remote_store import publish
    from .statecache import adopt

    won = publish(local, url, create=not force)
    if ckpt is not None:
        checkpoint.remove(ckpt)
    if not won:
        log.warning("another job stored %s first while this one computed; keeping its state (this one is "
                    "discarded)", url)
        return None
    adopt(local, url)
    log.info("stored %s", url)
    return url


def _join(cfg: JobConfig, quiet: bool = False) -> Comm:
    from .distributed import init_comm, local_device

    comm = init_comm(local_device(cfg.model.device), cfg.distributed.timeout_s, cfg.distributed.backend)
    setup_logging(comm.rank, quiet)
    return comm


@dataclass
class _Loaded:
    """What a job computes on: the run around the model, the rows, and how they become batches."""

    run: Driver  # EvaRun in memory, SequentialRun with model.offload: sequential
    rows: TaskRows  # a table, or a stream with data.streaming
    collate: Any  # rows -> a batch (data.make_collator)
    kind: str
    fingerprint: str | None  # of the data read: on rank 0, taken before the work


def _load(cfg: JobConfig, comm: Comm, device: torch.device) -> _Loaded:
    from .data import make_collator, open_rows
    from .engine import EvaRun
    from .forward import UserHooks
    from .models import load_blocks, load_model, load_processor
    from .sequential import SequentialRun

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


def _provenance(cfg: JobConfig, job: dict[str, Any], loaded: _Loaded) -> dict[str, Any]:
    """The metadata a job adds to the engine's: task, store key, where the model and the data came from."""
    return provenance(cfg, job, loaded.run.source.model, loaded.kind, loaded.rows, loaded.fingerprint)


def provenance(cfg: JobConfig, job: dict[str, Any], model: torch.nn.Module, kind: str, rows: TaskRows,
               fingerprint: str | None) -> dict[str, Any]:
    """Task, store key, where the model and the data came from: what every method's state records."""
    from .models import model_info

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


def _compute(cfg: JobConfig, comm: Comm, device: torch.device, job: dict[str, Any], paths: list[Path], show_progress: bool,
             restart: bool, start: float, force: bool = False) -> JobResult:
    import torch

    from . import checkpoint
    from .data import rank_batches
    from .distributed import collectively

    ckpt = checkpoint.checkpoint_dir(paths[0])
    with collectively(comm):  # every rank stops with the first rank's error
        loaded = _load(cfg, comm, device)
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
        state = run.result(_provenance(cfg, job, loaded))
        if comm.is_main:
            for p in reversed(paths):  # the primary output last, so it is never older than a copy
                path = state.save(p)
    remote = remote_entry(cfg, job["key"])
    if remote:
        with collectively(comm):  # a failed upload stops every rank with its message
            if comm.is_main:
                path = _publish(path, remote, force, ckpt if not cfg.output.keep_checkpoint else None)
        if comm.is_main and path is None:  # another job stored this key first: the store keeps its state
            return cached_result(job["key"], paths, start, remote)
    elif comm.is_main and not cfg.output.keep_checkpoint:
        checkpoint.remove(ckpt)
    return JobResult(path, state, time.perf_counter() - start, run.rank_stats)
