"""Layer names as EVA keys them: a module's name, or one expert of a fused parameter as `param[e]`.

Plain string rules, no torch: the budget, the state file, apply and the experts code all name layers this way.
"""

from __future__ import annotations

import re

_KEY = re.compile(r"^(.*)\[(\d+)\]$")


def expert_key(parameter_name: str, expert: int) -> str:
    """The EVA layer name of one expert of a fused parameter: `model.layers.0.mlp.experts.down_proj[5]`."""
    return f"{parameter_name}[{expert}]"


def split_key(name: str) -> tuple[str, int] | None:
    """(parameter name, expert) of an expert key; None for a module name."""
    m = _KEY.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def pattern_name(name: str) -> str:
    """The name rank_pattern / alpha_pattern keys are matched against: an expert's parameter, PEFT's current_key."""
    parts = split_key(name)
    return name if parts is None else parts[0]


def module_name(name: str) -> str:
    """The module a target lives in: the layer itself, or an expert's experts module."""
    parts = split_key(name)
    return name if parts is None else parts[0].rpartition(".")[0]
