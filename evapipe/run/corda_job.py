"""The CorDA job (`method: corda`), on one process or many: one pass over the data, then the decomposition.

    load        the model whole on every rank (as an EVA job without offload), the rows, the collator
    every step  rows = inputs.forward(batch)   corda_stats.SampleInputs: capture.py's hooks, per-sample normalised
                sums.add(rows, samples)        corda_stats.CovarianceSums: rows to each group's owner, counts summed
                (checkpoint every output.checkpoint_every steps: the owners' sums, the counts, the step)
    pass end    every owner divides its sums by their samples and decomposes its groups' layers on its device
                (corda_decompose); the cropped triplets go to rank 0, which writes the state (corda_state) and
                PEFT's cache_file; every owner writes its covariances for PEFT's covariance_file, joined by rank 0

It is a second method over the parts EVA's job uses (job.py's plan, store and lock; data.py's steps; capture.py's
hooks; distributed.py's owners, routes and agreements; checkpoint.py), not a copy of EVA's loop: CorDA reads each
sample once, so it has no convergence, no planning and no rank budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..corda.decompose import Eigens, decompose_owned
from ..corda.stats import CordaSnapshot, CovarianceSums, SampleInputs
from ..core.config import JobConfig, import_callable
from ..core.distributed import Comm, collectively
from ..data import TaskRows, make_collator, open_rows, rank_batches
from ..model.layout import Layout
from ..model.loading import load_blocks, load_model, load_processor
from ..model.onload import BlockModel
from ..model.targets import resolve_targets
from ..states import checkpoint
from ..states.corda_state import CordaMeta, CordaState, write_cache_file
from ..states.metadata import versions
from ..states.state import atomic_write
from .corda_sequential import BlockDriver, step_groups
from .provenance import provenance
from .result import JobResult

log = logging.getLogger("evapipe")


@dataclass
class CordaRankStats:
    """What one process did (the end-of-job summary)."""

    rank: int
    forward_s: float = 0.0
    add_s: float = 0.0
    comm_s: float = 0.0
    decompose_s: float = 0.0
    owned: list[str] = field(default_factory=list)


def pass_ended(rows: TaskRows, global_batch: int, step: int) -> bool:
    """Whether `step` starts a second pass over the data (a stream learns its length when its pass ends)."""
    n = rows.pass_steps(global_batch)
    return n is not None and step >= n


def _load_model(cfg: JobConfig, comm: Comm, device: torch.device) -> tuple[BlockModel | None, nn.Module, str]:
    """The model whole, or (model.offload: sequential) its blocks with the weightless model around them."""
    log.info("loading %s on %s (world size %d)", cfg.model.name_or_path, device, comm.world)
    if cfg.model.offload == "sequential":
        blocks, kind = load_blocks(cfg.model, device)
        return blocks, blocks.model, kind
    model, kind = load_model(cfg.model, device)
    return None, model, kind


def compute_corda(cfg: JobConfig, comm: Comm, device: torch.device, job: dict[str, Any], paths: list[Path],
                  show_progress: bool, restart: bool, start: float) -> JobResult:
    """Run a `method: corda` job on every rank; rank 0 writes the state (and PEFT's files) and returns it."""
    ckpt = checkpoint.checkpoint_dir(paths[0])
    c = cfg.corda
    with collectively(comm):
        blocks, model, kind = _load_model(cfg, comm, device)
        collate = make_collator(load_processor(cfg.model, kind), cfg.data, kind)
        rows = open_rows(cfg.data, kind)
        fingerprint = rows.fingerprint() if comm.is_main else None
        targets = resolve_targets(model, c.target_modules, key="corda.target_modules")
    names = [t.name for t in targets]
    width = {t.name: t.in_features for t in targets}
    inputs = SampleInputs(model, names, device, import_callable(cfg.hooks.forward_fn, "hooks.forward_fn"))
    sums = CovarianceSums(comm, width, device)
    driver = None
    if blocks is not None:
        with collectively(comm):
            driver = BlockDriver(blocks, inputs, sums, comm)
    snapshot = checkpoint.resume(ckpt, comm, job, restart, kind=CordaSnapshot)
    if snapshot is not None:
        sums.restore(snapshot)
        inputs.follow(snapshot.layout)
    log.info("CorDA (%s, r=%d): %d target layers, one pass over %s samples", c.corda_method, c.r, len(names),
             rows.samples() or "the streamed")
    try:
        with torch.no_grad():
            _accumulate(cfg, comm, rows, collate, inputs, sums, ckpt, job, show_progress, driver)
    finally:
        inputs.close()
    stats = CordaRankStats(comm.rank, inputs.forward_s, sums.add_s, sums.comm_s, owned=list(sums.sums))
    covariances: dict[str, torch.Tensor] = {}
    eigens: dict[str, Eigens] = {}
    with collectively(comm):  # a group no sample reached fails on its owner: every rank stops with it
        covariances = sums.covariances()
        t0 = time.perf_counter()
        if driver is not None:
            eigens = driver.decompose(covariances, c.r, c.corda_method)
        else:
            eigens = decompose_owned(model, sums.layout.groups, covariances, c.r, c.corda_method)
        stats.decompose_s = time.perf_counter() - t0
    if c.covariance_file:
        write_covariance_file(c.covariance_file, comm, covariances, sums.layout)
    del covariances
    gathered = comm.gather_to_main((eigens, stats))
    state, path = None, None
    with collectively(comm):
        if comm.is_main:
            merged = {k: v for part, _ in gathered for k, v in part.items()}
            meta = corda_meta(cfg, targets, sums, comm.world) | provenance(cfg, job, model, kind, rows, fingerprint)
            state, path = write_state(CordaState.of({n: merged[n] for n in names}, CordaMeta.from_dict(meta)),
                                      paths, c.cache_file)
    if not comm.is_main:
        return JobResult(None, None, time.perf_counter() - start, [])
    if not cfg.output.keep_checkpoint:
        checkpoint.remove(ckpt)
    return JobResult(path, state, time.perf_counter() - start, [st for _, st in gathered])  # type: ignore[arg-type]


def _accumulate(cfg: JobConfig, comm: Comm, rows: TaskRows, collate: Any, inputs: SampleInputs,
                sums: CovarianceSums, ckpt: Path, job: dict[str, Any], show_progress: bool,
                driver: BlockDriver | None = None) -> None:
    """One pass over the data: every step's normalised rows into the owners' sums (see the module docstring); with
    a BlockDriver (model.offload: sequential), rounds of steps block by block."""
    global_batch = cfg.data.batch_size * comm.world
    every = cfg.output.checkpoint_every

    def ended(step: int) -> bool:
        return pass_ended(rows, global_batch, step)

    it = rank_batches(rows, collate, cfg.data.batch_size, comm.world, comm.rank, sums.step)
    size = cfg.model.sequential_round if driver is not None else 1
    bar = tqdm(total=rows.pass_steps(global_batch), initial=sums.step, desc="CorDA covariance", unit="batch",
               disable=not (show_progress and comm.is_main))
    try:
        for batches, error in step_groups(it, size, ended, sums.step):
            with collectively(comm, error):  # a failed read on one rank stops every rank
                pass
            before = sums.step
            if driver is None:
                for batch in batches:
                    _memory_step(comm, inputs, sums, batch)
            else:
                if sums.layout is None:
                    layout = None
                    with collectively(comm):
                        layout = driver.layout(batches[0]) if comm.is_main else None
                    _adopt(comm, sums, inputs, layout)
                driver.round(batches)
            bar.update(sums.step - before)
            if every and sums.step // every > before // every and not ended(sums.step):
                checkpoint.save(ckpt, sums.snapshot(), comm, job)
    finally:
        bar.close()


def _adopt(comm: Comm, sums: CovarianceSums, inputs: SampleInputs, layout: Layout | None) -> None:
    """Every rank takes rank 0's groups and execution order: owners placed, passes cut alike."""
    layout = comm.broadcast(layout)
    sums.place(layout)
    inputs.follow(layout)


def _memory_step(comm: Comm, inputs: SampleInputs, sums: CovarianceSums, batch: Any) -> None:
    """One step with the whole model in memory: forward, then the rows to their owners (the first step also
    decides the groups)."""
    layout, tokens, samples = None, {}, {}
    with collectively(comm):
        tokens, samples = inputs.forward(batch)
        if sums.layout is None and comm.is_main:
            layout = inputs.layout()
    if sums.layout is None:
        _adopt(comm, sums, inputs, layout)
    sums.add(tokens, samples)
    sums.step += 1


def write_state(state: CordaState, paths: list[Path], cache_file: str | None) -> tuple[CordaState, Path]:
    """The state to every output (the primary one last, so it is never older than a copy), and PEFT's cache file."""
    for path in reversed(paths):
        state.save(path)
    if cache_file:
        write_cache_file(cache_file, state)
    return state, paths[0]


def write_covariance_file(path: str | Path, comm: Comm, covariances: Mapping[str, torch.Tensor],
                          layout: Layout) -> Path:
    """PEFT's CordaConfig.covariance_file ({module name: covariance}; members of a shared-input group share one
    tensor, which torch.save stores once). With several processes each other owner writes its part beside `path`
    and rank 0 joins them with its own, reading the parts memory-mapped, so no process holds every covariance."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part-{comm.rank}")
    with collectively(comm):
        if not comm.is_main:
            atomic_write(part, lambda tmp: torch.save({o: c.cpu() for o, c in covariances.items()}, tmp))
    with collectively(comm):
        if comm.is_main:
            joined = {o: c.cpu() for o, c in covariances.items()}
            for rank in range(1, comm.world):
                joined |= torch.load(path.with_name(f".{path.name}.part-{rank}"), mmap=True, weights_only=True)
            owner_of = layout.owner_of
            names = [n for g in layout.groups for n in g]
            atomic_write(path, lambda tmp: torch.save({n: joined[owner_of[n]] for n in names}, tmp))
    part.unlink(missing_ok=True)
    return path


def corda_meta(cfg: JobConfig, targets: list[Any], sums: CovarianceSums, world: int) -> dict[str, Any]:
    """The state's metadata from the run (the job adds task, store key, model and dataset)."""
    c = cfg.corda
    owner_of = sums.layout.owner_of
    names = [t.name for t in targets]
    layer_tokens = {n: sums.tokens[owner_of[n]] for n in names}
    return CordaMeta(
        r=c.r, lora_alpha=c.lora_alpha, corda_method=c.corda_method, ranks={n: c.r for n in names},
        in_features={t.name: t.in_features for t in targets}, out_features={t.name: t.out_features for t in targets},
        samples={n: sums.samples[owner_of[n]] for n in names}, layer_tokens=layer_tokens,
        tokens=max(layer_tokens.values()), shared_inputs=sums.layout.shared, target_modules=c.target_modules,
        batches=sums.step, world_size=world, versions=versions("transformers", "peft"),
    ).to_dict()
