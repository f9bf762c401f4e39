"""Sequential onloading: run a model bigger than memory one repeated block at a time.

llm-compressor's calibration swaps the two loops of a forward pass (`for block: for batch:` instead of
`for batch: for block:`), so only one block's weights live on the device while the batches' hidden states wait in
host memory. This module holds the parts of that, independent of EVA:

* `WeightFiles`: the checkpoint's safetensors files, read tensor by tensor (memory-mapped) for one block at a time;
* `BlockModel`: the model built on the meta device (no weights; computed buffers such as rotary inverse frequencies
  are computed, not loaded) and its repeated block list; what lies outside the blocks (embeddings) is materialised
  while batches run up to the first block, and released while the blocks run;
* `BlockModel.block_calls`: every block's own call arguments for a batch (the first block's hidden states, and each
  block's other arguments: its layer type's attention mask and rotary `position_embeddings`, position ids ...),
  recorded in one pass in which stand-ins that return their hidden-state input replace the blocks' forwards, so no
  block runs; models that vary those arguments per block (Gemma 3, gpt-oss, Cohere 2 layer types) or mix block classes
  (Jamba's attention and state-space blocks) are fed as their own forward feeds them;
* `BlockModel.onloaded(i)`: block i materialised from the checkpoint on the compute device, then released to meta.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from .forward import to_device

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightFiles:
    """Tensor name -> safetensors shard of a `save_pretrained` folder; reads only the tensors asked for."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index, single = folder / INDEX_FILE, folder / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.shard = {name: folder / shard for name, shard in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                self.shard = {name: single for name in f.keys()}
        else:
            found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            extra = f" (it holds {', '.join(found[:3])}: convert them with save_pretrained(..., " \
                    "safe_serialization=True))" if found else ""
            raise ConfigError(
                f"model.offload: sequential reads weights from safetensors files, and {folder} has neither "
                f"{SINGLE_FILE} nor {INDEX_FILE}{extra}"
            )

    def read(self, names: Mapping[str, Source], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{local name: tensor} for {local name: checkpoint key, or the tensors transformers builds it from}; floats
        cast to dtype.

        On the CPU, a tensor stored in `dtype` is a view of the memory-mapped shard, not a copy: its memory is the
        file's pages it touches (an embedding lookup touches only the rows it reads), counted until the tensor is
        released. On a GPU safetensors copies it to the device. A converted tensor (fused experts) is a new one.
        """
        out = {}
        for local, source in names.items():
            t = source.build(self, device) if isinstance(source, Converted) else self.tensor(source, device)
            out[local] = t.to(dtype) if t.is_floating_point() else t
        return out

    def tensor(self, key: str, device: torch.device) -> torch.Tensor:
        """One checkpoint tensor as stored."""
        from safetensors import safe_open

        with safe_open(str(self.shard[key]), "pt", device=str(device)) as f:
            return f.get_tensor(key)


@dataclass(frozen=True)
class Converted:
    """A model tensor transformers builds from several checkpoint tensors while loading (Mixtral's and Qwen-MoE's
    per-expert matrices stacked into one fused experts parameter): its name, the converter, and its sources."""

    target: str
    converter: Any  # a transformers WeightConverter, copied for each build
    sources: tuple[tuple[str, str], ...]  # (the converter's source pattern, checkpoint key), in checkpoint order

    def build(self, files: WeightFiles, device: torch.device) -> torch.Tensor:
        from copy import deepcopy

        converter = deepcopy(self.converter)
        for pattern, key in self.sources:
            converter.add_tensor(self.target, key, pattern, files.tensor(key, device))
        built = converter.convert(self.target)
        value = built.get(self.target, next(iter(built.values())))
        return value[0] if isinstance(value, list) else value


Source = str | Converted


def _checkpoint_names(model: nn.Module, files: WeightFiles) -> dict[str, Source]:
    """Each parameter / persistent buffer of the model -> its checkpoint key (or the keys it is built from).

    transformers renames keys while loading (ViT's `attention.attention.query` is `attention.q_proj` in 5.x; a bare
    model's checkpoint under a task model's base-model prefix, or the reverse), and merges some (a MoE block's
    per-expert matrices into fused experts parameters), so its own rules map the checkpoint's keys; a merge stays
    inside one block, so a block is still read alone.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or None
    out: dict[str, Source] = {}
    merged: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(files.shard, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, own)
        if name in own and pattern is not None:
            merged.setdefault(name, []).append((pattern, key))
        elif name in own:
            out[name] = key
    for name, sources in merged.items():
        out[name] = Converted(name, by_pattern[sources[0][0]], tuple(sources))
    return out


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated block list (decoder layers, encoder layers, ViT layers): its name and the list.

    Blocks are the `nn.ModuleList` children whose modules are all of classes transformers names in the model's
    `_no_split_modules` (the unit it never splits across devices; a hybrid stack mixes several); without that
    attribute, the list of one class holding the most parameters.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m).__name__ for m in module}
        if classes <= no_split or (len(classes) == 1 and not no_split):
            found.append((sum(p.numel() for p in module.parameters()), name, module))
    if not found:
        what = f"a list of {' / '.join(sorted(no_split))} modules" if no_split else "an nn.ModuleList of one class"
        raise ConfigError(
            f"model.offload: sequential needs the model's repeated block list, and {type(model).__name__} has no "
            f"{what}; use model.offload: device_map for it"
        )
    found.sort(key=lambda f: -f[0])
    if len(found) > 1 and found[1][0] > 0.1 * found[0][0]:
        raise ConfigError(
            f"model.offload: sequential runs one block list, and {type(model).__name__} has several "
            f"({found[0][1]}, {found[1][1]}): their outputs do not feed each other; use model.offload: device_map"
        )
    return found[0][1], found[0][2]


