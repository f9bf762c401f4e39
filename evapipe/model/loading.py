"""Loading the frozen base model (optionally bitsandbytes-quantized) and its tokenizer or image processor."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import nn

from ..core.config import ModelConfig
from ..core.errors import ConfigError
from ..core.sources import VOLATILE_CONFIG_KEYS, resolve_model_path
from .memory import check_budget, check_writable
from .onload import BlockModel, empty_model, refuse_unsupported
from .targets import TRAINED_HEADS, linear_shape

log = logging.getLogger("evapipe")

KIND_AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "seq-cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "image-cls": "AutoModelForImageClassification",
}


# model class-name suffix -> (evapipe model kind, PEFT task_type); the first match wins ("LMHeadModel" before "Model")
CLASS_SUFFIXES = (
    (("ForCausalLM", "LMHeadModel"), "causal-lm", "CAUSAL_LM"),
    (("ForSequenceClassification",), "seq-cls", "SEQ_CLS"),
    (("ForTokenClassification",), "encoder", "TOKEN_CLS"),
    (("ForQuestionAnswering",), "encoder", "QUESTION_ANS"),
    (("ForConditionalGeneration", "ForSeq2SeqLM"), "encoder", "SEQ_2_SEQ_LM"),
    (("ForImageClassification",), "image-cls", None),
    (("Model",), "encoder", "FEATURE_EXTRACTION"),
)
IMAGE_MODEL_TYPES = ("vit", "deit", "beit", "swin")


def class_traits(class_name: str) -> tuple[str, str | None]:
    """(evapipe kind, PEFT task_type or None) a model class name implies; ("encoder", None) when it says nothing."""
    for suffixes, kind, task in CLASS_SUFFIXES:
        if class_name.endswith(suffixes):
            return kind, task
    return "encoder", None


def model_kind(config: Any, requested: str) -> str:
    """The model kind: as configured, or guessed from the architecture name and config type."""
    if requested != "auto":
        return requested
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    kind, _ = class_traits((getattr(config, "architectures", None) or [""])[0])
    if kind == "encoder" and getattr(config, "model_type", "") in IMAGE_MODEL_TYPES:
        return "image-cls"
    return kind


def model_class(config: Any, kind: str) -> Any:
    """The class named by the config's `architectures` when transformers has it and it fits the kind."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is not None and model_kind(config, "auto") == kind:
        return cls
    return getattr(transformers, KIND_AUTO_CLASS[kind])


HEAD_KINDS = ("seq-cls", "image-cls")  # kinds whose task head a quantized load keeps in full precision


def _quantization(cfg: ModelConfig, dtype: torch.dtype, kind: str) -> Any:
    """The BitsAndBytesConfig for `cfg.quantization`, or None.

    Task heads (classifier / score) stay unquantized: transformers only skips a head whose last parameter is a
    weight, so a head with a bias (RoBERTa, DeBERTa, ViT) would be quantized and PEFT's SEQ_CLS modules_to_save
    fails on it ("only Tensors of floating point dtype can require gradients").
    """
    if cfg.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.quantization needs bitsandbytes: pip install 'evapipe[bnb]'") from None
    skip = list(TRAINED_HEADS) if kind in HEAD_KINDS else None
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _resolve(cfg: ModelConfig, num_labels: int | None, path: str | None = None) -> tuple[str, Any, str, Any]:
    """(local path or hub id, transformers config, kind, model class) for `cfg`; `num_labels` sizes a new head;
    `path` is where the model already lies, when the caller fetched it."""
    from transformers import AutoConfig

    path = path or resolve_model_path(cfg.name_or_path)
    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        hf_config = AutoConfig.from_pretrained(path, **kw)
    except OSError as err:
        raise ConfigError(f"cannot load model config from `{cfg.name_or_path}`: {err}") from None
    kind = model_kind(hf_config, cfg.kind)
    if num_labels is not None:
        check_num_labels(hf_config, kind, num_labels)
        hf_config.num_labels = num_labels
    return path, hf_config, kind, model_class(hf_config, kind)


def check_num_labels(hf_config: Any, kind: str, num_labels: int) -> None:
    """`num_labels` sizes a new classifier head: only for classifier kinds, and never unlike a trained head's."""
    arch = (getattr(hf_config, "architectures", None) or [""])[0]
    if kind not in HEAD_KINDS:
        raise ConfigError(f"--num-labels (num_labels) sizes a classifier head; model kind {kind} has none "
                          f"(ask for one with --kind {' or --kind '.join(HEAD_KINDS)})")
    if num_labels < 1:
        raise ConfigError(f"--num-labels must be at least 1, got {num_labels}")
    if model_kind(hf_config, "auto") == kind and hf_config.num_labels != num_labels:
        raise ConfigError(f"the model is a {arch} with {hf_config.num_labels} labels, not {num_labels}; leave out "
                          "--num-labels to keep its trained head")


