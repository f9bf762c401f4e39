"""What every EVA step shares across ranks, typed: each PCA's explained-variance ratios and cosine similarities
(known on its owner only) and the number of tokens all ranks counted.

On the wire it is one float64 vector summed over ranks (one all-reduce per step, with the error flag of
`distributed.collectively`): a row per PCA that only its owner fills, `[ratios | similarities | fitted]`, each
part `width` wide (the largest PCA's component count), then the token count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .ipca import PCAState


@dataclass
class Agreement:
    """Ratios and similarities per fitted PCA (keyed by owner layer), and tokens counted this step."""

    ratios: dict[str, torch.Tensor] = field(default_factory=dict)
    similar: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    @classmethod
    def local(cls, states: Mapping[str, PCAState], tokens: int) -> Agreement:
        """This rank's part: the PCAs it owns (fitted ones only) and the tokens it counted."""
        ratios, similar = {}, {}
        for o, s in states.items():
            if s.fitted:
                k = s.n_components
                ratios[o] = s.explained_variance_ratio()[:k]
                similar[o] = torch.full((k,), -1.0) if s.similarity is None else s.similarity
        return cls(ratios, similar, tokens)

    def pack(self, owners: Sequence[str], width: int) -> torch.Tensor:
        table = torch.zeros(len(owners), 2 * width + 1, dtype=torch.float64)
        for i, o in enumerate(owners):
            if o in self.ratios:
                k = self.ratios[o].shape[0]
                table[i, :k] = self.ratios[o].double().cpu()
                table[i, width : width + k] = self.similar[o].double().cpu()
                table[i, -1] = 1.0
        return torch.cat([table.reshape(-1), torch.tensor([float(self.tokens)], dtype=torch.float64)])

    @classmethod
    def unpack(cls, values: torch.Tensor, owners: Sequence[str], width: int, caps: Mapping[str, int]) -> Agreement:
        """The summed vector back as an Agreement; `caps` gives each PCA's component count."""
        table = values[:-1].reshape(len(owners), 2 * width + 1)
        ratios, similar = {}, {}
        for i, o in enumerate(owners):
            if table[i, -1] > 0:
                ratios[o] = table[i, : caps[o]].float()
                similar[o] = table[i, width : width + caps[o]].float()
        return cls(ratios, similar, int(values[-1]))
