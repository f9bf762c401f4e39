"""EVA's decisions, as plain functions of what every rank agreed on: no model, no process group, no tensors kept.

A driver (the batch-by-batch `EvaRun`, or one that walks a model block by block) asks these after every agreement:

    caps = component_caps(layer_r, rho, in_features, groups)        how many components each PCA must deliver
    ranks = allocate(ratios, layout, budget, caps, names)           EVA's rank redistribution (budget.py)
    verdict = judge(owners, ranks, similar, tau, previous, refine)  which PCAs are done (cosine test, sticky rule)
    plan = next_step(verdict, refine)                               which groups the next forward must capture

Every function is deterministic in its arguments, so ranks that agreed on the inputs take the same decisions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import torch

from ..model.layout import Layout, StepPlan, capture_depth
from .budget import distribute_ranks


def component_caps(
    layer_r: Mapping[str, int], rho: float, in_features: Mapping[str, int], groups: Sequence[Sequence[str]] = ()
) -> dict[str, int]:
    """Components each layer's PCA must deliver: round(r * rho), at most in_features; a shared PCA serves its
    largest member, so every member of a group gets the group's largest cap."""
    caps = {n: min(round(r * rho), int(in_features[n])) for n, r in layer_r.items()}
    for g in groups:
        top = max(caps[n] for n in g)
        caps.update({n: top for n in g})
    return caps


def allocate(
    ratios: Mapping[str, torch.Tensor | Sequence[float]], layout: Layout, budget: int, caps: Mapping[str, int],
    names: Sequence[str],
) -> dict[str, int]:
    """Every layer's rank from its PCA's explained-variance ratios (`ratios` keyed by owner), EVA's redistribution.
    A PCA without ratios (an expert no token reached) gets rank 0."""
    owner_of = layout.owner_of
    return distribute_ranks({n: ratios.get(owner_of[n], ()) for n in names}, budget, caps, layout.groups)


def converged(similarity: torch.Tensor | None, needed: int, tau: float) -> bool:
    """Whether a PCA's first `needed` components stopped moving (|cos| with the previous estimate >= tau)."""
    if needed == 0:
        return True
    if similarity is None:
        return False
    return bool((similarity[:needed] >= tau).all())


@dataclass(frozen=True)
class Verdict:
    """Which PCAs are done, and for how many components each last converged (refine_converged's sticky rule)."""

    done: Mapping[str, bool]
    done_at: Mapping[str, int] = field(default_factory=dict)

    @property
    def all_done(self) -> bool:
        return all(self.done.values())

    def undone(self) -> set[str]:
        return {o for o, d in self.done.items() if not d}

    def passed(self) -> set[str]:
        return {o for o, d in self.done.items() if d}


def judge(
    owners: Sequence[str],
    ranks: Mapping[str, int],
    similar: Mapping[str, torch.Tensor],
    tau: float,
    previous: Verdict | None = None,
    refine: bool = False,
) -> Verdict:
    """Each owner's PCA is done when its components up to the rank it now gets passed the cosine test.

    With `refine`, a PCA that converged before for at least as many components as it now needs stays done: the
    refining updates it keeps receiving do not undo that.
    """
    done_at = dict(previous.done_at) if previous is not None else {}
    done = {}
    for o in owners:
        need = ranks[o]
        if refine and need <= done_at.get(o, -1):
            done[o] = True
            continue
        done[o] = converged(similar.get(o), need, tau)
        if done[o]:
            done_at[o] = need
    return Verdict(done, done_at)


def settle_waiting(verdict: Verdict, waiting: AbstractSet[str]) -> Verdict:
    """`waiting`: experts no token has reached yet (rank 0). They wait for one while other PCAs still run, then are
    done too: an expert the data never routes to must not hold the job."""
    others = [d for o, d in verdict.done.items() if o not in waiting]
    settled = bool(others) and all(others)
    return Verdict({o: (settled if o in waiting else d) for o, d in verdict.done.items()}, verdict.done_at)


def next_step(verdict: Verdict, refine: bool = False) -> StepPlan:
    """The capture plan after a verdict: every undone PCA, plus the done ones when refining them."""
    undone = frozenset(verdict.undone())
    return StepPlan(undone, frozenset(verdict.done) - undone if refine else frozenset())


def fed_at(order: Sequence[str], verdict: Verdict, refine: bool = False) -> set[str]:
    """The PCAs the in-memory loop feeds at the step after `verdict`: the undone ones and, when refining, the done
    ones its pass reaches before the deepest undone one (what a driver that runs the step another way must match)."""
    return capture_depth(order, next_step(verdict, refine))[1]


def layers_come_back(rho: float, refine: bool) -> bool:
    """Whether a PCA the in-memory loop stopped feeding can be needed again at a later step: when ranks move
    (rho > 1, a converged layer's rank can grow past what passed the cosine test) or converged layers are refined
    (a deeper unconverged layer makes the pass reach them again). With rho 1 and no refining, ranks stay put."""
    return rho > 1 or refine


def unconverged(layout: Layout, verdict: Verdict, ranks: Mapping[str, int]) -> list[str]:
    """The layers with a rank whose PCA is not done (what eva.on_unconverged acts on)."""
    return [n for n in layout.members(verdict.undone()) if ranks[n] > 0]
