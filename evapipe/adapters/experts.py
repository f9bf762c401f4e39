"""A state's experts as PEFT `target_parameters` LoRA: one r per parameter, each expert's components in its block.

PEFT's `ParamWrapper` gives a fused expert parameter one `lora_A` = nn.Linear(in_features, r * num_experts) whose
rows `e*r:(e+1)*r` are expert e's, and one r (and alpha) for all experts of that parameter: `rank_pattern` /
`alpha_pattern` reach a parameter (PEFT matches them on `<module>.<parameter>`), never one expert. So a parameter
gets r = the largest rank EVA gave any of its experts, and alpha scaled to that r as for a layer. Expert e's block
holds its own `rank_e` components first; its remaining rows hold its next PCA components (the state's spectrum
keeps round(r * rho) per expert, which is at least that r), and rows no component can fill (an expert that no token
reached, one that saw fewer tokens than r, or a state without its spectrum sidecar) keep PEFT's default LoRA
init. With B = 0 the adapted model starts equal to the base whatever A holds; the extra rows are the trainable
capacity PEFT's single r gives every expert anyway, started where the expert's own data varies most.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.errors import StateError
from ..core.names import expert_key
from ..eva.budget import scaled_alpha
from ..model.experts import expert_shape, is_experts_module
from ..states.assemble import layer_init

if TYPE_CHECKING:
    from ..states.state import EvaState

log = logging.getLogger("evapipe")


def expert_parameters(meta: Mapping) -> dict[str, dict]:
    """{parameter name: {num_experts, in_features, out_features}} of a state (empty for a state without experts)."""
    return dict(meta.get("experts") or {})


def expert_keys(meta: Mapping) -> set[str]:
    return {expert_key(p, e) for p, info in expert_parameters(meta).items() for e in range(info["num_experts"])}


def parameter_ranks(ranks: Mapping[str, int], meta: Mapping) -> dict[str, int]:
    """PEFT's r per expert parameter: the largest of its experts' ranks (0: the parameter is not adapted)."""
    return {p: max(int(ranks[expert_key(p, e)]) for e in range(info["num_experts"]))
            for p, info in expert_parameters(meta).items()}


def parameter_alphas(ranks: Mapping[str, int], meta: Mapping, rslora: bool = False) -> dict[str, float]:
    """PEFT's alpha per expert parameter: its alpha before scaling, scaled to the parameter's r as for a layer
    (by the rsLoRA rule with `rslora`, as apply.layer_alphas does for layers)."""
    out = {}
    for p, r in parameter_ranks(ranks, meta).items():
        first = expert_key(p, 0)
        out[p] = scaled_alpha(float(meta["layer_alpha"][first]), r, int(meta["layer_r"][first]),
                              bool(meta.get("adjust_scaling_factors", True)), rslora=rslora)
    return out


def check_experts(model: nn.Module, meta: Mapping) -> list[str]:
    """What keeps a state's expert parameters from fitting `model` (empty when they fit)."""
    problems = []
    for name, info in expert_parameters(meta).items():
        module_name, _, p_name = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{name} (no module {module_name} in the model)")
            continue
        param = getattr(module, p_name, None)
        if not isinstance(param, torch.Tensor) or not is_experts_module(module) or param.ndim != 3:
            problems.append(f"{name} (not a fused expert parameter of an experts module in the model)")
            continue
        in_f = expert_shape(module, param)[0]
        if (param.shape[0], in_f) != (info["num_experts"], info["in_features"]):
            problems.append(f"{name} ({param.shape[0]} experts of in_features {in_f} in the model, "
                            f"{info['num_experts']} of {info['in_features']} in the state)")
    return problems


def param_wrappers(peft_model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """{parameter name in the base model: PEFT ParamWrapper holding `adapter_name`} (nested wrappers unwrapped)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, ParamWrapper) and adapter_name in module.lora_A:
            base = ".".join(part for part in name.split(".") if part != "base_layer")
            out[f"{base}.{module.parameter_name}"] = module
    return out


def expert_block(state: EvaState, key: str, rank: int, r: int) -> torch.Tensor | None:
    """Rows rank..r of expert `key`'s lora_A block: its next components from the spectrum (whitened as the state),
    stopping at the first row the spectrum cannot fill (none kept, or a zero row: fewer tokens than components)."""
    if f"{key}.components" not in state.spectrum or r <= rank:
        return None
    rows = layer_init(state.spectrum, key, r, bool(state.meta.get("whiten")))[rank:]
    n = int((rows.norm(dim=1) > 0).long().cumprod(0).sum())
    return rows[:n] if n else None


def load_expert_components(peft_model: nn.Module, state: EvaState, adapter_name: str, baseline: bool = False) -> None:
    """Each adapted expert parameter's lora_A blocks <- its experts' components (module docstring), lora_B <- 0.
    `baseline`: only check that PEFT built the state's expert ranks, and keep PEFT's default init."""
    meta, ranks = state.meta, state.ranks
    wanted = {p: r for p, r in parameter_ranks(ranks, meta).items() if r > 0}
    wrappers = param_wrappers(peft_model, adapter_name)
    if set(wrappers) != set(wanted):
        odd = sorted(set(wrappers) ^ set(wanted))
        raise StateError(f"PEFT adapted a different set of expert parameters than the state names: {', '.join(odd[:5])}")
    for p, r in wanted.items():
        if wrappers[p].r[adapter_name] != r:
            raise StateError(f"{p}: PEFT built rank {wrappers[p].r[adapter_name]}, the state's experts need {r}")
    if baseline:
        return
    if wanted and not state.spectrum:
        log.warning("the state's spectrum sidecar is missing: expert rows beyond each expert's own rank keep PEFT's "
                    "default init")
    with torch.no_grad():
        for p, r in wanted.items():
            layer = wrappers[p]
            weight = layer.lora_A[adapter_name].weight
            blocks = weight.view(layer.num_experts, r, weight.shape[-1])
            for e in range(layer.num_experts):
                key = expert_key(p, e)
                rank = int(ranks[key])
                if rank > 0:
                    blocks[e, :rank] = state.tensors[key].to(weight.device, weight.dtype)
                extra = expert_block(state, key, rank, r)
                if extra is not None:
                    blocks[e, rank : rank + extra.shape[0]] = extra.to(weight.device, weight.dtype)
            layer.lora_B[adapter_name].weight.zero_()
