"""Which layers EVA targets: PEFT's target_modules / exclude_modules rules over nn.Linear and GPT-2 Conv1D.

Under all-linear the output head and the linear routers of mixture-of-experts blocks are left out.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from ..core.errors import ConfigError
from .experts import router_names

TRAINED_HEADS = ("classifier", "score")  # the heads PEFT's SEQ_CLS task trains in full (modules_to_save)
OUTPUT_HEAD_NAMES = ("lm_head", *TRAINED_HEADS, "cls", "qa_outputs")


@dataclass(frozen=True)
class Target:
    name: str
    in_features: int
    out_features: int


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like module; bitsandbytes Linear4bit/8bit subclass nn.Linear and keep these attrs."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return module.weight.shape[0], module.nf
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Modules that produce the model's outputs (LM head, classifier): never EVA targets under all-linear."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out or (name.split(".")[0] in OUTPUT_HEAD_NAMES and linear_shape(module) is not None):
            heads.add(name)
    return heads


def _matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith(f".{key}") for key in spec)


def resolve_targets(
    model: nn.Module, target_modules: list[str] | str, exclude_modules: list[str] | str | None = None,
    key: str = "eva.target_modules",
) -> list[Target]:
    """Target layers in model order; an entry that matches nothing is an error that lists near names (naming the
    config `key` they came from). An empty list is no layer (a job that targets only expert parameters)."""
    if isinstance(target_modules, list) and not target_modules:
        return []
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    heads = output_head_names(model) | router_names(model) if all_linear else set()
    found: list[Target] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None:
            continue
        linear_names.append(name)
        if exclude_modules and _matches(exclude_modules, name):
            continue
        if (all_linear and name not in heads) or (not all_linear and _matches(target_modules, name)):
            found.append(Target(name, shape[0], shape[1]))
    left_in = " that eva.exclude_modules leaves in" if exclude_modules else ""
    if isinstance(target_modules, list):
        for entry in target_modules:
            if not any(_matches([entry], t.name) for t in found):
                suffixes = sorted({n.split(".")[-1] for n in linear_names} | {".".join(n.split(".")[-2:]) for n in linear_names})
                hint = difflib.get_close_matches(entry, suffixes, n=3, cutoff=0.4)
                raise ConfigError(
                    f"`{key}` entry `{entry}` matches no linear layer of the model{left_in}"
                    + (f" (closest: {', '.join(hint)})" if hint else f"; linear layers end in: {', '.join(suffixes[:12])}")
                )
    if not found:
        # a regex gets the nearest full names (what it is matched against), so the user sees what to write
        hint = [] if all_linear else difflib.get_close_matches(target_modules, linear_names, n=3, cutoff=0.0)
        raise ConfigError(
            f"`{key}` {target_modules!r} matches no linear layer of the model{left_in}"
            + (f" (closest: {', '.join(hint)})" if hint else "")
        )
    return found
