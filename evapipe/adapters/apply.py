"""Apply an EVA state: base model -> trainable PEFT LoRA model with lora_A = the state's components, lora_B = 0.

Because B = 0 the adapted model starts out computing exactly what the base model computes. Before the model is
touched the state is checked against it (every layer present, same shapes, same architecture fingerprint), so a
state can never be silently applied to the wrong model.

PEFT interop: `apply_eva_state` also takes the dict PEFT's `get_eva_state_dict` returns, and `to_peft_state_dict`
gives PEFT's `initialize_lora_eva_weights` the keys it looks up, so nobody renames keys by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.config import ModelConfig
from ..core.distributed import local_device
from ..core.errors import ConfigError, StateError
from ..core.names import module_name
from ..core.remote import is_url
from ..eva.budget import pattern_value, scaled_alpha
from ..model.loading import class_traits, load_model, model_fingerprint
from ..model.targets import TRAINED_HEADS, linear_shape
from ..states.assemble import state_from_inits
from ..states.metadata import StateMeta
from ..states.state import PEFT_PREFIX, EvaState, make_public, read_metadata, strip_peft_prefix
from ..states.statecache import load_state
from .experts import check_experts, expert_keys, load_expert_components, parameter_alphas, parameter_ranks

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

StateLike = EvaState | str | os.PathLike | Mapping[str, torch.Tensor]

HEAD_CLASSES = ("ForImageClassification", "ForAudioClassification")  # classifiers without a PEFT task type
PROVENANCE_FILE = "evapipe.json"
PROVENANCE_KEYS = ("method", "corda_method", "task", "r", "lora_alpha", "rho", "tau", "whiten", "adjust_scaling_factors", "target_modules",
                   "batches", "tokens", "model", "dataset", "versions", "created")
MAX_NAMED = 5  # offending layers named in an error


def as_state(state: StateLike, lora_config: LoraConfig | None = None) -> EvaState:
    """An EvaState from a state object, a state file path, or a PEFT `get_eva_state_dict` result."""
    if isinstance(state, EvaState):
        return state
    if isinstance(state, (str, os.PathLike)):
        return load_for_apply(state)
    if isinstance(state, Mapping):
        return state_from_peft(state, lora_config)
    raise TypeError(f"expected an EvaState, a state file path or a {{module name: A}} dict, got {type(state).__name__}")


def load_for_apply(path: str | os.PathLike) -> EvaState:
    """A state file as apply needs it: with its spectrum only when it has experts (their blocks' extra rows)."""
    return load_state(path, with_spectrum=bool(read_metadata(path).get("experts")))


def state_from_peft(state_dict: Mapping[str, torch.Tensor], lora_config: LoraConfig | None = None) -> EvaState:
    """Wrap PEFT's `get_eva_state_dict` output (keys with or without `base_model.model.`) as an EvaState.

    `lora_config` is the config the dict was computed with: its r, lora_alpha, rank_pattern, alpha_pattern and
    eva_config.adjust_scaling_factors give every layer's alpha exactly as PEFT's own loader would (default:
    LoraConfig()). Such a state has no model fingerprint, so only names and shapes can be checked.
    """
    from peft import LoraConfig

    cfg = lora_config or LoraConfig()
    tensors = strip_peft_prefix(state_dict)
    meta = StateMeta(
        r=cfg.r, lora_alpha=cfg.lora_alpha, task="peft",
        adjust_scaling_factors=cfg.eva_config.adjust_scaling_factors if cfg.eva_config is not None else True,
        ranks={n: int(a.shape[0]) for n, a in tensors.items()},
        in_features={n: int(a.shape[1]) for n, a in tensors.items()},
        layer_r={n: int(pattern_value(cfg.rank_pattern or {}, n, cfg.r)) for n in tensors},
        layer_alpha={n: float(pattern_value(cfg.alpha_pattern or {}, n, cfg.lora_alpha)) for n in tensors},
    )
    return state_from_inits(tensors, meta)


def backbone_prefix(model: nn.Module, state: EvaState) -> str:
    """'' when `model` has the state's layer names; else the prefix under which it holds the model the state was
    computed on (`bert.` when a BertModel's state meets a BertForSequenceClassification), if there is one."""
    names = list(dict.fromkeys(module_name(n) for n in state.layers))  # an expert lives in its experts module
    return held_under(dict(model.named_modules()), names) or ""


def held_under(modules: Collection[str], names: Sequence[str]) -> str | None:
    """The prefix under which `modules` holds every one of `names`: '' when it holds them as they are, None when
    it does not hold them."""
    if all(n in modules for n in names):
        return ""
    for candidate in modules:
        if names and candidate.endswith("." + names[0]):
            prefix = candidate[: -len(names[0])]
            if all(prefix + n in modules for n in names):
                return prefix
    return None


def dropped_prefix(modules: Collection[str], names: Sequence[str]) -> str | None:
    """The leading prefix of `names` that `modules` lacks (`bert.` for a classifier's layers in a BertModel)."""
    parts = names[0].split(".") if names else []
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i]) + "."
        if all(n.startswith(prefix) and n[len(prefix):] in modules for n in names):
            return prefix
    return None


