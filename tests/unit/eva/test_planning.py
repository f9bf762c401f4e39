"""The engine's parts without a model or a process group: planning decisions, the agreement's wire form,
collectively(), typed metadata and checkpoint snapshots."""

from __future__ import annotations

import pytest
import torch

from evapipe.core.distributed import Comm, collectively
from evapipe.core.errors import DataError
from evapipe.eva.agreement import Agreement
from evapipe.eva.budget import distribute_ranks
from evapipe.eva.ipca import new_state, update_many
from evapipe.eva.planning import (
    Verdict,
    allocate,
    component_caps,
    converged,
    judge,
    layers_come_back,
    next_step,
    settle_waiting,
    unconverged,
)
from evapipe.model.layout import Layout, StepPlan, capture_depth, groups_with_singles
from evapipe.states.checkpoint import Snapshot
from evapipe.states.metadata import FORMAT_VERSION, StateMeta, migrate

LAYOUT = Layout.of([["q", "k", "v"], ["o"], ["up"]], order=["q", "k", "v", "o", "up"])


def test_layout_views():
    assert LAYOUT.owners == ["q", "o", "up"]
    assert LAYOUT.owner_of == {"q": "q", "k": "q", "v": "q", "o": "o", "up": "up"}
    assert LAYOUT.shared == [["q", "k", "v"]]
    assert LAYOUT.members({"q", "up"}) == ["q", "k", "v", "up"]
    assert groups_with_singles([["q", "k"]], ["q", "k", "o"]) == [["q", "k"], ["o"]]


def test_component_caps_round_r_rho_cap_in_features_and_serve_the_largest_member():
    caps = component_caps({"q": 4, "k": 8, "o": 4, "tiny": 8}, 1.5, {"q": 64, "k": 64, "o": 64, "tiny": 5})
    assert caps == {"q": 6, "k": 12, "o": 6, "tiny": 5}
    shared = component_caps({"q": 4, "k": 8, "o": 4}, 1.5, {"q": 64, "k": 64, "o": 64}, [["q", "k"], ["o"]])
    assert shared == {"q": 12, "k": 12, "o": 6}


def test_allocate_is_distribute_ranks_over_every_layer_with_its_owners_ratios():
    ratios = {"q": torch.tensor([0.5, 0.2, 0.1]), "o": torch.tensor([0.4, 0.3, 0.05]), "up": torch.tensor([0.6, 0.01, 0.0])}
    caps = {n: 3 for n in LAYOUT.owner_of}
    names = ["q", "k", "v", "o", "up"]
    ranks = allocate(ratios, LAYOUT, 10, caps, names)
    expected = distribute_ranks({n: ratios[LAYOUT.owner_of[n]] for n in names}, 10, caps, LAYOUT.groups)
    assert ranks == expected and sum(ranks.values()) == 10
    assert ranks["up"] == 1 and ranks["q"] == max(ranks[n] for n in ("q", "k", "v"))


def test_allocate_gives_a_pca_without_ratios_rank_0():
    ratios = {"q": torch.tensor([0.5, 0.2, 0.1]), "o": torch.tensor([0.4, 0.3, 0.05])}  # "up": an unreached expert
    caps = {n: 3 for n in LAYOUT.owner_of}
    ranks = allocate(ratios, LAYOUT, 15, caps, ["q", "k", "v", "o", "up"])
    assert ranks["up"] == 0 and ranks["o"] == 3 and ranks["q"] == 3


def test_settle_waiting_holds_unreached_experts_until_every_other_pca_is_done():
    running = Verdict({"q": True, "o": False, "e3": True}, {"q": 2})
    assert settle_waiting(running, {"e3"}).done == {"q": True, "o": False, "e3": False}
    finished = Verdict({"q": True, "o": True, "e3": False})
    assert settle_waiting(finished, {"e3"}).done == {"q": True, "o": True, "e3": True}
    assert settle_waiting(running, {"e3"}).done_at == {"q": 2}
    assert settle_waiting(Verdict({"e3": True}), {"e3"}).done == {"e3": False}  # nothing reached yet: keep reading


def test_converged_needs_every_needed_component_over_tau():
    sim = torch.tensor([0.999, 0.995, 0.5])
    assert converged(sim, 2, 0.99) and not converged(sim, 3, 0.99)
    assert converged(None, 0, 0.99) and not converged(None, 1, 0.99)


def test_judge_can_undo_unless_refining_and_sticks_for_no_more_components():
    similar = {"q": torch.tensor([1.0, 1.0, 0.1]), "o": torch.tensor([0.1, 0.1, 0.1]), "up": torch.tensor([1.0, 0.0, 0.0])}
    owners = LAYOUT.owners
    first = judge(owners, {"q": 2, "o": 0, "up": 1}, similar, 0.99)
    assert first.done == {"q": True, "o": True, "up": True} and first.all_done
    assert first.done_at == {"q": 2, "o": 0, "up": 1}
    moved = {"q": 3, "o": 1, "up": 1}  # the allocation moved: q and o need components that have not converged
    plain = judge(owners, moved, similar, 0.99, first)
    assert plain.done == {"q": False, "o": False, "up": True} and plain.undone() == {"q", "o"}
    sticky = judge(owners, {"q": 2, "o": 1, "up": 1}, {o: torch.zeros(3) for o in owners}, 0.99, first, refine=True)
    assert sticky.done == {"q": True, "o": False, "up": True}  # q still needs <= 2: converged before; o needs more


