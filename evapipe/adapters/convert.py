"""PEFT interop: PEFT-style EVA state dicts (`torch.save`d {module name: A}) <-> evapipe state files.

PEFT's `get_eva_state_dict` returns keys with or without `base_model.model.` (depending on whether it was given a
PeftModel) and no metadata. Reading one, the prefix is stripped and what the dict cannot say (r, lora_alpha, rho,
tau, whiten, the task, the model) comes from options, with PEFT's defaults where PEFT has one; explained variance
and the spectrum are unknown, so such a state can be applied and inspected but not re-budgeted. Writing one gives
the keys `initialize_lora_eva_weights(peft_model, eva_state_dict=...)` looks up (prefixed, unless asked not to).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError, StateError, require_path
from ..core.remote import is_url, location, name_of
from ..states.metadata import versions
from ..states.remote_store import save_state, write_file
from ..states.state import PEFT_PREFIX, EvaState, refuse_existing
from ..states.statecache import load_state
from .apply import state_from_peft, to_peft_state_dict

STATE_SUFFIX = ".safetensors"


def load_peft_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d {module name: A (rank, in_features)} dict, checked; anything else raises StateError."""
    path = require_path(path, "PEFT state dict", StateError)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for foreign, truncated or unsafe files
        why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"  # torch's run to a dozen lines
        raise StateError(f"{path} is not a readable torch.save file of tensors ({why})") from None
    if not isinstance(obj, Mapping) or not obj:
        raise StateError(f"{path} holds a {type(obj).__name__}, not a non-empty {{module name: tensor}} dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.ndim != 2]
    if bad:
        raise StateError(f"{path}: entries {bad[:3]} are not 2-D tensors (rank x in_features) keyed by module name")
    return dict(obj)


def peft_to_state(
    state_dict: Mapping[str, torch.Tensor],
    *,
    r: int,
    lora_alpha: float = 8.0,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    adjust_scaling_factors: bool = True,
    use_label_mask: bool = True,
    label_mask_value: int = -100,
    task: str = "default",
    model: str | None = None,
) -> EvaState:
    """An evapipe state from a PEFT EVA state dict and the settings it was computed with (PEFT's defaults)."""
    from peft import EvaConfig, LoraConfig

    try:
        eva = EvaConfig(rho=rho, tau=tau, use_label_mask=use_label_mask, label_mask_value=label_mask_value,
                        whiten=whiten, adjust_scaling_factors=adjust_scaling_factors)
        cfg = LoraConfig(r=r, lora_alpha=lora_alpha, init_lora_weights="eva", eva_config=eva)
    except ValueError as err:
        raise ConfigError(f"invalid PEFT settings: {err}") from None
    state = state_from_peft(state_dict, cfg)
    ranks = state.ranks
    meta = replace(
        state.metadata, task=task, rho=rho, tau=tau, whiten=whiten, use_label_mask=use_label_mask,
        label_mask_value=label_mask_value, target_modules=list(ranks), layer_alpha={n: float(lora_alpha) for n in ranks},
        max_components=dict(ranks), explained_variance={n: [] for n in ranks}, singular_values={n: [] for n in ranks},
        converged={n: True for n in ranks}, model={"id": model}, dataset={"id": None}, versions=versions("peft"),
        extra={"source": "peft"},
    )
    return EvaState(state.tensors, meta.to_dict())


def state_to_peft(state: EvaState, prefix: bool = True) -> dict[str, torch.Tensor]:
    """{module name: A} for PEFT (rank-0 layers as zero-row tensors, which PEFT reads as "no adapter")."""
    return to_peft_state_dict(state, PEFT_PREFIX if prefix else "")


def convert_file(src: str | Path, dst: str | Path, prefix: bool = True, overwrite: bool = False,
                 **settings: Any) -> EvaState:
    """`evapipe convert`: the direction follows the file names (`.safetensors` = evapipe state, else PEFT dict).

    evapipe -> PEFT writes `torch.save(state_to_peft(...))`; PEFT -> evapipe needs `settings` (at least r). An
    existing `dst` is replaced only with `overwrite`. An evapipe state may be read from a URL and either kind
    written to one (a PEFT file is read from a path). Returns the state converted (read or written).
    """
    src, dst = location(src), location(dst)
    if str(dst) == str(src) or (isinstance(dst, Path) and isinstance(src, Path) and dst.resolve() == src.resolve()):
        raise ConfigError(f"convert reads {src} and cannot write over it; give another DST")
    if not is_url(dst):
        refuse_existing(dst, overwrite)
    to_state = name_of(dst).endswith(STATE_SUFFIX)
    if to_state == name_of(src).endswith(STATE_SUFFIX):
        kind = "evapipe states (.safetensors)" if to_state else "PEFT state dicts"
        raise ConfigError(f"both {src} and {dst} are {kind}; convert turns one kind into the other "
                          "(evapipe: .safetensors, PEFT: .pt/.pth/.bin)")
    if to_state:
        if settings.get("r") is None:
            raise ConfigError("a PEFT state dict does not record r: pass --r (the LoraConfig r it was computed with)")
        state = peft_to_state(load_peft_file(src), **{k: v for k, v in settings.items() if v is not None})
        save_state(state, dst, overwrite)
        return state
    state = load_state(src, with_spectrum=False)
    write_file(dst, lambda tmp: torch.save(state_to_peft(state, prefix), tmp), overwrite)
    return state
