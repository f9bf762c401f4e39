"""Re-budgeting a stored state from its spectrum: totals, EVA's constraints, alphas, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, tiny_job
from evapipe import config_from_dict, load_state, run_job
from evapipe.core.errors import ConfigError, StateError
from evapipe.states.rebudget import rebudget, rebudget_file, shared_groups

FIXTURES = REPO / "tests" / "fixtures"
DOWN1 = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def llama_state(tmp_path_factory, tiny_llama_dir):
    """r=4, rho=2 on the tiny Llama (q/k/v share one PCA per layer), layer 1's down_proj set to r=0."""
    out = tmp_path_factory.mktemp("rebudget") / "s.safetensors"
    cfg = config_from_dict(tiny_job(tiny_llama_dir, eva={"r": 4, "rank_pattern": {"layers\\.1\\.mlp\\.down_proj": 0}},
                                    output={"path": str(out)}))
    run_job(cfg, show_progress=False)
    return out


def group_cap(meta, name, rho):
    """Components a layer may get: round(r * rho), at most in_features, the largest of its shared-input group."""
    group = next((g for g in shared_groups(meta) if name in g), [name])
    return max(min(round(meta["layer_r"][n] * rho), meta["in_features"][n]) for n in group)


def expected_ranks(meta, rho):
    """EVA's redistribution recomputed from the stored ratios by a threshold rule: the budget (sum of layer_r)
    goes to the largest ratios over all layers (each layer up to its cap, a shared PCA's ratios counted for every
    member); ratios equal to the threshold go by layer order; a shared PCA's owner carries its group's largest
    rank."""
    names = list(meta["ranks"])
    pools = {n: meta["explained_variance"][n][: group_cap(meta, n, rho)] for n in names}
    budget = sum(meta["layer_r"].values())
    everything = sorted((v for n in names for v in pools[n]), reverse=True)
    threshold = everything[budget - 1]
    ranks = {n: sum(v > threshold for v in pools[n]) for n in names}
    left = budget - sum(ranks.values())
    for n in names:
        take = min(left, sum(v == threshold for v in pools[n]))
        ranks[n] += take
        left -= take
    for group in shared_groups(meta):
        best = max(group, key=lambda n: ranks[n])
        ranks[group[0]], ranks[best] = ranks[best], ranks[group[0]]
    return ranks


def check_eva_constraints(state, r, rho):
    meta = state.meta
    ranks = state.ranks
    assert meta["r"] == r and meta["rho"] == rho
    assert sum(ranks.values()) == sum(meta["layer_r"].values())  # the whole budget is used
    for name, k in ranks.items():
        assert k <= group_cap(meta, name, rho)  # a shared PCA serves its largest member, no more
        alpha = meta["alpha_pattern"].get(name, meta["lora_alpha"])
        if k > 0:  # adjust_scaling_factors: alpha / rank is every layer's alpha / r
            assert alpha / k == pytest.approx(meta["layer_alpha"][name] / meta["layer_r"][name])
            assert state.tensors[name].shape == (k, meta["in_features"][name])
        else:
            assert name not in state.tensors
        assert (meta["rank_pattern"].get(name, r)) == k
    for group in shared_groups(meta):  # the PCA's owner serves the largest member
        assert ranks[group[0]] == max(ranks[n] for n in group)
        for n in group:
            if ranks[n]:
                assert torch.equal(state.tensors[n], state.spectrum[f"{group[0]}.components"][: ranks[n]])


def test_same_budget_reproduces_the_state(llama_state):
    state = load_state(llama_state)
    assert state.ranks == expected_ranks(state.meta, state.meta["rho"])  # the engine's own allocation too
    same = rebudget(state, state.meta["r"])
    assert same.ranks == state.ranks
    assert same.meta["rank_pattern"] == state.meta["rank_pattern"]
    assert same.meta["alpha_pattern"] == pytest.approx(state.meta["alpha_pattern"])
    for name, a in state.tensors.items():
        assert torch.equal(same.tensors[name], a)


