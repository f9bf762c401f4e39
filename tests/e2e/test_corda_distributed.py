"""CorDA on 2 real processes (gloo on the CPU, under torchrun): the 1-process result, whatever the batch size.

The 2-process job reads 3 samples per process per step (22 samples: an uneven last step), streamed or with the model
onloaded block by block (model.offload: sequential, rounds of 3 steps); the 1-process job a table, 8 per step. Covariances, sample counts and decompositions must agree; each covariance is
owned by one process (the owners' parts are joined into PEFT's covariance file).
"""

from __future__ import annotations

import re

import pytest
import torch
from test_distributed import compute, torchrun

from conftest import corda_job, write_config
from evapipe import config_from_dict, run_job
from evapipe.states.corda_state import load_corda_state

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("two_procs", [{"data": {"streaming": True}},
                                       {"model": {"offload": "sequential", "sequential_round": 3}}],
                         ids=["streamed", "sequential"])
def test_two_processes_give_the_one_process_state(tmp_path, tiny_model_dir, two_procs):
    llama = tiny_model_dir("llama")
    targets = ["q_proj", "k_proj", "o_proj", "down_proj"]
    one = tmp_path / "one"
    run_job(config_from_dict(corda_job(llama, one, targets, data={"max_samples": 22, "batch_size": 8})),
            show_progress=False)
    two = tmp_path / "two"
    sections = corda_job(llama, two, targets, data={"max_samples": 22, "batch_size": 3}, model=two_procs.get("model", {}))
    sections["data"] |= two_procs.get("data", {})
    cfg = write_config(tmp_path / "two.yaml", **sections)
    run = torchrun(*compute(cfg))
    assert run.returncode == 0, run.stdout[-3000:]
    owned = [int(n) for n in re.findall(r"\((\d+) covariances\)", run.stdout)]
    assert len(owned) == 2 and min(owned) > 0 and sum(owned) == 6  # per block q/k share one, o, down
    a, b = load_corda_state(one / "corda.safetensors"), load_corda_state(two / "corda.safetensors")
    assert a.meta["world_size"] == 1 and b.meta["world_size"] == 2
    assert a.meta["samples"] == b.meta["samples"] and set(a.meta["samples"].values()) == {22}
    assert a.meta["layer_tokens"] == b.meta["layer_tokens"]
    cov_a, cov_b = torch.load(one / "ours" / "cov.pt"), torch.load(two / "ours" / "cov.pt")
    assert cov_a.keys() == cov_b.keys()
    for name, c in cov_a.items():
        torch.testing.assert_close(cov_b[name], c, rtol=1e-4, atol=1e-6, msg=name)
    assert not list((two / "ours").glob(".cov.pt.part-*"))  # the owners' parts are removed once joined
    for name in a.layers:
        (s, u, v), (s2, u2, v2) = a.eigens(name), b.eigens(name)
        torch.testing.assert_close(s2, s, rtol=1e-4, atol=1e-5)
        sign = torch.sign((u * u2).sum(0))
        torch.testing.assert_close(u2 * sign, u, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(v2 * sign, v, rtol=1e-3, atol=1e-4)
    cache = torch.load(two / "ours" / "cache.pt")
    assert set(cache) == set(b.tensors)
