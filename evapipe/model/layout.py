"""What a capture pass works from: the target layout (shared-input groups, owner first, and the order a forward
reaches the layers) and the step plan (which PCAs the next pass must feed, and how deep it must go).

Plain values, no model and no tensors: the drivers agree on them across ranks and the statistics' planning
(eva/planning.py) decides them; capture and forward passes only read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Which target layers share one PCA (shared-input groups, owner first) and the order a forward reaches them."""

    groups: tuple[tuple[str, ...], ...]
    order: tuple[str, ...] = ()

    @classmethod
    def of(cls, groups: Sequence[Sequence[str]], order: Sequence[str] = ()) -> Layout:
        return cls(tuple(tuple(g) for g in groups), tuple(order))

    @property
    def owners(self) -> list[str]:
        return [g[0] for g in self.groups]

    @property
    def owner_of(self) -> dict[str, str]:
        return {n: g[0] for g in self.groups for n in g}

    @property
    def shared(self) -> list[list[str]]:
        """The groups of more than one layer (what a state records as `shared_inputs`)."""
        return [list(g) for g in self.groups if len(g) > 1]

    def members(self, owners: AbstractSet[str]) -> list[str]:
        """Every layer of the given owners' groups, in group order."""
        return [n for g in self.groups if g[0] in owners for n in g]


def groups_with_singles(shared: Sequence[Sequence[str]], names: Sequence[str]) -> list[list[str]]:
    """Every layer's PCA group (owner first): the shared-input groups plus one group per other layer."""
    grouped = [list(g) for g in shared]
    seen = {n for g in grouped for n in g}
    return grouped + [[n] for n in names if n not in seen]


@dataclass(frozen=True)
class StepPlan:
    """What the next forward pass needs: the PCAs it must update, and those it may refine if the pass reaches them
    before the deepest needed layer anyway (refine_converged)."""

    needed: frozenset[str]
    refine: frozenset[str] = frozenset()

    @property
    def finished(self) -> bool:
        return not self.needed


def capture_depth(order: Sequence[str], plan: StepPlan) -> tuple[str | None, set[str]]:
    """The layer after which a forward pass can stop (the deepest needed one in execution order; None: run it
    whole) and the layers whose input it keeps (the needed ones, and the refined ones reached before that)."""
    deepest = [n for n in order if n in plan.needed]
    if not deepest:
        return None, set(plan.needed)
    reached = set(order[: order.index(deepest[-1]) + 1])
    return deepest[-1], set(plan.needed) | (reached & plan.refine)
