"""Will an adapter directory load onto a model? Checked by name and shape, before anyone trains.

PEFT's `from_pretrained` only warns when an adapter's keys are not in the model. A BertModel adapter (keys
`encoder.layer.…`) loaded onto a BertForSequenceClassification (layers under `bert.`) finds none of them: every
lora_A keeps PEFT's random init, the adapter's FEATURE_EXTRACTION task leaves the classifier frozen, and the user
trains the default init without knowing. `check_adapter` refuses such a pair and says which adapter to write.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core.config import ModelConfig
from ..core.errors import ConfigError, StateError, require_path
from ..model.loading import model_kind, model_skeleton
from ..model.targets import linear_shape
from ..states.state import read_header
from .apply import dropped_prefix, held_under, read_provenance, task_type_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(\.weight)?$")
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")  # PEFT task types that train the model's head in full
MAX_NAMED = 3


@dataclass(frozen=True)
class AdapterFit:
    """What PEFT will build when it loads the adapter onto the model."""

    model_class: str
    task_type: str | None
    lora_layers: int
    trained_in_full: list[str]  # modules_to_save whose weights the adapter carries (a task head)


def adapter_shapes(adapter_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{key without PEFT's `base_model.model.`: shape} of the adapter's weights, read from the file's header
    (checked against the file's size, so a truncated or foreign file is a StateError), without loading them."""
    path = adapter_file(adapter_dir, ADAPTER_WEIGHTS)
    try:
        header = read_header(path)
    except StateError as err:
        raise StateError(f"{err}; write the adapter again (evapipe apply)") from None
    return {k.removeprefix(PEFT_KEY_PREFIX): tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def adapter_file(adapter_dir: str | os.PathLike, name: str) -> Path:
    """A file of an adapter directory, or a ConfigError naming what is missing (the folder, or the file in it)."""
    folder = require_path(adapter_dir, "adapter directory", ConfigError, directory=True)
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"{adapter_dir} has no {name}; is it a PEFT adapter directory?")
    return path


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """adapter_config.json as a mapping; a file that is not JSON, or not a LoRA config, is a StateError."""
    path = adapter_file(adapter_dir, ADAPTER_CONFIG)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateError(f"{path} is not valid JSON ({err}); write the adapter again (evapipe apply)") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise StateError(f"{path} is not a LoRA adapter config (peft_type {kind!r}); evapipe checks LoRA adapters")
    return config


def check_adapter(adapter_dir: str | os.PathLike, model: nn.Module, model_spec: str | None = None) -> AdapterFit:
    """Raise StateError unless every weight of the adapter loads onto `model` (same names, same shapes) and,
    for a model with a task head PEFT trains (SEQ_CLS, TOKEN_CLS, QUESTION_ANS), the adapter is for that task.
    The error says which `evapipe apply` writes an adapter that fits (`model_spec`: the model as the user named
    it, e.g. `org/model --kind seq-cls --num-labels 3`). `model` may be on the meta device."""
    config = read_adapter_config(adapter_dir)
    shapes = adapter_shapes(adapter_dir)
    built = (read_provenance(adapter_dir).get("adapter_for") or {})
    cls = type(model).__name__
    hint = _rewrite_hint(built.get("state"), model_spec)
    lora: dict[str, dict[str, tuple[int, ...]]] = {}
    other: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        match = LORA_KEY.match(key)
        if match:
            lora.setdefault(match["module"], {})[match["part"]] = shape
        else:
            other[key] = shape
    modules = dict(model.named_modules())
    names = sorted(lora)
    missing = [n for n in names if n not in modules]
    if missing:
        raise StateError(_missing_message(names, missing, modules, cls, built, hint))
    problems = []
    for name in names:
        problems += _lora_shape_problems(name, lora[name], linear_shape(modules[name]), modules[name])
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, shape in other.items():
        have = tuple(tensors[key].shape) if key in tensors else None
        if have != shape:
            where = "not in the model" if have is None else f"{have} in the model"
            head = key.split(".")[0] in (config.get("modules_to_save") or []) and have is not None and shape
            labels = f": a head of {shape[0]} labels, load the model with --num-labels {shape[0]}" if head else ""
            problems.append(f"{key} ({shape} in the adapter, {where}{labels})")
    if problems:
        raise StateError(f"{adapter_dir} does not fit this {cls}: {'; '.join(problems[:MAX_NAMED])}"
                         f"{_more(problems)}. {hint}")
    task = config.get("task_type")
    want = task_type_of(model)
    if want in HEAD_TASKS and task != want:
        made_for = built.get("class") or "another model class"
        raise StateError(
            f"{adapter_dir} is a {task} adapter (written for a {made_for}); PEFT would load it onto this {cls} "
            f"without its task head: the head would stay frozen, never trained. {hint}")
    full = sorted({k.rsplit(".", 1)[0] for k in other})
    return AdapterFit(cls, task, len(names), full)


