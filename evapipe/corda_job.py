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
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import JobConfig
from .corda_decompose import Eigens, decompose_owned
from .corda_sequential import BlockDriver, step_groups
from .corda_state import CordaMeta, CordaState, load_corda_state
from .corda_stats import CordaSnapshot, CovarianceSums, SampleInputs
from .data import TaskRows, make_collator, open_rows, rank_batches
from .distributed import Comm, collectively
from .job import JobResult, import_callable, provenance
from .metadata import versions
from .models import load_blocks, load_model, load_processor
from .planning import Layout
from .state import atomic_write
from .targets import resolve_targets

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


def serve_cache_hit(cfg: JobConfig, hit: Path) -> None:
    """A stored CorDA state answers the job: PEFT's cache file is written from it; a covariance file cannot be (the
    state keeps no covariance), so its absence is said, with the way to get it."""
    if cfg.corda.cache_file:
        write_cache_file(cfg.corda.cache_file, load_corda_state(hit))
    cov = cfg.corda.covariance_file
    if cov and not Path(cov).is_file():
        log.warning("corda.covariance_file %s is not written on a cache hit (the state keeps no covariance); "
                    "--force recomputes the job and writes it", cov)


def write_cache_file(path: str | Path, state: CordaState) -> Path:
    """PEFT's CordaConfig.cache_file: torch.save of the state's eigens, atomically."""
    return atomic_write(path, lambda tmp: torch.save(state.peft_cache(), tmp))


def pass_ended(rows: TaskRows, global_batch: int, step: int) -> bool:
    """Whether `step` starts a second pass over the data (a stream learns its length when its pass ends)."""
    n = rows.pass_steps(global_batch)
    return n is not None and step >= n


def compute_corda(cfg: JobConfig, comm: Comm, device: torch.device, job: dict[str, Any], paths: list[Path],
                  show_progress: bool, restart: bool, start: float) -> JobResult:
    """Run a `method: corda` job on every rank; rank 0 writes the state (and PEFT's files) and returns it."""
    ckpt = checkpoint.checkpoint_dir(paths[0])
    c = cfg.corda
    blocks, sequential = None, cfg.model.offload == "sequential"
    with collectively(comm):
        log.info("loading %s on %s (world size %d)", cfg.model.name_or_path, device, comm.world)
        if sequential:
            blocks, kind = load_blocks(cfg.model, device)
            model = blocks.model
        else:
            model, kind = load_model(cfg.model, device)
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
    rank_stats = [st for _, st in gathered]
    print(corda_summary(state, rank_stats, time.perf_counter() - start, path), file=sys.stderr)
    return JobResult(path, state, time.perf_counter() - start, rank_stats)  # type: ignore[arg-type]


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


def corda_summary(state: CordaState, rank_stats: list[CordaRankStats], seconds: float, path: Path) -> str:
    """The end-of-job lines: what was computed and each process's share."""
    from .report import corda_table

    meta = state.meta
    samples = max(meta["samples"].values())
    out = ["", corda_table(meta), "",
           f"CorDA {meta['corda_method']} r={meta['r']} over {len(meta['ranks'])} layers: {samples} samples, "
           f"{meta['tokens']} tokens in {meta['batches']} batches"]
    for st in rank_stats:
        out.append(f"process {st.rank}: forward {st.forward_s:.2f}s, covariance sums {st.add_s:.2f}s "
                   f"({len(st.owned)} covariances), comm {st.comm_s:.2f}s, decomposition {st.decompose_s:.2f}s")
    out.append(f"done in {seconds:.1f}s -> {path}")
    return "\n".join(out)
