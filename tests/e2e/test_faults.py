"""Fault injection: the next reliability trap should show up here.

* SIGKILL at random moments of a checkpointed job, after its first checkpoint and before its end (seeded;
  EVAPIPE_FAULT_SEEDS=N runs more): the rerun resumes and its state equals the uninterrupted one;
* ENOSPC / EIO injected at each write of a job in turn (state, sidecar, store copy, checkpoint arrays and marks,
  renames): the previous state stays intact, no temporary file is left, and the error is evapipe's one line;
* a few hundred random mutations of a state file and its sidecar (header, metadata, tensor bytes, truncations):
  only evapipe's own errors, never a traceback, never an accepted wrong state.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_resume import assert_same_state

from conftest import TEST_PATHS, tiny_job, write_config
from evapipe import config_from_dict, load_state, read_metadata, run_job
from evapipe.cli import main
from evapipe.core.errors import EvapipeError
from evapipe.states.checkpoint import checkpoint_dir, latest
from evapipe.states.state import EvaState, spectrum_path

SEEDS = range(int(os.environ.get("EVAPIPE_FAULT_SEEDS", "3")))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([*TEST_PATHS, os.environ.get("PYTHONPATH", "")])}


# -- SIGKILL at random points ----------------------------------------------------------------------------------------
def killed_job(llama_dir: str, out: Path) -> dict:
    return tiny_job(llama_dir, eva={"tau": 1.0, "max_batches": 8}, output={"path": str(out), "checkpoint_every": 2},
                    hooks={"forward_fn": "test_resume:slow_forward"})


DELAY = 0.2  # seconds each forward pass sleeps (test_resume.slow_forward): a lower bound on the job's pace


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir):
    """The reference state: the same job run as a process, never killed."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_config(tmp / "job.yaml", **killed_job(tiny_llama_dir, tmp / "ref.safetensors"))
    run = subprocess.run([sys.executable, "-m", "evapipe.compute", "--config", str(cfg), "--no-progress"],
                         env=dict(ENV, EVAPIPE_TEST_DELAY=str(DELAY)), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return load_state(tmp / "ref.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_random_moment_then_rerun_equals_the_uninterrupted_state(tmp_path, tiny_llama_dir, uninterrupted,
                                                                              seed):
    """The kill lands at a random moment after the first checkpoint is complete and before the job can have ended
    (within the paced batches still to come); the rerun says it resumes and ends at the uninterrupted state."""
    out = tmp_path / "eva.safetensors"
    ckpt = checkpoint_dir(out)
    cfg = write_config(tmp_path / "job.yaml", **killed_job(tiny_llama_dir, out))
    cmd = [sys.executable, "-m", "evapipe.compute", "--config", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, env=dict(ENV, EVAPIPE_TEST_DELAY=str(DELAY)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while latest(ckpt) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert latest(ckpt) is not None and proc.poll() is None, "no checkpoint while the job ran"
    left = 8 - latest(ckpt)[1]["loop"]["progress"]["step"]  # paced batches still to come (max_batches 8)
    time.sleep(random.Random(seed).uniform(0.0, 0.9) * left * DELAY)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    if out.exists():
        load_state(out)  # a state that is there is whole
    step = latest(ckpt)[1]["loop"]["progress"]["step"]
    assert 2 <= step < 8 and step % 2 == 0
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    resumed_at = int(rerun.stderr.split(f"resuming from {ckpt} at batch ")[1].split()[0])  # it resumed
    assert resumed_at >= step
    assert_same_state(load_state(out), uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "eva.safetensors", "eva.spectrum.safetensors", "job.yaml"]


# -- ENOSPC / EIO at each write --------------------------------------------------------------------------------------
class Injector:
    """Counts evapipe's writes (files written through write_temp, renames, zarr chunk and metadata writes) and
    fails the `fail_at`-th one with `code`."""

    def __init__(self, fail_at: int | None = None, code: int = errno.ENOSPC):
        self.fail_at, self.code, self.count, self.failed, self.seen = fail_at, code, 0, None, []

    def hit(self, what: str) -> None:
        self.count += 1
        self.seen.append(what)
        if self.count == self.fail_at:
            self.failed = what
            raise OSError(self.code, os.strerror(self.code))


@contextmanager
def injected(monkeypatch, injector: Injector):
    import zarr.storage

    from evapipe.states import state

    real_temp, real_replace, real_set = state.write_temp, os.replace, zarr.storage.LocalStore.set

    def write_temp(path, write):
        injector.hit(f"write {Path(path).name}")
        return real_temp(path, write)

    def replace(src, dst, **kw):
        injector.hit(f"rename to {Path(dst).name}")
        return real_replace(src, dst, **kw)

    async def zarr_set(self, key, value):
        injector.hit(f"zarr {key}")
        return await real_set(self, key, value)

    with monkeypatch.context() as m:
        m.setattr(state, "write_temp", write_temp)
        m.setattr(os, "replace", replace)
        m.setattr(zarr.storage.LocalStore, "set", zarr_set)
        yield injector


def test_a_failed_write_anywhere_keeps_the_previous_state_and_says_so_in_one_line(tmp_path, tiny_llama_dir,
                                                                                   monkeypatch):
    out = tmp_path / "eva.safetensors"
    run_job(config_from_dict(tiny_job(tiny_llama_dir, output={"path": str(out)})), show_progress=False)
    before = (out.read_bytes(), spectrum_path(out).read_bytes())
    job = tiny_job(tiny_llama_dir, eva={"r": 3, "tau": 1.0, "max_batches": 4},
                   output={"path": str(out), "store": str(tmp_path / "store"), "checkpoint_every": 2})
    cfg = write_config(tmp_path / "job.yaml", **job)
    args = ["compute", "--config", str(cfg), "--no-progress", "--force"]
    with injected(monkeypatch, Injector()) as counting:
        assert CliRunner().invoke(main, args).exit_code == 0
    seen = counting.seen
    assert len(seen) >= 8  # checkpoint arrays, its mark, store state + sidecar, the copy at output.path, renames
    # every write but the checkpoint's many array chunks, of which the first and the last
    chunks = [i for i, what in enumerate(seen, 1) if what.startswith("zarr ")]
    picks = [i for i in range(1, len(seen) + 1) if i not in chunks] + [chunks[0], chunks[-1]]
    failed = []
    for k in picks:
        for p in (out, spectrum_path(out)):
            p.unlink(missing_ok=True)
        out.write_bytes(before[0])
        spectrum_path(out).write_bytes(before[1])
        code = errno.ENOSPC if k % 2 else errno.EIO
        with injected(monkeypatch, Injector(k, code)) as inj:
            run = CliRunner().invoke(main, args + ["--restart"])
        failed.append(inj.failed)
        errors = [line for line in run.output.splitlines() if line.startswith("error: ")]  # beside loading bars
        assert run.exit_code == 2 and len(errors) == 1 and "Traceback" not in run.output, (inj.failed, run.output)
        assert os.strerror(code) in errors[0], (inj.failed, errors)
        if (out.read_bytes(), spectrum_path(out).read_bytes()) != before:  # only the very last rename may land
            assert inj.failed == f"rename to {spectrum_path(out).name}" or load_state(out).meta["r"] == 3, inj.failed
        state = load_state(out)
        assert state.spectrum, inj.failed  # always a matching pair
        assert not [p for p in tmp_path.rglob("*.tmp")], inj.failed
    assert None not in failed


# -- random mutations of a state file --------------------------------------------------------------------------------
def sample_state() -> EvaState:
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.down_proj"]
    ranks = {names[0]: 2, names[1]: 1, names[2]: 0}
    meta = {"format": "evapipe.eva", "format_version": 2, "task": "fuzz", "r": 1, "lora_alpha": 2.0, "rho": 2.0,
            "ranks": ranks, "in_features": {n: 8 for n in names}, "layer_r": {n: 1 for n in names},
            "layer_alpha": {n: 2.0 for n in names}, "rank_pattern": {names[0]: 2, names[2]: 0},
            "alpha_pattern": {names[0]: 4.0, names[2]: 0.0}, "explained_variance": {n: [0.4, 0.2] for n in names},
            "converged": {n: True for n in names}, "whiten": False, "adjust_scaling_factors": True}
    tensors = {n: torch.linalg.qr(torch.randn(8, k, generator=g))[0].T.contiguous() for n, k in ranks.items() if k}
    spectrum = {f"{n}.components": torch.randn(2, 8, generator=g) for n in names}
    spectrum |= {f"{n}.singular_values": torch.tensor([2.0, 1.0]) for n in names}
    return EvaState(tensors, meta, spectrum)


def mutate(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.choice(["flip", "header-flip", "tensor-flip", "truncate", "append", "length", "json"])
    b = bytearray(data)
    if kind == "flip":
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "header-flip":
        i = rng.randrange(8, 8 + n)
        b[i] = rng.randrange(32, 127)
    elif kind == "tensor-flip":
        i = rng.randrange(8 + n, len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        return bytes(b[: rng.randrange(len(b))])
    elif kind == "append":
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == "length":
        return struct.pack("<Q", max(0, n + rng.choice([-9, -1, 1, 7, 1 << 20]))) + bytes(b[8:])
    else:  # a JSON-level edit that keeps the file well-formed: a value, a key or a tensor entry changed
        header = json.loads(b[8 : 8 + n])
        meta = header["__metadata__"]
        key = rng.choice(sorted(meta))
        choice = rng.randrange(5)
        if choice == 0:
            meta[key] = json.dumps(rng.choice([None, 3, -1, "x", [1], {"a": 1}, True, 1.5]))
        elif choice == 1:
            del meta[key]
        elif choice == 2:
            header[rng.choice([k for k in header if k != "__metadata__"])]["shape"][0] += 1
        elif choice == 3:
            header[rng.choice([k for k in header if k != "__metadata__"])]["dtype"] = rng.choice(["F16", "I32", "U8"])
        else:
            header["__metadata__"] = rng.choice([[1, 2], "meta", {"format": 1}])
        blob = json.dumps(header).encode()
        return struct.pack("<Q", len(blob)) + blob + bytes(b[8 + n :])
    return bytes(b)


def same_state(a: EvaState, b: EvaState) -> bool:
    return (a.meta == b.meta and a.tensors.keys() == b.tensors.keys() and a.spectrum.keys() == b.spectrum.keys()
            and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
            and all(torch.equal(a.spectrum[k], b.spectrum[k]) for k in a.spectrum))


def test_random_mutations_give_evapipe_errors_or_the_same_state(tmp_path):
    path = sample_state().save(tmp_path / "s.safetensors")
    original, side_original = path.read_bytes(), spectrum_path(path).read_bytes()
    truth = load_state(path)
    rng = random.Random(1234)
    outcomes = {"refused": 0, "same": 0}
    for trial in range(300):
        target = spectrum_path(path) if trial % 5 == 4 else path  # one trial in five on the sidecar
        path.write_bytes(original)
        spectrum_path(path).write_bytes(side_original)
        target.write_bytes(mutate(target.read_bytes(), rng))
        try:
            got = load_state(path)
            read_metadata(path)
        except EvapipeError:
            outcomes["refused"] += 1
        else:
            changed = {k for k in {*got.meta, *truth.meta} if got.meta.get(k) != truth.meta.get(k)}
            assert same_state(got, truth) or (target != path and not got.spectrum), (trial, changed)
            outcomes["same"] += 1
        if trial % 15 == 0:  # the command line: evapipe's one line, never a traceback
            run = CliRunner().invoke(main, ["show", str(path)])
            assert "Traceback" not in run.output and run.exception is None or isinstance(run.exception, SystemExit)
            if run.exit_code:
                assert run.output.startswith("error: ") and len(run.output.strip().splitlines()) == 1, run.output
    assert outcomes["refused"] > 200, outcomes
