"""The compute job: config -> model + data -> EVA loop -> state file, on one process or many.

    python -m evapipe.compute --config configs/default.yaml [--set eva.r=16 ...]
    accelerate launch --config_file jobs/cpu-2proc.yaml -m evapipe.compute --config configs/default.yaml
    torchrun --nproc_per_node 2 -m evapipe.compute --config configs/default.yaml
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import JobConfig
from .errors import ConfigError

log = logging.getLogger("evapipe")


@dataclass
class JobResult:
    path: Path | None
    state: Any  # EvaState on rank 0, None elsewhere
    seconds: float
    rank_stats: list[Any]
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


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings and errors only (no loading progress bars) on the others."""
    logging.basicConfig(format="%(asctime)s evapipe: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if rank != 0:  # read when transformers / datasets are imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def output_paths(cfg: JobConfig, key: str) -> list[Path]:
    """Where the state goes: the store entry (when output.store is set) first, then output.path."""
    from .store import STATE_FILE, state_dir

    paths = [state_dir(cfg.output.store, cfg, key) / STATE_FILE] if cfg.output.store else []
    if cfg.output.path and Path(cfg.output.path).resolve() not in [p.resolve() for p in paths]:
        paths.append(Path(cfg.output.path))
    return paths


def cached_result(key: str, paths: list[Path], start: float) -> JobResult | None:
    """A store hit for this job (copied to output.path too), or None. Reads file headers only: no torch import."""
    import shutil

    from .state import atomic_write, read_metadata, spectrum_path
    from .store import lookup

    hit = lookup(paths[0], key)
    if hit is None:
        return None
    meta = read_metadata(hit)
    log.info("cache hit: %s already holds this job's state (task %s, model %s, r=%s, rho=%s, computed %s); "
             "no forward pass. --force recomputes it.", hit, meta["task"], (meta.get("model") or {}).get("id"),
             meta["r"], meta.get("rho"), meta.get("created"))
    for extra in paths[1:]:
        for src, dst in ((spectrum_path(hit), spectrum_path(extra)), (hit, extra)):
            if src.is_file():
                atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
        log.info("copied it to %s", extra)
    return JobResult(hit, None, time.perf_counter() - start, [], cached=True)


def run_job(cfg: JobConfig, show_progress: bool = True, force: bool = False, restart: bool = False) -> JobResult:
    """Run a validated job config; rank 0 writes the state file and returns it.

    With output.store, a state already stored for the same job is returned at once (JobResult.cached, .state None:
    load_state(result.path)) unless `force`. A checkpoint beside the output (output.checkpoint_every) is resumed
    from; one of another config or world size is refused unless `restart` discards it.
    """
    from .store import job_identity

    start = time.perf_counter()
    setup_logging(int(os.environ.get("RANK", "0")))
    job = job_identity(cfg)
    paths = output_paths(cfg, job["key"])
    if cfg.output.store and not force:
        cached = cached_result(job["key"], paths, start)
        if cached is not None:
            return cached

    import torch

    from . import checkpoint
    from .data import data_columns, dataset_fingerprint, load_rows, make_collator, rank_batches
    from .distributed import init_comm, local_device
    from .engine import EvaRun
    from .models import load_blocks, load_model, load_processor, model_info
    from .report import job_summary
    from .sequential import SequentialRun

    device = local_device(cfg.model.device)
    comm = init_comm(device, cfg.distributed.timeout_s, cfg.distributed.backend)
    setup_logging(comm.rank)
    ckpt = checkpoint.checkpoint_dir(paths[0])
    try:
        error, run, ds, model = None, None, None, None
        try:
            hooks = cfg.hooks
            forward_fn = import_callable(hooks.forward_fn, "hooks.forward_fn")
            model_fn = import_callable(hooks.prepare_model_inputs_fn, "hooks.prepare_model_inputs_fn")
            layer_fn = import_callable(hooks.prepare_layer_inputs_fn, "hooks.prepare_layer_inputs_fn")
            log.info("loading %s on %s (world size %d)", cfg.model.name_or_path, device, comm.world)
            if cfg.model.offload == "sequential":
                blocks, kind = load_blocks(cfg.model, device)
                model = blocks.model
                run = SequentialRun(blocks, cfg.eva, comm, forward_fn, model_fn, layer_fn, cfg.model.sequential_round)
            else:
                model, kind = load_model(cfg.model, device)
                run = EvaRun(model, cfg.eva, comm, forward_fn, model_fn, layer_fn)
            processor = load_processor(cfg.model, kind)
            ds = load_rows(cfg.data, kind)
            collate = make_collator(processor, cfg.data, kind)
        except Exception as err:  # every rank stops with the first rank's error
            error = err
        comm.agree(error)
        log.info("%d samples, %d target layers, rank budget %d", len(ds), len(run.names), run.budget)
        start_step = checkpoint.resume(ckpt, run, comm, job, restart) or 0
        batches = (batch for _, batch in rank_batches(ds, collate, cfg.data, comm.world, comm.rank, start_step))
        every, max_batches = cfg.output.checkpoint_every, cfg.eva.max_batches

        def on_step(r: EvaRun) -> None:
            step = r.progress.step
            if every and step % every == 0 and not all(r.done.values()) and (max_batches is None or step < max_batches):
                checkpoint.save(ckpt, r.snapshot(), comm, job)

        with torch.no_grad():
            run.run(batches, show_progress=show_progress, on_step=on_step)
        extra = {
            "task": cfg.task,
            "store_key": job["key"],
            "model": model_info(model, cfg.model.name_or_path, cfg.model.revision)
            | {"dtype": cfg.model.dtype, "quantization": cfg.model.quantization, "kind": kind},
            "dataset": {
                "id": cfg.data.path, "name": cfg.data.name, "split": cfg.data.split, "samples": len(ds),
                "fingerprint": dataset_fingerprint(ds, data_columns(cfg.data, kind)), "max_length": cfg.data.max_length,
            },
        }
        state, path, error = None, None, None
        try:
            state = run.result(extra)
            if comm.is_main:
                for p in reversed(paths):  # the primary output last, so it is never older than a copy
                    path = state.save(p)
        except Exception as err:  # e.g. rank 0 cannot write: every rank exits non-zero with its message
            error = err
        comm.agree(error)
        if comm.is_main:
            if not cfg.output.keep_checkpoint:
                checkpoint.remove(ckpt)
            seconds = time.perf_counter() - start
            print(job_summary(state, run.rank_stats, seconds, path), file=sys.stderr)
        return JobResult(path, state, time.perf_counter() - start, getattr(run, "rank_stats", []))
    finally:
        comm.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m evapipe.compute` (and `accelerate launch -m evapipe.compute`)."""
    from .cli import compute_command

    compute_command.main(args=argv, prog_name="python -m evapipe.compute")


if __name__ == "__main__":
    main()