def _lora_shape_problems(name: str, parts: dict[str, tuple[int, ...]], shape: tuple[int, int] | None,
                         module: nn.Module) -> list[str]:
    if shape is None:
        return [f"{name} (a {type(module).__name__} in the model, not a linear layer)"]
    n_in, n_out = shape
    a, b, magnitude = parts.get("lora_A"), parts.get("lora_B"), parts.get("lora_magnitude_vector")
    out = []
    if a is not None and a[1:] != (n_in,):
        out.append(f"{name} (lora_A {a}, in_features {n_in} in the model)")
    if b is not None and b[:1] != (n_out,):
        out.append(f"{name} (lora_B {b}, out_features {n_out} in the model)")
    if magnitude is not None and magnitude != (n_out,):
        out.append(f"{name} (DoRA magnitude {magnitude}, out_features {n_out} in the model)")
    return out


def _missing_message(names: list[str], missing: list[str], modules: Collection[str], cls: str, built: dict,
                     hint: str) -> str:

    made_for = built.get("class") or "another model class"
    prefix = held_under(modules, names)
    if prefix:
        why = (f"this {cls} holds the adapter's layers under `{prefix}` (the adapter was written for a {made_for}), "
               "so PEFT would load none of its lora_A and train its random init instead.")
    elif (dropped := dropped_prefix(modules, names)) is not None:
        why = (f"the adapter holds its layers under `{dropped}` (it was written for a {made_for}); this {cls} has "
               f"them without it.")
    else:
        why = f"{len(missing)} of {len(names)} adapted layers are not in this {cls}: {', '.join(missing[:MAX_NAMED])}"
        why += _more(missing) + "."
    return f"the adapter's keys would not load: {why} {hint}"


def _more(items: list) -> str:
    return f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""


def _rewrite_hint(state: str | None, model_spec: str | None) -> str:
    return (f"Write an adapter for this model: evapipe apply --state {state or 'STATE'} --model "
            f"{model_spec or 'MODEL'} --output NEW_DIR")


def check_adapter_dir(
    adapter_dir: str | os.PathLike,
    model: str | None = None,
    *,
    kind: str | None = None,
    num_labels: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> AdapterFit:
    """`evapipe check`: build `model` (default: the model the adapter was written for, as the class it was
    written for) on the meta device, as `evapipe apply` would load it, and check the adapter against it."""
    config = read_adapter_config(adapter_dir)
    built = read_provenance(adapter_dir).get("adapter_for") or {}
    name = model or built.get("model") or config.get("base_model_name_or_path")
    if not name:
        raise ConfigError(f"{adapter_dir} does not record its base model; pass --model")
    if model is None:
        kind = kind or built.get("kind")
        num_labels = num_labels if num_labels is not None else built.get("num_labels")
    cfg = ModelConfig(name_or_path=name, revision=revision or (built.get("revision") if model is None else None),
                      kind=kind or "auto", trust_remote_code=trust_remote_code)
    skeleton, kind = model_skeleton(cfg, num_labels)
    spec = name + (f" --kind {kind}" if kind != model_kind(skeleton.config, "auto") else "")
    spec += f" --num-labels {num_labels}" if num_labels is not None else ""
    return check_adapter(adapter_dir, skeleton, spec)
