"""EVA for mixture-of-experts parameters: what each expert of a fused experts module reads.

In transformers >= 5 a sparse MoE block's experts are one module with fused 3-D parameters (`gate_up_proj`:
experts x 2*intermediate x hidden, `down_proj`: experts x hidden x intermediate; transposed in some models) whose
forward receives `(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights)`, whichever expert kernel
(eager, grouped_mm, batched_mm ...) then runs. PEFT adapts them through `target_parameters`, one `lora_A` block of r
rows per expert. An expert sees only the tokens routed to it, which no hook on a module's input can tell apart, so
a forward pre-hook on the experts module reads the routing itself and produces, per expert e:

* for `gate_up_proj` (or `up_proj` of an ungated expert): the hidden states of the tokens whose top-k holds e;
* for `down_proj`: the expert's own intermediate activation act(gate) * up for those tokens, recomputed from the
  expert's weights exactly as the experts module computes it (its `_apply_gate`, bias and layout).

Each expert of each targeted parameter is its own EVA "layer", named `<module>.<parameter>[<expert>]`
(`model.layers.0.mlp.experts.gate_up_proj[3]`), with its own incremental PCA in the engine's budget and
convergence machinery. `rank_pattern` / `alpha_pattern` keys match the parameter's name (PEFT's `current_key`), so
every expert of a parameter has the same r before redistribution.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.names import expert_key, split_key

if TYPE_CHECKING:
    from .capture import ExpertsFn, TokenSelector

INPUT_PARAMETERS = ("gate_up_proj", "up_proj")  # multiply the routed hidden states
INTERMEDIATE_PARAMETERS = ("down_proj",)  # multiply act(gate) * up of the routed hidden states


@dataclass(frozen=True)
class ExpertParam:
    """One targeted fused expert parameter: `module.parameter`, `num_experts` experts of (in -> out) each."""

    module: str
    parameter: str
    num_experts: int
    in_features: int
    out_features: int
    share: float  # expected fraction of the tokens each expert receives (top_k / experts): sizes its PCA's cost

    @property
    def name(self) -> str:
        return f"{self.module}.{self.parameter}" if self.module else self.parameter

    def keys(self) -> list[str]:
        return [expert_key(self.name, e) for e in range(self.num_experts)]


def is_experts_module(module: nn.Module) -> bool:
    """A fused experts module: `num_experts` and at least one 3-D parameter with that many experts."""
    n = getattr(module, "num_experts", None)
    return isinstance(n, int) and any(
        p.ndim == 3 and p.shape[0] == n for p in module.parameters(recurse=False)
    )


def expert_shape(module: nn.Module, param: torch.Tensor) -> tuple[int, int]:
    """(in_features, out_features) of one expert of a fused parameter: (experts, out, in), or (experts, in, out) in
    the transposed layout some models use (PEFT's ParamWrapper reads it the same way)."""
    transposed = bool(getattr(module, "is_transposed", False))
    return (int(param.shape[1]), int(param.shape[2])) if transposed else (int(param.shape[2]), int(param.shape[1]))


def _matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith(f".{entry}")  # PEFT's target_parameters rule


def resolve_expert_params(model: nn.Module, target_parameters: Sequence[str] | None) -> list[ExpertParam]:
    """The fused expert parameters `target_parameters` names (PEFT semantics: full name or dotted suffix), in
    model order; an entry that matches nothing, or a parameter evapipe cannot take inputs for, is an error."""
    if not target_parameters:
        return []
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    found: list[ExpertParam] = []
    all_names: list[str] = []
    for module_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{p_name}" if module_name else p_name
            all_names.append(full)
            if not any(_matches(entry, full) for entry in target_parameters):
                continue
            if not is_experts_module(module) or param.ndim != 3:
                raise ConfigError(
                    f"`eva.target_parameters` matches `{full}` ({tuple(param.shape)} in a {type(module).__name__}), "
                    "which is not a fused expert parameter (experts x out x in) of a mixture-of-experts experts module"
                )
            if p_name not in INPUT_PARAMETERS + INTERMEDIATE_PARAMETERS:
                raise ConfigError(
                    f"`eva.target_parameters`: evapipe knows what the experts' "
                    f"{'/'.join(INPUT_PARAMETERS + INTERMEDIATE_PARAMETERS)} multiply, not `{full}`"
                )
            n = int(param.shape[0])
            in_f, out_f = expert_shape(module, param)
            found.append(ExpertParam(module_name, p_name, n, in_f, out_f, min(1.0, (top_k or 1) / n)))
    for entry in target_parameters:
        if not any(_matches(entry, p.name) for p in found):
            suffixes = sorted({".".join(n.split(".")[-k:]) for n in all_names for k in (1, 2, 3)})
            hint = difflib.get_close_matches(entry, suffixes, n=3, cutoff=0.5)
            raise ConfigError(
                f"`eva.target_parameters` entry `{entry}` matches no parameter of the model"
                + (f" (closest: {', '.join(hint)})" if hint else "")
            )
    return found


def router_names(model: nn.Module) -> set[str]:
    """Linear routers beside experts modules (a child whose outputs are one logit per expert): never EVA targets
    under all-linear, as they are not LoRA targets in any MoE recipe and their output picks the experts."""
    routers: set[str] = set()
    for name, module in model.named_modules():
        experts = [c for c in module.children() if is_experts_module(c)]
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and any(child.out_features == e.num_experts for e in experts):
                routers.add(f"{name}.{child_name}" if name else child_name)
    return routers


def routing_args(args: tuple, kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [tokens, hidden], top_k_index [tokens, k]) from an experts module's call."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, index


def intermediate(module: nn.Module, experts: Sequence[int], rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What the down projections of `experts` multiply for their `rows`: act(gate) * up (or act(up) when ungated),
    computed as the transformers experts kernels do (bias, transposed layout, the module's own gating).

    One product per expert, on a view of the fused weight: the router feeds experts unevenly, and one batched
    product over rows padded to the busiest expert did three times the work (and copied the weights of a subset)."""
    gated = getattr(module, "has_gate", hasattr(module, "gate_up_proj"))
    p_name = "gate_up_proj" if gated else "up_proj"
    w = getattr(module, p_name)
    transposed = getattr(module, "is_transposed", False)
    bias = getattr(module, f"{p_name}_bias", None) if getattr(module, "has_bias", False) else None
    out = []
    for e, x in zip(experts, rows):
        h = x.to(w.dtype) @ (w[e] if transposed else w[e].mT)
        if bias is not None:
            h = h + bias[e]
        out.append(_activate(module, h, gated))
    return out


def _activate(module: nn.Module, h: torch.Tensor, gated: bool) -> torch.Tensor:
    if not gated:
        return module.act_fn(h)
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def routed_inputs(
    module: nn.Module,
    params: Mapping[str, Sequence[str]],
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    keep: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """{expert key: rows} for the wanted keys of one experts module call.

    `params` maps a parameter name to the expert keys wanted of it (index = expert); `keep` is the flat index of the
    tokens that count (attention / label mask), None for all. Rows are in token order; an expert that no counted
    token reaches gets a (0, in_features) tensor. One stable sort of the (token, choice) pairs by expert groups
    every expert's rows at once (views of one gathered tensor).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = top_k_index.reshape(hidden.shape[0], -1)
    if keep is not None:
        hidden, index = hidden.index_select(0, keep), index.index_select(0, keep)
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=module.num_experts).tolist()
    groups = hidden.index_select(0, order // index.shape[1]).split(counts)
    inner = sorted({split_key(k)[1] for p, keys in params.items() if p in INTERMEDIATE_PARAMETERS for k in keys})
    acts: dict[int, torch.Tensor] = {}
    if inner:
        acts = dict(zip(inner, intermediate(module, inner, [groups[e] for e in inner])))
    out: dict[str, torch.Tensor] = {}
    for p_name, keys in params.items():
        for key in keys:
            e = split_key(key)[1]
            out[key] = acts[e] if p_name in INTERMEDIATE_PARAMETERS else groups[e]
    return out


class ExpertHooks:
    """The capture side of the targeted expert parameters: for each experts module, its expert keys and the
    function Capture's hook on that module calls (see capture.ExpertsFn). `tokens` is the number of counted tokens
    the last experts module call saw (what a forward pass counted when only experts are captured)."""

    def __init__(self, params: Sequence[ExpertParam]):
        self.params = list(params)
        self.tokens = 0
        by_module: dict[str, list[ExpertParam]] = {}
        for p in self.params:
            by_module.setdefault(p.module, []).append(p)
        self.modules = by_module

    @property
    def keys(self) -> list[str]:
        return [k for p in self.params for k in p.keys()]

    def spec(self) -> dict[str, tuple[list[str], ExpertsFn]]:
        """{experts module name: (its expert keys, the rows function)} for Capture."""
        return {m: ([k for p in ps for k in p.keys()], self._rows_fn(ps)) for m, ps in self.modules.items()}

    def _rows_fn(self, params: Sequence[ExpertParam]) -> ExpertsFn:
        def rows(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], wanted: AbstractSet[str],
                 selector: TokenSelector | None) -> dict[str, torch.Tensor]:
            hidden, index = routing_args(args, kwargs)
            keys = {p.parameter: [k for k in p.keys() if k in wanted] for p in params}
            keep = selector.flat_index(hidden, next(iter(wanted))) if selector is not None else None
            self.tokens = int(hidden.shape[0] if keep is None else keep.numel())
            return routed_inputs(module, {p: ks for p, ks in keys.items() if ks}, hidden, index, keep)

        return rows


def model_order(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Layer names and expert keys in model order (an experts module's keys at its place, parameter by parameter,
    expert by expert), so owners, seeds and budget tie-breaks follow the model whatever the target lists say."""
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    param_pos = {}
    for n, module in model.named_modules():
        for j, (p, _) in enumerate(module.named_parameters(recurse=False)):
            param_pos[f"{n}.{p}" if n else p] = j

    def key(name: str) -> tuple[int, int, int]:
        parts = split_key(name)
        if parts is None:
            return position[name], -1, 0
        module = parts[0].rpartition(".")[0]
        return position[module], param_pos[parts[0]], parts[1]

    return sorted(names, key=key)