def check_state(model: nn.Module, state: EvaState, force: bool = False, prefix: str = "") -> None:
    """Raise StateError unless the state fits `model`: every layer present and linear, equal shapes, and (unless
    `force`) the architecture fingerprint the state was computed on. `force` never skips a shape check. With a
    `prefix` (see backbone_prefix), the fingerprint is that of the submodule there."""
    modules = dict(model.named_modules())
    problems = check_experts(model, state.meta)
    experts = expert_keys(state.meta)
    for name, rank in state.ranks.items():
        if name in experts:
            continue
        want_in = int(state.meta["in_features"][name])
        module = modules.get(name)
        shape = linear_shape(module) if module is not None else None
        a = state.tensors.get(name)
        if module is None:
            problems.append(f"{name} (not in the model)")
        elif shape is None:
            problems.append(f"{name} (a {type(module).__name__} in the model, not a linear layer)")
        elif shape[0] != want_in:
            problems.append(f"{name} (in_features {shape[0]} in the model, {want_in} in the state)")
        elif rank > 0 and (a is None or tuple(a.shape) != (rank, want_in)):
            got = None if a is None else tuple(a.shape)
            problems.append(f"{name} (A has shape {got}, the metadata says ({rank}, {want_in}))")
    if problems:
        more = f" and {len(problems) - MAX_NAMED} more" if len(problems) > MAX_NAMED else ""
        raise StateError(
            f"the state does not fit this {type(model).__name__}: {len(problems)} of {len(state.ranks)} layers "
            f"mismatch: {'; '.join(problems[:MAX_NAMED])}{more}. {_other_class_hint(modules, state)}"
        )
    src = state.meta.get("model") or {}
    want = src.get("fingerprint")
    if want and not force:
        have = model_fingerprint(model.get_submodule(prefix.rstrip(".")))
        if have != want:
            raise StateError(
                f"architecture fingerprint mismatch: the state was computed on {src.get('id')} "
                f"({src.get('class')}, fingerprint {want}); this model is a {type(model).__name__} with fingerprint "
                f"{have}. Layer names and shapes fit, so --force (force=True) applies it anyway."
            )


def _other_class_hint(modules: Collection[str], state: EvaState) -> str:
    """What to load instead when the state was computed on a task model and this is its bare backbone."""
    prefix = dropped_prefix(modules, state.layers)
    if prefix is None:
        return "Was it computed on another model or model class?"
    src = state.meta.get("model") or {}
    return (f"The state was computed on a {src.get('class') or 'task model'} (kind {src.get('kind') or '?'}), which "
            f"holds these layers under `{prefix}`; load that class (evapipe apply --kind {src.get('kind') or '...'}).")


