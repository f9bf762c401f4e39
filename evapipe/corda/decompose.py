"""CorDA's decomposition of one layer, and of every layer on the rank that owns its covariance.

PEFT (collect_eigens_for_layer, crop_corda_eigens) decomposes W C, where W is the (out, in) weight and C the input
covariance made invertible: C + damp * mean(diag C) * I, damp starting at 0.01 and doubling until C times its
inverse is within 0.05 (Frobenius) of the identity. SVD(W C) = U S Vh; V = (Vh C^-1)^T, so U S V^T = W exactly.
`ipm` keeps the r largest singular triplets as the adapter, `kpm` the r smallest. The adapter PEFT builds from them
(`adapter_weights`) takes U S V^T's r-part out of W and puts it in B A, so the model computes what it did.

The work is divided: every rank decomposes the layers of the covariance groups it owns, on its own device, and only
the cropped triplets (r columns) travel to rank 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import CordaMethod
from ..core.errors import ConfigError, DataError
from ..model.targets import linear_shape

INITIAL_DAMP = 0.01
INVERSE_TOLERANCE = 0.05
MAX_DOUBLINGS = 64  # damp reaches 0.01 * 2^64: a covariance no damping makes invertible is not one


@dataclass
class Eigens:
    """One layer's cropped decomposition, PEFT's CordaEigens fields: S (r,), U (out, r), V (in, r)."""

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor

    def to(self, device: torch.device | str) -> Eigens:
        return Eigens(self.S.to(device), self.U.to(device), self.V.to(device))


def damped_inverse(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C + damping, its inverse) with PEFT's damping schedule (see the module docstring)."""
    n = covariance.shape[0]
    eye = torch.eye(n, device=covariance.device)
    mean_diag = torch.mean(torch.diag(covariance))
    damp = INITIAL_DAMP
    for _ in range(MAX_DOUBLINGS):
        fixed = covariance + torch.diag(torch.ones(n, device=covariance.device) * mean_diag * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < INVERSE_TOLERANCE:
            return fixed, inverse
        damp *= 2
    raise DataError("a covariance stays singular under any damping (all its inputs zero?)")


def decompose(weight: torch.Tensor, covariance: torch.Tensor, r: int, method: CordaMethod) -> Eigens:
    """CorDA's cropped decomposition of an (out, in) weight under its input covariance, in float32 on the
    covariance's device."""
    w = weight.to(covariance.device, torch.float32)
    fixed, inverse = damped_inverse(covariance.float())
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inverse).T
    if r > s.shape[0]:
        raise ConfigError(f"corda.r {r} is larger than the layer's smaller side {s.shape[0]}")
    part = slice(None, r) if method == "ipm" else slice(s.shape[0] - r, None)
    return Eigens(s[part].clone(), u[:, part].clone(), v[:, part].clone())


def layer_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as (out, in); GPT-2's Conv1D stores it transposed."""
    weight = module.weight
    if weight.device.type == "meta":
        raise ConfigError("a target layer's weight is not in memory (offloaded to disk?); CorDA needs every "
                          "target's weight on a GPU or the CPU")
    return weight.T if type(module).__name__ == "Conv1D" else weight


def adapter_weights(eigens: Eigens, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r, in), lora_B (out, r)) PEFT's corda_init builds: sqrt(S / scaling) split between V^T and U, so
    scaling * B A = U S V^T (the part taken out of the base weight)."""
    root = (eigens.S.float() / scaling).sqrt()
    return (eigens.V.float().T * root.view(-1, 1)).contiguous(), (eigens.U.float() * root).contiguous()


def decompose_owned(model: nn.Module, groups: Iterable[Iterable[str]], covariances: Mapping[str, torch.Tensor],
                    r: int, method: CordaMethod) -> dict[str, Eigens]:
    """Every member of the groups whose covariance this rank holds (keyed by group owner), decomposed here; the
    results on the CPU (they go to rank 0)."""
    out = {}
    for group in groups:
        group = list(group)
        if group[0] not in covariances:
            continue
        for name in group:
            module = model.get_submodule(name)
            if linear_shape(module) is None:
                raise ConfigError(f"{name} is not a linear layer")
            out[name] = decompose(layer_weight(module), covariances[group[0]], r, method).to("cpu")
    return out