def test_smaller_budget_totals_and_constraints(llama_state):
    state = load_state(llama_state)
    assert state.ranks[DOWN1] == 0 and state.meta["layer_r"][DOWN1] == 0
    for r, rho in [(2, None), (1, None), (2, 1.5), (4, 1.0), (1, 3.0)]:
        new = rebudget(state, r, rho)
        check_eva_constraints(new, r, rho or state.meta["rho"])
        assert new.ranks[DOWN1] == 0 and new.meta["layer_r"][DOWN1] == 0  # the rank_pattern override stays
        assert sum(new.ranks.values()) == r * (len(new.ranks) - 1)
        assert new.ranks == expected_ranks(new.meta, rho or state.meta["rho"])  # follows the explained variance
        assert new.meta["store_key"] is None and new.meta["rebudgeted_from"]["r"] == 4
    flat = rebudget(state, 3, 1.0)  # rho = 1: no redistribution, every layer gets its r
    assert all(k == (0 if n == DOWN1 else 3) for n, k in flat.ranks.items())


def test_budget_back_up_from_a_rebudgeted_state(llama_state, tmp_path):
    state = load_state(llama_state)
    small = rebudget_file(llama_state, tmp_path / "r2.safetensors", 2)
    assert load_state(tmp_path / "r2.safetensors").ranks == small.ranks
    back = rebudget(load_state(tmp_path / "r2.safetensors"), 4)  # the full spectrum travels with it
    assert back.ranks == state.ranks
    converged = rebudget(state, 1).meta["converged"]
    assert all(converged[n] == state.meta["converged"][n] for n in converged)


def test_budgets_the_spectrum_cannot_serve_are_refused(llama_state):
    state = load_state(llama_state)
    with pytest.raises(StateError, match=r"r=8, rho=2 needs more components than the state keeps \(it was computed "
                                         r"with r=4, rho=2\).*needs 16, has 8"):
        rebudget(state, 8)
    with pytest.raises(StateError, match="needs 12, has 8"):
        rebudget(state, 4, 3.0)
    with pytest.raises(ConfigError, match="r must be >= 1 and rho >= 1"):
        rebudget(state, 0)
    with pytest.raises(ConfigError, match="rho >= 1"):
        rebudget(state, 2, 0.5)
    with pytest.raises(StateError, match="has no spectrum"):
        rebudget(load_state(llama_state, with_spectrum=False), 2)


def test_v1_fixture_and_whitening():
    old = load_state(FIXTURES / "state_v1.safetensors")
    new = rebudget(old, 1)
    check_eva_constraints(new, 1, 2.0)
    assert new.total_rank() == 3
    assert new.ranks == expected_ranks(new.meta, 2.0)
    old.meta["whiten"] = True
    white = rebudget(old, 2)
    for group in shared_groups(old.meta):
        comps = old.spectrum[f"{group[0]}.components"]
        sv = old.spectrum[f"{group[0]}.singular_values"]
        for n in group:
            k = white.ranks[n]
            assert torch.allclose(white.tensors[n], comps[:k] / sv[:k].sqrt().unsqueeze(1))


def test_cli(llama_state, tmp_path):
    from click.testing import CliRunner

    from evapipe.cli import main

    out = tmp_path / "r2.safetensors"
    args = ["rebudget", "--state", str(llama_state), "--r"]
    run = CliRunner().invoke(main, args + ["2", "--output", str(out)])
    assert run.exit_code == 0, run.output
    assert "total rank 14 over 8 layers" in run.output and load_state(out).meta["r"] == 2
    refused = CliRunner().invoke(main, args + ["16", "--output", str(tmp_path / "x.safetensors")])
    assert refused.exit_code == 2 and refused.output.startswith("error: r=16, rho=2 needs more components")
    assert refused.exception is None or isinstance(refused.exception, SystemExit)
    assert not (tmp_path / "x.safetensors").exists()
    same = CliRunner().invoke(main, args + ["2", "--output", str(llama_state)])
    assert same.exit_code == 2 and "--output must differ from --state" in same.output