def check_not_cpu_packed(model: nn.Module) -> None:
    """Refuse a 4-bit model whose weights bitsandbytes repacked for CPU inference.

    On a CPU with AVX512-bf16, bitsandbytes (0.50) repacks a Linear4bit's weight at its first eval-mode forward
    without grad (as an EVA computation on that model does). Reading the state_dict afterwards, as every adapter
    save does, unpacks it with a transposed absmax, which silently corrupts the base weights for every later forward.
    """
    packed = [n for n, m in model.named_modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    if packed:
        raise StateError(
            f"{len(packed)} 4-bit layers (first: {packed[0]}) were repacked by bitsandbytes for CPU inference (the "
            "model already ran in eval mode without grad); saving an adapter would then corrupt the base weights. "
            "Load the model again and apply the state to the fresh load."
        )


def check_trainable_heads(model: nn.Module, config: LoraConfig) -> None:
    """Refuse a quantized module that PEFT would train in full (modules_to_save; a SEQ_CLS model's classifier or
    score head): PEFT fails on it deep inside with "only Tensors of floating point dtype can require gradients"."""
    names = set(config.modules_to_save or []) | (set(TRAINED_HEADS) if config.task_type == "SEQ_CLS" else set())
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.split(".")[-1] in names and isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            raise ConfigError(
                f"`{name}` is bitsandbytes-quantized, but PEFT trains it in full (modules_to_save). Load the model "
                f"with BitsAndBytesConfig(..., llm_int8_skip_modules={sorted(names)}) to keep it in full precision "
                "(`evapipe apply` does this for seq-cls and image-cls models)."
            )


def task_type_of(model: nn.Module) -> str | None:
    """PEFT task_type for the model's class (None for classes PEFT has no task for, e.g. image classifiers)."""
    return class_traits(type(model).__name__)[1]


def task_heads(model: nn.Module) -> list[str]:
    """The new head of a classifier that PEFT has no task type for (image, audio): it must train in full
    (modules_to_save), as PEFT's SEQ_CLS task does for text classifiers."""
    if not type(model).__name__.endswith(HEAD_CLASSES):
        return []
    return [name for name in TRAINED_HEADS if isinstance(getattr(model, name, None), nn.Module)]


def layer_alphas(state: EvaState, rslora: bool = False) -> dict[str, float]:
    """Every layer's lora_alpha: the state's (scaling alpha / rank kept at lora_alpha / r with
    adjust_scaling_factors), or for rsLoRA alpha * sqrt(rank / r), which keeps alpha / sqrt(rank) at
    lora_alpha / sqrt(r) (adjust_scaling_factors off: each layer's own alpha, scaling alpha / sqrt(rank))."""
    meta, ranks = state.meta, state.ranks
    if not rslora:
        alphas = meta.get("alpha_pattern") or {}
        return {n: alphas.get(n, meta["lora_alpha"]) for n in ranks}
    if "layer_alpha" not in meta or "layer_r" not in meta:
        raise StateError("the state lacks per-layer r and alpha (layer_r, layer_alpha), which rsLoRA scaling needs")
    adjust = meta.get("adjust_scaling_factors", True)
    return {n: scaled_alpha(meta["layer_alpha"][n], k, meta["layer_r"][n], adjust, rslora=True)
            for n, k in ranks.items()}


def lora_config_for(state: EvaState, model: nn.Module, base: LoraConfig | None = None, *, use_dora: bool = False,
                    use_rslora: bool = False) -> LoraConfig:
    """The LoraConfig a state describes, on top of `base` (dropout, bias, modules_to_save ... are kept).

    target_modules is the exact list of layers with rank > 0. PEFT also matches a list entry against the end of
    longer names, so any other module whose name ends in a target's full name is put in exclude_modules.
    rank_pattern / alpha_pattern keys match exactly one full name each (see exact_key; PEFT matches them as regexes
    on the end of a name). DoRA and rsLoRA are on when asked here or in `base`. Expert parameters go to
    target_parameters, with one r and alpha per parameter (see evapipe.adapters.experts).
    """
    from peft import LoraConfig

    meta, ranks = state.meta, state.ranks
    experts = expert_keys(meta)
    targets = [n for n, k in ranks.items() if k > 0 and n not in experts]
    p_ranks = {p: k for p, k in parameter_ranks(ranks, meta).items() if k > 0}
    if not targets and not p_ranks:
        raise StateError("every layer of the state has rank 0: there is nothing to adapt")
    wanted = set(targets)
    r, alpha = int(meta["r"]), meta["lora_alpha"]
    use_dora = use_dora or bool(base and base.use_dora)
    use_rslora = use_rslora or bool(base and base.use_rslora)
    p_alphas = {p: a for p, a in parameter_alphas(ranks, meta, use_rslora).items() if p in p_ranks}
    alphas = layer_alphas(state, use_rslora)
    collateral = [n for n, _ in model.named_modules() if n not in wanted and _ends_with_any(n, wanted)]
    modules = dict(model.named_modules())
    conv1d = any(type(modules[n]).__name__ == "Conv1D" for n in targets if n in modules)  # GPT-2 stores W as (in, out)
    fields = dict(
        r=r, lora_alpha=alpha, target_modules=targets, exclude_modules=collateral or None, init_lora_weights=True,
        eva_config=None, fan_in_fan_out=conv1d, use_dora=use_dora, use_rslora=use_rslora,
        target_parameters=list(p_ranks) or None,
        rank_pattern=_name_patterns({n: ranks[n] for n in targets} | p_ranks, r),
        alpha_pattern=_name_patterns({n: alphas[n] for n in targets} | p_alphas, alpha),
        modules_to_save=(base.modules_to_save if base else None) or task_heads(model) or None,
    )
    if base is None:
        return LoraConfig(task_type=task_type_of(model), **fields)
    return dataclasses.replace(base, task_type=base.task_type or task_type_of(model), **fields)


def _ends_with_any(name: str, names: set[str]) -> bool:
    """Whether a proper dotted suffix of `name` is in `names` (PEFT's list matching: `x` matches `a.b.x`)."""
    parts = name.split(".")
    return any(".".join(parts[i:]) in names for i in range(1, len(parts)))


def _name_patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """{pattern key of the full name: value} for the layers whose value is not the default, longest name first.

    PEFT takes the first key that matches the end of a name, so a layer whose name ends in another patterned
    layer's full name gets its own key (even at the default value), tried before the shorter one.
    """
    keep = {n for n, v in values.items() if v != default}
    keep |= {n for n in values if _ends_with_any(n, keep)}
    return {exact_key(n): values[n] for n in sorted(keep, key=len, reverse=True)}


def exact_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key that matches exactly `name`, in old and new PEFT alike.

    PEFT >= 0.15 matches a key as `(.*\\.)?KEY$`; PEFT 0.14 as `.*\\.KEY$`, which needs a dot before the key, so a
    plain full name (`encoder.layer.0.attention.self.query`, no dot before it) silently never matches there and the
    layer gets the default r. The key is the name after its first component, with a lookbehind that pins that
    component to the start of the name: both rules then match this name and no other. A one-component name has no
    dot to split at (PEFT 0.14 cannot pattern it at all).
    """
    first, dot, rest = name.partition(".")
    return rf"(?<=^{re.escape(first)}\.){re.escape(rest)}" if dot else re.escape(name)


def apply_eva_state(
    model: nn.Module,
    state: StateLike,
    adapter_name: str = "default",
    force: bool = False,
    lora_config: LoraConfig | None = None,
    *,
    use_dora: bool = False,
    use_rslora: bool = False,
    baseline: bool = False,
) -> PeftModel:
    """Wrap `model` (plain or bitsandbytes 4/8-bit, prepared for k-bit training or not) in a trainable PeftModel
    whose LoRA A are the state's components and B are zero, so it starts equal to the base model.

    `state`: an EvaState, a state file path, or PEFT's `get_eva_state_dict` dict. `lora_config` supplies the other
    LoRA options (lora_dropout, modules_to_save ...) and, for a PEFT dict, the r / alpha it was computed with.
    `use_dora`: DoRA (its magnitude vector starts at the base weight's row norms, so outputs still equal the
    base's); `use_rslora`: rsLoRA, with every layer's scaling kept at lora_alpha / sqrt(r) (see layer_alphas).
    Layers with rank 0 get no adapter. A state computed on a backbone applies to a task model around it (a
    BertModel's state to a BertForSequenceClassification). As with PEFT's get_peft_model, `model` is modified in
    place.

    `baseline`: the very same adapter (targets, per-layer ranks and alphas, heads, DoRA / rsLoRA, expert
    parameters) with PEFT's default init (Kaiming-uniform lora_A, lora_B = 0) instead of the state's components,
    so an A/B comparison of EVA against PEFT's init differs only in lora_A. PEFT draws lora_A from torch's global
    generator: seed it (torch.manual_seed) for a reproducible baseline.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise TypeError(
            "apply_eva_state takes the base model, not a PeftModel; for a PeftModel you built yourself use "
            "peft.initialize_lora_eva_weights(peft_model, eva_state_dict=to_peft_state_dict(state))"
        )
    check_not_cpu_packed(model)
    st = as_state(state, lora_config)
    prefix = backbone_prefix(model, st)
    st = st.under(prefix)
    check_state(model, st, force, prefix)
    config = lora_config_for(st, model, lora_config, use_dora=use_dora, use_rslora=use_rslora)
    check_trainable_heads(model, config)
    with warnings.catch_warnings():  # transformers 5 deprecates the attribute PEFT reads; not the user's to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        # PEFT 0.21 checks rank_pattern / alpha_pattern keys against adapted modules only, and calls the keys of
        # target_parameters (which it does apply) unmatched
        warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match", RuntimeWarning)
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _load_components(peft_model, st, adapter_name, baseline)
    return peft_model


def _load_components(peft_model: PeftModel, state: EvaState, adapter_name: str, baseline: bool = False) -> None:
    """lora_A <- the state's components, lora_B <- 0, after checking PEFT adapted exactly the intended layers
    with the state's ranks (`baseline`: the checks only, PEFT's init stays)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    modules = dict(peft_model.get_base_model().named_modules())
    adapted = {n for n, m in modules.items()
               if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper) and adapter_name in m.lora_A}
    experts = expert_keys(state.meta)
    wanted = {n for n, k in state.ranks.items() if k > 0 and n not in experts}
    if adapted != wanted:
        odd = sorted(adapted ^ wanted)
        raise StateError(f"PEFT adapted a different set of layers than the state names: {', '.join(odd[:MAX_NAMED])}")
    for name in wanted:
        if modules[name].r[adapter_name] != state.ranks[name]:
            raise StateError(f"{name}: PEFT built rank {modules[name].r[adapter_name]}, the state has rank "
                             f"{state.ranks[name]}")
    if not baseline:
        with torch.no_grad():
            for name in wanted:
                weight = modules[name].lora_A[adapter_name].weight
                weight.copy_(state.tensors[name].to(weight.device, weight.dtype))
                modules[name].lora_B[adapter_name].weight.zero_()
    load_expert_components(peft_model, state, adapter_name, baseline)


def to_peft_state_dict(state: StateLike, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """{PeftModel module name: A}, the keys `initialize_lora_eva_weights(peft_model, eva_state_dict=...)` looks
    up; rank-0 layers are zero-row tensors, which PEFT reads as "no adapter". PEFT pops from the dict it is
    given, so every call returns a new one."""
    if isinstance(state, Mapping):
        return {prefix + k: v for k, v in strip_peft_prefix(state).items()}
    return as_state(state).state_dict(prefix)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`, and then only an adapter directory (never any folder)."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if output.is_file():
        raise ConfigError(f"output {output} is a file; give a directory path")
    if not overwrite:
        raise ConfigError(f"output directory {output} already exists; pass --overwrite (overwrite=True) to replace it")
    if not (output / "adapter_config.json").is_file():
        raise ConfigError(f"output directory {output} is not an adapter directory (no adapter_config.json); "
                          "refusing to replace it")


def save_adapter(peft_model: PeftModel, output: str | os.PathLike, state: EvaState, overwrite: bool = False,
                 built_for: Mapping[str, Any] | None = None,
                 write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write the standard PEFT adapter directory (+ evapipe.json provenance) atomically: into a temporary
    sibling folder first, which then replaces `output`, so a crash never leaves a half-written adapter.

    evapipe.json records the state it came from and, under `adapter_for`, the model class and PEFT task type it was
    built for (plus `built_for`: how `evapipe apply` loaded it), which `evapipe check` names when a model differs.

    Over an existing adapter (`overwrite`), only the files the new adapter writes are replaced: everything else in
    the folder (training logs, checkpoints) is carried into the new folder (hard links, no copy) before the swap.
    The old folder waits under a name of its own until the swap is done, so concurrent applies never remove each
    other's. `write_extra(folder)` adds files of the method's own (CorDA's residual model) before the swap.
    """
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    make_public(tmp, 0o777)  # mkdtemp makes it private; the adapter folder should not be
    old = None
    try:
        peft_model.save_pretrained(str(tmp))
        _drop_eva_config(tmp / "adapter_config.json")
        meta = state.meta
        adapter_for = {"class": type(peft_model.get_base_model()).__name__,
                       "task_type": peft_model.active_peft_config.task_type, **(built_for or {})}
        provenance = {k: meta[k] for k in PROVENANCE_KEYS if k in meta} | {"ranks": state.ranks,
                                                                          "adapter_for": adapter_for}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
        if write_extra is not None:
            write_extra(tmp)
        if output.exists():
            _carry_other_files(output, tmp)
            old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".old"))
            os.replace(output, old)  # onto its own empty folder
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return output


def read_provenance(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The evapipe.json of an adapter directory ({} for an adapter evapipe did not write)."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        provenance = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateError(f"{path} is not valid JSON ({err}); write the adapter again (evapipe apply)") from None
    if not isinstance(provenance, dict):
        raise StateError(f"{path} holds a {type(provenance).__name__}, not evapipe's provenance mapping")
    return provenance


def _drop_eva_config(path: Path) -> None:
    """The adapter is plain LoRA (init_lora_weights=True): PEFT's `"eva_config": null` only names a feature that
    PEFT versions without EVA do not know, so it is left out."""
    config = json.loads(path.read_text())
    if config.get("eva_config", 0) is None:
        del config["eva_config"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _carry_other_files(old: Path, new: Path) -> None:
    """Hard-link into `new` every entry of `old` that `new` does not have (what is not the adapter's own)."""
    for item in old.iterdir():
        target = new / item.name
        if target.exists() or target.is_symlink():
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, target, symlinks=True, copy_function=os.link)
        else:
            os.link(item, target, follow_symlinks=False)


def model_config_for(state_path: str | os.PathLike, meta: Mapping[str, Any], model: str | None, kind: str | None,
                     **fields: Any) -> ModelConfig:
    """How to load the model a state is applied to: `model` (loaded as its own architecture, or as `kind`), else
    the model the state was computed on, as the kind it was computed as."""
    source = meta.get("model") or {}
    name = model or source.get("id")
    if not name:
        raise ConfigError(f"{state_path} does not record which model it was computed on; pass --model")
    kind = kind or ("auto" if model else source.get("kind") or "auto")
    return ModelConfig(name_or_path=name, kind=kind, **fields)


def apply_to_directory(
    state_path: str | os.PathLike,
    output: str | os.PathLike,
    model: str | None = None,
    *,
    kind: str | None = None,
    num_labels: int | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    quantization: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str = "auto",
    seed: int = 0,
    force: bool = False,
    overwrite: bool = False,
    baseline: bool = False,
) -> tuple[Path, EvaState]:
    """Load the model the adapter is for, apply the state and write the adapter directory.

    `model`: the model to train, loaded with its own architecture (a saved BertForSequenceClassification keeps its
    head, gets PEFT's SEQ_CLS task and trains the head in full); default: the model the state was computed on, as
    the state's kind. `kind` asks for another class (`seq-cls` on a bare encoder: a new head of `num_labels`,
    initialised with `seed`). A state computed on a backbone applies to a task model around it. Everything is
    checked (output, state file, model fit) before anything is written. `baseline`: the same adapter with PEFT's
    default init (see apply_eva_state), lora_A drawn after the head from `seed`; evapipe.json records which init.
    """
    output = Path(output)
    check_output(output, overwrite)
    state = load_for_apply(state_path)
    cfg = model_config_for(state_path, state.meta, model, kind, revision=revision, dtype=dtype,
                           quantization=quantization, trust_remote_code=trust_remote_code, device=device)
    name = cfg.name_or_path
    torch.manual_seed(seed)  # a new head's init
    base, kind = load_model(cfg, local_device(device), num_labels=num_labels)
    peft_model = apply_eva_state(base, state, force=force, use_dora=use_dora, use_rslora=use_rslora,
                                 baseline=baseline)
    built_for = {"model": name, "revision": revision, "kind": kind, "num_labels": num_labels,
                 "state": str(state_path) if is_url(state_path) else str(Path(state_path).resolve()),
                 "init": "peft-default" if baseline else "eva"}
    return save_adapter(peft_model, output, state, overwrite, built_for), state