def load_model(cfg: ModelConfig, device: torch.device, num_labels: int | None = None) -> tuple[nn.Module, str]:
    """The frozen model in eval mode on `device`, and its kind. `num_labels` sizes the new head of a classifier
    kind loaded from a checkpoint without one (a bare encoder loaded as seq-cls)."""
    path, hf_config, kind, cls = _resolve(cfg, num_labels)
    dtype = getattr(torch, cfg.dtype)
    quant = _quantization(cfg, dtype, kind)
    load_kw: dict[str, Any] = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                   config=hf_config)
    if quant is not None:
        load_kw.update(quantization_config=quant, device_map={"": device})
    if cfg.offload == "device_map":
        load_kw.update(device_map_kwargs(cfg, cls, hf_config, dtype))
    model = cls.from_pretrained(path, **load_kw)
    if quant is None and cfg.offload == "none":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, kind


def model_skeleton(cfg: ModelConfig, num_labels: int | None = None) -> tuple[nn.Module, str]:
    """The model `load_model` would load, built on the meta device: every module's name and shape, and no weight
    read from disk or held in memory."""
    _, hf_config, kind, cls = _resolve(cfg, num_labels)
    return empty_model(cls, hf_config, getattr(torch, cfg.dtype), cfg.trust_remote_code), kind


def load_blocks(cfg: ModelConfig, device: torch.device) -> tuple[Any, str]:
    """The model for model.offload: sequential -- built without weights, what runs before its first block loaded
    on `device`, its blocks left in the checkpoint (onload.BlockModel) -- and its kind."""
    _, hf_config, kind, cls = _resolve(cfg, None)
    refuse_unsupported(hf_config)  # from the config alone: before the checkpoint is fetched or read
    folder = local_checkpoint(cfg)
    dtype = getattr(torch, cfg.dtype)
    model = empty_model(cls, hf_config, dtype)
    if cfg.max_memory is not None:
        check_budget(cfg.max_memory, model)
    return BlockModel(model, folder, device, dtype), kind


def local_checkpoint(cfg: ModelConfig) -> str:
    """The folder holding the model's config and safetensors files: a local directory, or the hub snapshot of
    those files only (no other weight formats are fetched)."""
    from pathlib import Path

    path = resolve_model_path(cfg.name_or_path)
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=cfg.revision, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:  # offline without a cached copy, unknown id, no access
        raise ConfigError(f"cannot fetch `{cfg.name_or_path}` for model.offload: sequential: {err}") from None


def device_map_kwargs(cfg: ModelConfig, cls: Any, hf_config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained's big-model-inference arguments, with the budget and offload folder checked first."""
    kw: dict[str, Any] = {"device_map": cfg.device_map or "auto"}
    if cfg.max_memory is not None:
        check_budget(cfg.max_memory, empty_model(cls, hf_config, dtype))
        # YAML may spell GPU indices as strings; accelerate wants them as ints
        kw["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in cfg.max_memory.items()}
    if cfg.offload_folder is not None:
        kw["offload_folder"] = str(check_writable(cfg.offload_folder, "model.offload_folder"))
    return kw


def load_processor(cfg: ModelConfig, kind: str) -> Any:
    """Tokenizer for text kinds, image processor for image-cls (both saved beside the model)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    auto = AutoImageProcessor if kind == "image-cls" else AutoTokenizer
    try:
        processor = auto.from_pretrained(path, **kw)
    except (OSError, ValueError) as err:
        what = "image processor (preprocessor_config.json)" if kind == "image-cls" else "tokenizer"
        raise ConfigError(f"`{cfg.name_or_path}` has no {what} for model.kind {kind}: {err}") from None
    if kind != "image-cls" and processor.pad_token is None:
        processor.pad_token = processor.eos_token if processor.eos_token is not None else processor.unk_token
    return processor


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture (config + every linear/embedding module's name and logical shape).

    Logical shapes (in/out features), not stored weight shapes, so a 4-bit or 8-bit load of a model has the same
    fingerprint as its full-precision load.
    """
    cfg = getattr(model, "config", None)
    cfg_dict = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    cfg_dict = {k: v for k, v in sorted(cfg_dict.items()) if k not in VOLATILE_CONFIG_KEYS}
    shapes = []
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None and isinstance(module, nn.Embedding):
            shape = (module.num_embeddings, module.embedding_dim)
        if shape is not None:
            shapes.append((name, *shape))
    payload = json.dumps([cfg_dict, shapes], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def model_info(model: nn.Module, name_or_path: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """The `model` metadata of a state: where it came from, its class and architecture fingerprint."""
    cfg = getattr(model, "config", None)
    return {
        "id": name_or_path or getattr(cfg, "_name_or_path", None) or type(model).__name__,
        "revision": revision,
        "class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "fingerprint": model_fingerprint(model),
    }