def test_next_step_and_capture_depth():
    verdict = Verdict({"q": True, "o": False, "up": True})
    assert next_step(verdict) == StepPlan(frozenset({"o"}))
    plan = next_step(verdict, refine=True)
    assert plan.needed == {"o"} and plan.refine == {"q", "up"}
    stop, active = capture_depth(LAYOUT.order, plan)
    assert stop == "o" and active == {"o", "q"}  # up is deeper than the deepest needed layer: not reached
    assert capture_depth((), plan) == (None, {"o"})  # no order (a layer called twice): never cut the pass
    assert next_step(Verdict({"q": True})).finished


def test_unconverged_lists_members_with_a_rank():
    verdict = Verdict({"q": False, "o": False, "up": True})
    assert unconverged(LAYOUT, verdict, {"q": 2, "k": 0, "v": 1, "o": 0, "up": 3}) == ["q", "v"]


def _fitted(seed: int, width: int = 12, k: int = 3):
    state = new_state(width, k, None, seed=seed)
    update_many([state], [torch.randn(40, width, generator=torch.Generator().manual_seed(seed))])
    update_many([state], [torch.randn(40, width, generator=torch.Generator().manual_seed(seed + 100))])
    return state


def test_agreement_wire_form_sums_each_owners_row():
    owners, caps = ["a", "b", "c"], {"a": 3, "b": 2, "c": 3}
    a, b = _fitted(0), _fitted(1, k=2)
    rank0 = Agreement.local({"a": a}, tokens=7).pack(owners, 3)
    rank1 = Agreement.local({"b": b, "c": new_state(12, 3, None, seed=2)}, tokens=5).pack(owners, 3)
    agreed = Agreement.unpack(rank0 + rank1, owners, 3, caps)
    assert agreed.tokens == 12 and set(agreed.ratios) == {"a", "b"}  # c is not fitted yet
    assert torch.allclose(agreed.ratios["a"], a.explained_variance_ratio()[:3])
    assert torch.allclose(agreed.ratios["b"], b.explained_variance_ratio()[:2])
    assert torch.allclose(agreed.similar["b"], b.similarity)


def test_collectively_agrees_values_and_raises_the_error():
    comm = Comm()
    with collectively(comm, values=lambda: torch.tensor([1.0, 2.0])) as shared:
        pass
    assert torch.equal(shared.values, torch.tensor([1.0, 2.0]))
    ran = []
    with pytest.raises(DataError, match="bad row"):
        with collectively(comm, DataError("bad row")):
            ran.append(True)  # the block still runs (it is where the others' collectives would be)
    assert ran
    with pytest.raises(ValueError, match="inside"):
        with collectively(comm, values=lambda: torch.zeros(2)):
            raise ValueError("inside")


def test_state_meta_round_trip_keeps_unknown_keys_and_recomputes_patterns():
    meta = StateMeta(r=4, lora_alpha=8.0, ranks={"a": 4, "b": 2, "c": 0}, in_features={"a": 8, "b": 8, "c": 8},
                     layer_r={"a": 4, "b": 4, "c": 4}, layer_alpha={"a": 8.0, "b": 8.0, "c": 16.0},
                     extra={"source": "peft"}).with_patterns()
    assert meta.rank_pattern == {"b": 2, "c": 0}
    assert meta.alpha_pattern == {"b": 4.0, "c": 0.0}  # alpha * rank / r, so alpha / rank stays lora_alpha / r
    raw = meta.to_dict()
    assert raw["source"] == "peft" and "extra" not in raw and raw["format_version"] == FORMAT_VERSION
    assert StateMeta.from_dict(raw) == meta
    assert migrate(dict(raw)) == raw


def test_snapshot_loop_is_json_and_round_trips():
    import json

    snap = Snapshot(3, 120, LAYOUT, {"q": 2, "k": 2, "v": 2, "o": 1, "up": 0},
                    Verdict({"q": True, "o": False, "up": True}, {"q": 2, "up": 0}),
                    {"q": [0.5, 0.2]}, {"q": [1.0, 0.9]})
    loop = json.loads(json.dumps(snap.loop()))
    assert loop["progress"]["groups"] == [["q", "k", "v"], ["o"], ["up"]]
    assert Snapshot.from_loop(loop, {}) == snap


def test_layers_come_back_only_where_ranks_move_or_converged_layers_are_refined():
    assert not layers_come_back(1.0, False)
    assert layers_come_back(1.5, False) and layers_come_back(1.0, True)
    # why rho 1 is safe: every layer's cap is r, and the budget (r per layer) hands each exactly its cap
    caps = component_caps({"a": 4, "b": 4}, 1.0, {"a": 16, "b": 16})
    layout = Layout.of([["a"], ["b"]], ["a", "b"])
    for ratios in ({"a": [0.9] * 8, "b": [0.01] * 8}, {"a": [0.01] * 8, "b": [0.9] * 8}):
        assert allocate(ratios, layout, 8, caps, ["a", "b"]) == {"a": 4, "b": 4}
