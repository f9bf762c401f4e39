"""Multi-process EVA with 2 real processes (gloo on the CPU), launched as users launch it.

* world-size invariance: 2 processes x batch 4 give the state of 1 process x batch 8 (MiniLM under
  `accelerate launch --config_file jobs/cpu-2proc.yaml`; a tiny Llama under torchrun), with an uneven last step,
  a rank whose share is empty and a rank whose share is fully label-masked;
* divided work: every PCA is owned and updated by exactly one rank, as often as in one process;
* failure: a rank that raises (in its forward pass, or on a bad row only it reads) stops every rank non-zero,
  with its message on rank 0 too, without hanging and without writing a file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MINILM_TARGETS, REPO, TEST_PATHS, write_config
from evapipe import load_config, load_state, read_metadata, run_job
from evapipe.core.distributed import assign_owners, local_device
from evapipe.core.errors import ConfigError
from evapipe.data.tables import sharded_steps

pytestmark = pytest.mark.slow

FAIL_WITHIN_S = 120  # a failed job must end by then (a hang in a collective would last distributed.timeout_s)
RUN_WITHIN_S = 240  # a good job's bound, generous for a busy 2-core machine
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([*TEST_PATHS, os.environ.get("PYTHONPATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, within_s: float = RUN_WITHIN_S) -> subprocess.CompletedProcess:
    """Run a launcher with a hard deadline; on a hang, kill its whole process group (the ranks too) and fail."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch did not finish within {within_s}s (hang?):\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def torchrun(*args: str, within_s: float = RUN_WITHIN_S, max_restarts: int = 0) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "--max-restarts", str(max_restarts)]
    return launch(*launcher, *args, within_s=within_s)


def compute(config: Path, *overrides: str) -> list[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return ["-m", "evapipe.compute", "--config", str(config), "--no-progress", *sets]


def assert_same_state(one: Path, two: Path) -> None:
    """Same rank distribution and token count; every kept component |cos| >= 0.99 (up to sign)."""
    a, b = load_state(one), load_state(two)
    assert a.meta["world_size"] == 1 and b.meta["world_size"] == 2
    assert a.meta["batches"] == b.meta["batches"] and a.meta["tokens"] == b.meta["tokens"]
    assert a.meta["ranks"] == b.meta["ranks"]
    assert a.tensors.keys() == b.tensors.keys()
    for name, x in a.tensors.items():
        cos = (x * b.tensors[name]).sum(1).abs()
        assert float(cos.min()) >= 0.99, (name, cos)


# -- no launch -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [16, 20, 21, 3])
def test_shards_are_one_process_batches_split(n):
    """Per step, the ranks' shares are disjoint and their union (in rank order) is the one-process batch."""
    for shuffle in (False, True):
        one = sharded_steps(n, 8, 1, 0, shuffle, seed=3)
        ranks = [sharded_steps(n, 4, 2, r, shuffle, seed=3) for r in range(2)]
        for _ in range(7):  # more than a pass: the last, uneven step and the reshuffled next pass
            whole, parts = next(one), [next(r) for r in ranks]
            assert parts[0].indices + parts[1].indices == whole.indices
            assert {p.step for p in parts} == {whole.step}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_owners_balance_cost_and_agree(world):
    costs = [1536.0] * 6 + [384.0] * 18  # MiniLM's PCAs: output.dense reads 1536 features, the others 384
    owners = assign_owners(costs, world)
    assert owners == assign_owners(costs, world)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
    assert max(load) - min(load) <= 384
    assert assign_owners(costs, 1) == [0] * len(costs)
    assert sorted(set(assign_owners([5.0, 1.0], 4))) == [0, 1]  # more ranks than PCAs: some own none


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_local_device_is_cpu_without_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what a MULTI_GPU launcher may leave behind
    assert local_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no GPU"):
        local_device("cuda")


# -- MiniLM: accelerate launch vs plain python -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory):
    """One process (`python -m evapipe.compute`, batch 8) and two (`accelerate launch`, batch 4), same data order.

    44 samples = 5 full global steps + one of 4 samples, which rank 0 reads alone (rank 1's share is empty).
    """
    tmp = tmp_path_factory.mktemp("minilm")
    cfg = write_config(
        tmp / "job.yaml",
        model={"name_or_path": "builtin:minilm"},
        data={"path": "builtin:support_intents", "max_samples": 44, "max_length": 32, "shuffle": True, "seed": 1},
        eva={"r": 4, "rho": 2.0, "target_modules": MINILM_TARGETS, "max_batches": 12, "on_unconverged": "warn"},
    )
    one = launch(*compute(cfg, f"output.path={tmp / 'one.safetensors'}", "data.batch_size=8"))
    two = launch("-m", "accelerate.commands.launch", "--config_file", str(REPO / "jobs" / "cpu-2proc.yaml"),
                 *compute(cfg, f"output.path={tmp / 'two.safetensors'}", "data.batch_size=4"))
    return tmp, one, two


def test_plain_python_is_one_process(minilm_runs):
    tmp, one, _ = minilm_runs
    assert one.returncode == 0, one.stdout[-3000:]
    assert read_metadata(tmp / "one.safetensors")["world_size"] == 1
    assert "process 0:" in one.stdout and "process 1:" not in one.stdout


def test_accelerate_two_processes_match_one(minilm_runs):
    tmp, one, two = minilm_runs
    assert two.returncode == 0, two.stdout[-3000:]
    assert_same_state(tmp / "one.safetensors", tmp / "two.safetensors")
    assert read_metadata(tmp / "two.safetensors")["batches"] == 12  # past the step where rank 1 had nothing
    # the end-of-job summary shows each rank's tokens, forward time and SVD time
    lines = [ln for ln in two.stdout.splitlines() if ln.startswith(("process 0:", "process 1:"))]
    assert len(lines) == 2 and all("tokens" in ln and "forward" in ln and "SVD" in ln for ln in lines)


# -- tiny Llama: label-masked shards, divided PCA work ----------------------------------------------------------------
PROMPT_ROWS = 20  # batch 4 x 2 ranks: step 0 rows 0-7, step 1 rows 8-15, step 2 rows 16-19 (rank 0 only)
MASKED = range(12, 16)  # rank 1's whole share of step 1: no completion, so every label is -100


def prompt_rows() -> list[dict[str, str]]:
    words = "refund order card delivery password invoice account address parcel charge".split()
    return [{"prompt": f"question {i}: where is my {words[i % 10]}? ",
             "completion": "" if i in MASKED else f"your {words[(3 * i) % 10]} {words[(7 * i + 1) % 10]} is on its way"}
            for i in range(PROMPT_ROWS)]


def test_label_masked_and_empty_shares_match_one_process(tmp_path, tiny_model_dir):
    """2 x 4 = 1 x 8 on prompt/completion data where rank 1 reads only fully masked rows at step 1 and nothing at
    step 2; every PCA lives on one rank, which alone updates it, as many times as the one process did."""
    tmp = tmp_path
    rank1 = sharded_steps(PROMPT_ROWS, 4, 2, 1, False, 0)
    assert [next(rank1).indices for _ in range(3)][1:] == [list(MASKED), []]
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows()))
    cfg = write_config(
        tmp / "job.yaml",
        model={"name_or_path": tiny_model_dir("llama")},
        data={"path": str(data), "prompt_field": "prompt", "completion_field": "completion", "shuffle": False,
              "max_length": 48, "batch_size": 4},
        eva={"r": 2, "rho": 2.0, "tau": 0.999, "max_batches": 7, "on_unconverged": "warn"},
        output={"path": str(tmp / "two.safetensors")},
    )
    one_cfg = load_config(cfg, [f"output.path={tmp / 'one.safetensors'}", "data.batch_size=8"])
    one = run_job(one_cfg, show_progress=False)
    two = torchrun(str(REPO / "tests" / "dist_helpers.py"), "--config", str(cfg), "--stats", str(tmp / "stats.json"))
    assert two.returncode == 0, two.stdout[-3000:]
    assert_same_state(tmp / "one.safetensors", tmp / "two.safetensors")

    stats = json.loads((tmp / "stats.json").read_text())
    (single,) = one.rank_stats
    assert [s["rank"] for s in stats] == [0, 1] and all(s["owned"] for s in stats)
    owned = [set(s["updates"]) for s in stats]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(single.updates)  # each PCA on exactly one rank
    assert {k: v for s in stats for k, v in s["updates"].items()} == single.updates  # updated as often as alone
    assert sum(s["pca_tokens"] for s in stats) == single.pca_tokens  # every token row reached one PCA, once


