"""Apply a CorDA state: base model -> trainable PEFT LoRA model + the residual base it must be trained on.

CorDA, as PEFT's corda_init builds it, gives each target layer lora_A = sqrt(S / scaling) V^T and lora_B =
U sqrt(S / scaling) (corda_decompose.adapter_weights) and takes their product out of the base weight: W_res =
W - scaling B A. The adapted model computes what the base computed, but on W_res, not W. So an adapter directory
alone is not enough to train: `apply_corda_to_directory` writes

    OUTPUT/adapter_config.json, adapter_model.safetensors   the adapter at init (init_lora_weights: true, so loading
                                                            it never runs CorDA again), evapipe.json (provenance)
    OUTPUT/residual_model/                                  the base model with W_res in the target layers, and its
                                                            tokenizer: train PeftModel.from_pretrained(this, OUTPUT)

To merge after training: merge into the residual model (W_res + scaling B' A' = W + the learnt change). To use the
trained adapter on the original base instead, PEFT converts it to plain LoRA: save_pretrained(...,
path_initial_model_for_weight_conversion=OUTPUT) (this init adapter), which needs init_lora_weights true in it, as
written here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..corda.decompose import Eigens, adapter_weights
from ..core.distributed import local_device
from ..core.errors import StateError
from ..model.loading import load_model, load_processor, model_fingerprint
from ..model.targets import linear_shape
from ..states.corda_state import CordaState, load_corda_state
from ..states.state import EvaState
from .apply import check_output, lora_config_for, model_config_for, save_adapter

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

RESIDUAL_DIR = "residual_model"


def check_corda_state(model: nn.Module, state: CordaState, force: bool = False) -> None:
    """Raise StateError unless every layer of the state is a linear layer of `model` with the state's shape and
    (unless `force`) the model has the architecture the state was computed on."""
    modules = dict(model.named_modules())
    problems = []
    for name in state.layers:
        shape = linear_shape(modules[name]) if name in modules else None
        want = (state.meta["in_features"][name], state.meta["out_features"][name])
        if shape is None:
            problems.append(f"{name} ({'not in the model' if name not in modules else 'not a linear layer'})")
        elif tuple(shape) != want:
            problems.append(f"{name} (in x out {shape[0]} x {shape[1]} in the model, {want[0]} x {want[1]} in the "
                            "state)")
    if problems:
        raise StateError(f"the CorDA state does not fit this {type(model).__name__}: {'; '.join(problems[:5])}"
                         + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
    src = state.meta.get("model") or {}
    want_fp = src.get("fingerprint")
    if want_fp and not force and model_fingerprint(model) != want_fp:
        raise StateError(f"architecture fingerprint mismatch: the state was computed on {src.get('id')} "
                         f"({src.get('class')}); this is a {type(model).__name__}. CorDA's residual is computed "
                         "from the weights the state was decomposed from: --force (force=True) applies it anyway.")


def lora_layout(state: CordaState) -> EvaState:
    """The per-layer ranks and alphas of a CorDA state in the form apply.lora_config_for reads (every layer at r,
    alpha lora_alpha), so both methods build their LoraConfig by the same rules."""
    r, alpha = int(state.meta["r"]), float(state.meta["lora_alpha"])
    names = state.layers
    return EvaState({}, {"r": r, "lora_alpha": alpha, "ranks": state.ranks, "alpha_pattern": {}, "rank_pattern": {},
                         "layer_r": {n: r for n in names}, "layer_alpha": {n: alpha for n in names}})


def apply_corda_state(model: nn.Module, state: CordaState | str | os.PathLike, adapter_name: str = "default",
                      force: bool = False, lora_config: LoraConfig | None = None) -> PeftModel:
    """Wrap `model` in a trainable PeftModel with CorDA's lora_A / lora_B, and turn its target weights into the
    residual W - scaling B A (in place, as PEFT's get_peft_model with init_lora_weights="corda" does). The model
    then computes what it computed before. `lora_config` supplies the other LoRA options (dropout, bias ...)."""
    from peft import get_peft_model

    st = state if isinstance(state, CordaState) else load_corda_state(state)
    check_corda_state(model, st, force)
    config = lora_config_for(lora_layout(st), model, lora_config)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    modules = dict(peft_model.get_base_model().named_modules())
    with torch.no_grad():
        for name in st.layers:
            layer = modules[name]
            s, u, v = st.eigens(name)
            scaling = layer.scaling[adapter_name]
            a, b = adapter_weights(Eigens(s, u, v), scaling)
            lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            lora_a.copy_(a.to(lora_a.device, lora_a.dtype))
            lora_b.copy_(b.to(lora_b.device, lora_b.dtype))
            base = layer.get_base_layer().weight
            delta = scaling * (b @ a)
            if type(layer.get_base_layer()).__name__ == "Conv1D":  # stored (in, out)
                delta = delta.T
            base.copy_((base.float() - delta.to(base.device)).to(base.dtype))
    return peft_model


def apply_corda_to_directory(state_path: str | os.PathLike, output: str | os.PathLike, model: str | None = None, *,
                             dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False,
                             device: str = "auto", force: bool = False,
                             overwrite: bool = False) -> tuple[Path, CordaState]:
    """Load the model the state was computed on (or `model`), apply the state and write the adapter directory with
    the residual model in it (see the module docstring). Everything is checked before anything is written."""
    output = Path(output)
    check_output(output, overwrite)
    state = load_corda_state(state_path)
    cfg = model_config_for(state_path, state.meta, model, None, revision=revision, dtype=dtype,
                           trust_remote_code=trust_remote_code, device=device)
    name = cfg.name_or_path
    base, kind = load_model(cfg, local_device(device))
    processor = load_processor(cfg, kind)
    peft_model = apply_corda_state(base, state, force=force)

    def write_residual(folder: Path) -> None:
        residual = peft_model.unload()  # the base model with W_res, without the LoRA layers
        residual.save_pretrained(folder / RESIDUAL_DIR)
        processor.save_pretrained(folder / RESIDUAL_DIR)

    built_for: dict[str, Any] = {"model": name, "revision": revision, "kind": kind,
                                 "state": str(Path(state_path).resolve()), "residual_model": RESIDUAL_DIR}
    return save_adapter(peft_model, output, state, overwrite, built_for, write_extra=write_residual), state
