"""Resume: a job killed with SIGKILL resumes from its last zarr checkpoint and ends where an uninterrupted run ends;
checkpoints of another config or world size are refused unless --restart; incomplete checkpoints are never used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TEST_PATHS, tiny_job, write_config
from evapipe import config_from_dict, load_state, run_job
from evapipe.core.errors import ConfigError
from evapipe.model.forward import default_forward
from evapipe.states.checkpoint import checkpoint_dir, latest


def slow_forward(model, inputs):
    """hooks.forward_fn for the kill test: a pause per batch, so the job is still running when it is killed."""
    time.sleep(float(os.environ.get("EVAPIPE_TEST_DELAY", "0")))
    return default_forward(model, inputs)


def assert_same_state(a, b):
    assert a.ranks == b.ranks
    assert a.meta["tokens"] == b.meta["tokens"] and a.meta["batches"] == b.meta["batches"]
    for name, x in a.tensors.items():
        cos = (x * b.tensors[name]).sum(1).abs() / (x.norm(dim=1) * b.tensors[name].norm(dim=1))
        assert bool((cos >= 0.999).all()), (name, cos)


def job(llama_dir, out, **eva):
    return tiny_job(llama_dir, eva={"tau": 1.0, "max_batches": 10, **eva},
                    output={"path": str(out), "checkpoint_every": 2},
                    hooks={"forward_fn": "test_resume:slow_forward"})


def kill_then_rerun(cfg_path: Path, out: Path, delay: float) -> tuple[int, str]:
    """Start the job, SIGKILL it once a checkpoint is complete, then run it again to the end: the step the
    checkpoint holds and the second run's stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([*TEST_PATHS, os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, "-m", "evapipe.compute", "--config", str(cfg_path), "--no-progress"]
    ckpt = checkpoint_dir(out)
    proc = subprocess.Popen(cmd, env=dict(env, EVAPIPE_TEST_DELAY=str(delay)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while latest(ckpt) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr
    step = latest(ckpt)[1]["loop"]["progress"]["step"]
    assert not out.exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    return step, rerun.stderr


def test_sigkill_then_rerun_gives_the_uninterrupted_state(tmp_path, tiny_llama_dir):
    out = tmp_path / "eva.safetensors"
    cfg_path = write_config(tmp_path / "job.yaml", **job(tiny_llama_dir, out))
    reference = run_job(config_from_dict(job(tiny_llama_dir, tmp_path / "ref.safetensors")), show_progress=False)
    assert reference.state.meta["batches"] == 10
    step, stderr = kill_then_rerun(cfg_path, out, delay=0.5)
    assert 2 <= step < 10 and step % 2 == 0
    ckpt = checkpoint_dir(out)
    resumed_at = int(stderr.split(f"resuming from {ckpt} at batch ")[1].split()[0])
    assert resumed_at >= step
    assert not ckpt.exists()  # removed after the state was written
    assert_same_state(load_state(out), reference.state)


def test_rerun_resumes_in_process_and_matches(tmp_path, tiny_llama_dir, caplog):
    out = tmp_path / "eva.safetensors"
    first = run_job(config_from_dict(job(tiny_llama_dir, out, max_batches=6)
                                     | {"output": {"path": str(out), "checkpoint_every": 2, "keep_checkpoint": True}}),
                    show_progress=False)
    ckpt = checkpoint_dir(out)
    step_dir, attrs = latest(ckpt)
    assert attrs["loop"]["progress"]["step"] == 4 and [p.name for p in ckpt.iterdir() if p.name.startswith("step")] == [
        step_dir.name]  # older steps are pruned; none at the last batch (the state itself is written then)
    again = run_job(config_from_dict(job(tiny_llama_dir, out, max_batches=6)), show_progress=False)
    assert "resuming from" in caplog.text and "at batch 4" in caplog.text
    assert_same_state(again.state, first.state)
    for name, a in first.state.tensors.items():
        assert torch.equal(again.state.tensors[name], a)  # restored exactly: bit-identical continuation
    assert not ckpt.exists()


def make_kept_checkpoint(llama_dir, out):
    cfg = job(llama_dir, out, max_batches=4)
    cfg["output"]["keep_checkpoint"] = True
    run_job(config_from_dict(cfg), show_progress=False)
    return checkpoint_dir(out)


def test_checkpoint_of_another_config_is_refused_unless_restart(tmp_path, tiny_llama_dir, caplog):
    out = tmp_path / "eva.safetensors"
    ckpt = make_kept_checkpoint(tiny_llama_dir, out)
    other = config_from_dict(job(tiny_llama_dir, out, max_batches=4, r=3))
    with pytest.raises(ConfigError, match=r"checkpoint .* \(at batch 2\) was written for a different job "
                                          r"\(eva.r: 2 -> 3\); rerun with --restart"):
        run_job(other, show_progress=False)
    assert latest(ckpt) is not None  # kept: nothing is discarded without --restart
    fresh = run_job(other, show_progress=False, restart=True)
    assert "discarding the checkpoint" in caplog.text and fresh.state.meta["r"] == 3
    assert "resuming" not in caplog.text


def test_checkpoint_of_another_world_size_is_refused(tmp_path, tiny_llama_dir):
    out = tmp_path / "eva.safetensors"
    ckpt = make_kept_checkpoint(tiny_llama_dir, out)
    step_dir, _ = latest(ckpt)
    meta = json.loads((step_dir / "zarr.json").read_text())
    meta["attributes"]["world_size"] = 2
    (step_dir / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="world size 2, this job has world size 1; run it with 2 processes"):
        run_job(config_from_dict(job(tiny_llama_dir, out, max_batches=4)), show_progress=False)


def test_incomplete_checkpoints_are_ignored_then_removed(tmp_path, tiny_llama_dir, caplog):
    out = tmp_path / "eva.safetensors"
    ckpt = make_kept_checkpoint(tiny_llama_dir, out)
    good, _ = latest(ckpt)
    killed_before_mark = ckpt / "step-00000006"  # every rank wrote its PCAs, rank 0 had not marked it complete
    (killed_before_mark / "rank-0").mkdir(parents=True)
    torn = ckpt / "step-00000008"  # a mark cut short (atomic writes prevent it; a copied folder may not)
    torn.mkdir()
    (torn / "zarr.json").write_text(good.joinpath("zarr.json").read_text()[:200])
    assert latest(ckpt)[0] == good
    assert latest(tmp_path / "nowhere") is None
    cfg = job(tiny_llama_dir, out, max_batches=4)
    cfg["output"]["keep_checkpoint"] = True
    run_job(config_from_dict(cfg), show_progress=False)
    assert "at batch 2" in caplog.text
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == [good.name]


def test_pca_states_round_trip_exactly_and_a_stale_step_is_replaced(tmp_path):
    from evapipe.core.distributed import Comm
    from evapipe.eva.ipca import PCAState, new_state, update_many
    from evapipe.eva.planning import Verdict
    from evapipe.model.layout import Layout
    from evapipe.states import checkpoint

    g = torch.Generator().manual_seed(0)
    fitted = new_state(16, 4, None, seed=3)
    update_many([fitted], [torch.randn(40, 16, generator=g)])
    update_many([fitted], [torch.randn(40, 16, generator=g)])
    scalar = PCAState(4, 2, 2, 5, mean=torch.zeros(4, dtype=torch.float64), var=torch.tensor(2.5, dtype=torch.float64),
                      n_seen=3, history=[0.5])  # 0-d tensors (a summed variance) too
    states = {"a.q": fitted, "b.v": new_state(8, 2, 1, seed=4), "c.o": scalar}  # b.v never fitted: None tensors
    snapshot = checkpoint.Snapshot(6, 80, Layout.of([["a.q"], ["b.v"]]), {}, Verdict({"a.q": False, "b.v": False}),
                                   {}, {}, states)
    stale = tmp_path / "c.zarr" / "step-00000006"
    stale.mkdir(parents=True)
    (stale / "zarr.json").write_text("{torn")
    step_dir = checkpoint.save(tmp_path / "c.zarr", snapshot, Comm(), {"key": "k", "parts": {}})
    assert latest(tmp_path / "c.zarr")[0] == step_dir == stale
    back = checkpoint._read_states(step_dir / "rank-0")
    assert set(back) == set(states)
    for name, state in states.items():
        for field in ("n_features", "n_components", "n_track", "seed", "n_seen", "steps", "history"):
            assert getattr(back[name], field) == getattr(state, field)
        for field in ("mean", "var", "components", "singular_values", "similarity"):
            a, b = getattr(state, field), getattr(back[name], field)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, field)
    assert isinstance(back["b.v"], PCAState) and back["a.q"].mean.dtype == torch.float64