# -- failures --------------------------------------------------------------------------------------------------------
def assert_failed_cleanly(run: subprocess.CompletedProcess, message: str, out: Path) -> None:
    """Both ranks exit non-zero, rank 1 with its error and rank 0 naming it, and no file is written."""
    assert run.returncode != 0
    assert message in run.stdout
    assert "another rank failed, stopping this one too (rank 1: " in run.stdout  # rank 0's own error
    # torchrun lists every rank that failed, with its exit code: both, neither with 0
    exits = [ln.split(":", 1)[1].split("(")[0].strip() for ln in run.stdout.splitlines()
             if ln.strip().startswith("exitcode")]
    assert len(exits) == 2 and "0" not in exits, exits
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))


def test_rank_failing_in_forward_stops_every_rank(tmp_path, tiny_model_dir):
    out = tmp_path / "never.safetensors"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows()))
    cfg = write_config(
        tmp_path / "job.yaml",
        model={"name_or_path": tiny_model_dir("llama")},
        data={"path": str(data), "prompt_field": "prompt", "completion_field": "completion", "batch_size": 2},
        eva={"r": 2, "max_batches": 6, "on_unconverged": "warn"},
        output={"path": str(out)},
        hooks={"forward_fn": "dist_helpers:fail_on_rank1_step2"},
    )
    run = torchrun(*compute(cfg), within_s=FAIL_WITHIN_S)
    assert_failed_cleanly(run, "RuntimeError: injected failure on rank 1 at step 2", out)


def test_bad_row_on_one_rank_stops_every_rank(tmp_path, tiny_model_dir):
    """A malformed conversation that only rank 1 reads (at step 1): a DataError there, the same stop everywhere."""
    out = tmp_path / "never.safetensors"
    rows = [{"messages": [{"role": "user", "content": f"where is order {i}?"},
                          {"role": "assistant", "content": f"order {i} ships today"}]} for i in range(16)]
    rows[13]["messages"][1]["content"] = None  # no text: rank 1 reads row 13 at step 1
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(
        tmp_path / "job.yaml",
        model={"name_or_path": tiny_model_dir("llama")},
        data={"path": str(data), "messages_field": "messages", "batch_size": 4, "shuffle": False},
        eva={"r": 2, "max_batches": 6, "on_unconverged": "warn"},
        output={"path": str(out)},
    )
    run = torchrun(*compute(cfg), within_s=FAIL_WITHIN_S)
    assert_failed_cleanly(run, "DataError: chat data", out)