def refuse_unsupported(config: Any) -> None:
    """What sequential onloading cannot run, refused from the model's config alone (before any weight is read)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            "model.offload: sequential does not support encoder-decoder models: the decoder's blocks need the "
            "encoder's final output, not the previous block's, so two block lists would have to be run in turn with "
            "the encoder's outputs held per batch (the T5 family fits a GPU whole or spread); use model.offload: "
            "device_map"
        )
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise ConfigError(
            f"model.offload: sequential reads each block's tensors as stored, and this checkpoint is quantized "
            f"({method}); use a bf16/fp16 copy of the model, or model.offload: device_map"
        )


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent from musl
    except (AttributeError, OSError):
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    A block's pass frees its activations and PCA work buffers, but the allocator keeps those pages, interleaved
    with what lives on (the round's hidden states, the PCAs): without this, the high-water mark of every block's
    pass stays resident under the next block's weights.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class StopAtBlock(Exception):
    """Raised by the last block's stand-in once every block's call is recorded."""


@dataclass
class BlockInputs:
    """One batch's call into one block: the hidden states (first argument) and the other arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]

    def to(self, device: torch.device) -> BlockInputs:
        return BlockInputs(self.hidden.to(device), to_device(self.args, device), to_device(self.kwargs, device))


@dataclass
class BlockCalls:
    """One batch's calls into every block: the hidden states the next block receives, and each block's other
    arguments. What blocks share (one mask and rotary embedding per layer type) is one object, held once."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict[str, Any]]]

    def to(self, device: torch.device) -> BlockCalls:
        memo: dict[int, torch.Tensor] = {}
        return BlockCalls(self.hidden.to(device), to_device(self.calls, device, memo))

    def inputs(self, i: int, device: torch.device | None = None) -> BlockInputs:
        """Block i's call, with the current hidden states (its other arguments moved to `device` if given)."""
        args, kwargs = self.calls[i]
        call = BlockInputs(self.hidden, args, kwargs)
        return call if device is None else call.to(device)


def _stand_in(calls: list[BlockInputs], last: bool, as_tuple: bool) -> Callable[..., Any]:
    """A block's forward for one pass: records the call and hands its hidden-state input on unchanged."""
    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(BlockInputs(hidden, args, kwargs))
        if last:
            raise StopAtBlock
        return (hidden,) if as_tuple else hidden

    return forward


