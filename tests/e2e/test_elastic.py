"""Elastic restart and agreed decisions under torchrun (2 CPU processes, gloo):

* `torchrun --max-restarts 1` restarts the group after a worker is SIGKILLed, and the job resumes from its last
  complete checkpoint to the state of an uninterrupted run;
* ranks that hash the store key differently (node-local model copies) follow rank 0: one cache hit everywhere, no
  rank left waiting for the others (trap 4);
* rank 0 failing to write a checkpoint's completion mark stops every rank at once with its error (trap 5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import FAIL_WITHIN_S, REPO, compute, torchrun

from conftest import tiny_job, write_config
from evapipe import load_state
from evapipe.states.checkpoint import checkpoint_dir

pytestmark = pytest.mark.slow
HELPERS = str(REPO / "tests" / "rel_helpers.py")


def elastic_job(llama_dir: str, out: Path, **hooks) -> dict:
    return tiny_job(llama_dir, data={"batch_size": 2, "shuffle": False}, eva={"tau": 1.0, "max_batches": 8},
                    output={"path": str(out), "checkpoint_every": 2}, hooks=hooks)


def test_torchrun_restarts_a_killed_worker_and_the_job_resumes(tmp_path, tiny_llama_dir):
    ref_cfg = write_config(tmp_path / "ref.yaml", **elastic_job(tiny_llama_dir, tmp_path / "ref.safetensors"))
    assert torchrun(*compute(ref_cfg)).returncode == 0
    out = tmp_path / "eva.safetensors"
    cfg = write_config(tmp_path / "job.yaml", **elastic_job(tiny_llama_dir, out,
                                                              forward_fn="rel_helpers:die_once_on_rank1"))
    run = torchrun(*compute(cfg), max_restarts=1)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "(exitcode: -9) local_rank: 1" in run.stdout  # the agent saw the worker die (SIGKILL)
    assert f"resuming from {checkpoint_dir(out)} at batch 4" in run.stdout
    ref, got = load_state(tmp_path / "ref.safetensors"), load_state(out)
    assert got.meta["batches"] == ref.meta["batches"] == 8 and got.meta["tokens"] == ref.meta["tokens"]
    assert got.ranks == ref.ranks
    for name, a in ref.tensors.items():
        b = got.tensors[name]
        assert bool(((a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1)) >= 0.999).all()), name
    assert not checkpoint_dir(out).exists()


def test_ranks_that_disagree_on_the_key_follow_rank_0(tmp_path, tiny_llama_dir):
    job = tiny_job(tiny_llama_dir, data={"batch_size": 2}, output={"store": str(tmp_path / "store")},
                   distributed={"timeout_s": 600})
    cfg = write_config(tmp_path / "job.yaml", **job)
    first = torchrun(HELPERS, "skew-key", "--config", str(cfg))
    assert first.returncode == 0, first.stdout[-3000:]
    assert "rank 0 cached=False" in first.stdout and "rank 1 cached=False" in first.stdout
    again = torchrun(HELPERS, "skew-key", "--config", str(cfg), within_s=FAIL_WITHIN_S)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "rank 0 cached=True" in again.stdout and "rank 1 cached=True" in again.stdout
    assert len(list((tmp_path / "store").rglob("eva.safetensors"))) == 1
    assert not list((tmp_path / "store").rglob("*.ckpt.zarr"))


def test_rank0_failing_to_mark_a_checkpoint_stops_every_rank(tmp_path, tiny_llama_dir):
    out = tmp_path / "never.safetensors"
    job = tiny_job(tiny_llama_dir, data={"batch_size": 2}, eva={"tau": 1.0, "max_batches": 6},
                   output={"path": str(out), "checkpoint_every": 2}, distributed={"timeout_s": 600})
    cfg = write_config(tmp_path / "job.yaml", **job)
    run = torchrun(HELPERS, "fail-mark", "--config", str(cfg), within_s=FAIL_WITHIN_S)
    assert run.returncode != 0
    assert "No space left on device" in run.stdout
    assert "another rank failed, stopping this one too (rank 0: " in run.stdout  # rank 1 names rank 0's error
    assert not out.exists()