class BlockModel:
    """A model whose weights stay in its checkpoint: what lies outside the blocks materialised while batches run up to
    the first block (`head`), then each block in turn (`onloaded`)."""

    def __init__(self, model: nn.Module, folder: str | Path, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.files = WeightFiles(folder)
        self.blocks_name, self.blocks = block_list(model)
        self.names = _checkpoint_names(model, self.files)
        in_blocks = {n for n in self.names if n.startswith(f"{self.blocks_name}.")}
        head = getattr(model, "get_output_embeddings", lambda: None)()
        skip = {f"{n}." for n, m in model.named_modules() if m is head and m is not None}
        tied = {id(p) for p in model.get_input_embeddings().parameters()} if head is not None else set()
        if head is not None and any(id(p) in tied for p in head.parameters()):
            skip = set()  # a tied output head shares the input embeddings' weight, loaded anyway
        rest = {n: k for n, k in self.names.items() if n not in in_blocks and not any(n.startswith(s) for s in skip)}
        missing = [n for n, p in model.named_parameters() if n not in self.names
                   and not any(n.startswith(s) for s in skip) and p.device.type == "meta"]
        if missing:
            raise ConfigError(f"the checkpoint in {folder} has no tensor for {len(missing)} parameter(s) of "
                              f"{type(model).__name__}: {', '.join(missing[:4])}")
        self.head_keys = rest
        for name, buf in list(model.named_buffers()):  # computed buffers (rotary inv_freq) move to the device
            if buf.device.type != "meta" and name not in rest:
                self._place(model, {name: buf.to(device)})
        if hasattr(getattr(model, "config", None), "use_cache"):
            model.config.use_cache = False  # blocks must not keep a key/value cache across batches

    @staticmethod
    def _place(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, t in tensors.items():
            set_module_tensor_to_device(module, name, t.device, value=t)

    @contextmanager
    def head(self) -> Iterator[nn.Module]:
        """The model with what lies outside the blocks (embeddings, final norm) materialised, for running batches
        up to the first block; released afterwards, so that it and a block are never held together."""
        self._place(self.model, self.files.read(self.head_keys, self.device, self.dtype))
        try:
            yield self.model
        finally:
            self._release(self.model, self.head_keys)

    @staticmethod
    def _release(module: nn.Module, names: Iterable[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(module, name, "meta")

    def block_keys(self, i: int) -> dict[str, Source]:
        """Block i's tensors: {name inside the block: checkpoint key}."""
        prefix = f"{self.blocks_name}.{i}."
        return {n.removeprefix(prefix): k for n, k in self.names.items() if n.startswith(prefix)}

    @contextmanager
    def onloaded(self, i: int) -> Iterator[nn.Module]:
        """Block i with its weights on the compute device for the duration, released to meta afterwards."""
        block = self.blocks[i]
        keys = self.block_keys(i)
        self._place(block, self.files.read(keys, self.device, self.dtype))
        try:
            yield block
        finally:
            self._release(block, keys)
            trim_heap()

    def block_calls(self, forward: Callable[[], Any]) -> BlockCalls:
        """Run `forward` (the model's own forward on one batch) with stand-ins for the blocks: every block's call.

        A block returns its hidden states (transformers 5) or a tuple that starts with them; the stand-ins try both,
        and a model that does more between blocks than hand one block's output to the next is refused.
        """
        calls: list[BlockInputs] = []
        for as_tuple in (False, True):
            try:
                calls = self._record(forward, as_tuple)
            except Exception:
                if as_tuple:  # the model's own failure, not the stand-ins' return type
                    raise
                continue
            chained = len(calls) == len(self.blocks) and all(b.hidden is a.hidden for a, b in zip(calls, calls[1:]))
            if chained:
                return BlockCalls(calls[0].hidden, [(c.args, c.kwargs) for c in calls])
        raise ConfigError(
            f"model.offload: sequential feeds each block the previous one's output, and {type(self.model).__name__} "
            f"does not (its forward called {len(calls)} of {len(self.blocks)} blocks of {self.blocks_name}, or "
            "changed the hidden states between them); use model.offload: device_map"
        )

    def _record(self, forward: Callable[[], Any], as_tuple: bool) -> list[BlockInputs]:
        """One pass with every block's forward standing in (the modules stay: hooks a forward_fn adds find them)."""
        calls: list[BlockInputs] = []
        for i, block in enumerate(self.blocks):
            block.forward = _stand_in(calls, i == len(self.blocks) - 1, as_tuple)
        try:
            forward()
        except StopAtBlock:
            pass
        finally:
            for block in self.blocks:
                del block.forward
        return calls

    def block_inputs(self, forward: Callable[[], Any]) -> BlockInputs:
        """The first block's call for one batch (see block_calls)."""
        return self.block_calls(forward).inputs(0)

    @staticmethod
    def call(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
        """One block on one batch: the next block's hidden states."""
        out = block(inputs.hidden, *inputs.args, **inputs.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def empty_model(cls: Any, config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model built from its config with every parameter on the meta device (buffers computed as usual)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):  # an Auto class
            model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
