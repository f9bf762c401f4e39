"""Plan before you run: the memory a job needs per process in each offload mode, from the model's config alone.

The model is built on the meta device (no weights are read), so the sizes are exact for weights and PCA state and
upper bounds for the rest: every target layer is counted with its own PCA (shared-input groups only make it
smaller), and a forward pass's working set is taken as the batch's hidden states, one block's largest
intermediate tensors and eager attention scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import EvaSettings, JobConfig
from ..core.errors import ConfigError
from ..core.sources import resolve_model_path
from ..eva.budget import layer_r
from ..eva.planning import layers_come_back
from ..model.experts import resolve_expert_params
from ..model.loading import model_class, model_kind
from ..model.memory import fmt_bytes, largest_unit, module_bytes
from ..model.onload import block_list, empty_model
from ..model.targets import resolve_targets

F32 = 4
MODES = ("none", "sequential", "device_map")


@dataclass
class ModeEstimate:
    """Bytes one process needs on its compute device and in host memory in one offload mode."""

    mode: str
    weights: int  # on the compute device
    activations: int  # a forward pass's working set plus the captured target inputs it holds
    pca: int  # this process's share of the incremental PCAs
    host: int  # host memory beyond the process itself: hidden states of a round, CPU-placed weights
    spectrum: int  # rank 0, at the end: every PCA's kept components
    disk: int = 0  # temporary files (TMPDIR): sequential's per-batch PCA copies of a round, its parked block inputs

    @property
    def device(self) -> int:
        return self.weights + self.activations + self.pca


@dataclass
class JobEstimate:
    model_bytes: int
    block: tuple[str, int]
    tokens: int
    targets: int
    world: int
    modes: list[ModeEstimate]


def estimate(cfg: JobConfig, world: int = 1) -> JobEstimate:
    """The memory cfg's job needs per process (of `world`) in each offload mode."""
    if cfg.method != "eva":
        raise ConfigError(f"`evapipe estimate` estimates EVA jobs; a method: {cfg.method} job needs the model plus "
                          "in_features^2 float32 per covariance group, divided over processes (docs/other-methods.md)")
    import torch
    from transformers import AutoConfig

    m, e, d = cfg.model, cfg.eva, cfg.data
    try:
        hf = AutoConfig.from_pretrained(resolve_model_path(m.name_or_path), revision=m.revision,
                                        trust_remote_code=m.trust_remote_code)
    except OSError as err:
        raise ConfigError(f"cannot load model config from `{m.name_or_path}`: {' '.join(str(err).split())}") from None
    dtype = getattr(torch, m.dtype)
    model = empty_model(model_class(hf, model_kind(hf, m.kind)), hf, dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = module_bytes(model)
    block = largest_unit(model)
    try:
        blocks_name, blocks = block_list(model)
        in_blocks, one_block = module_bytes(blocks), max(module_bytes(b) for b in blocks)
    except ConfigError:  # no block list: sequential is refused for this model anyway
        blocks_name, blocks, in_blocks, one_block = None, [], 0, block[1]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_bytes = 0 if head is None or tied else module_bytes(head)
    targets = pca_targets(model, e)
    pca, spectrum = pca_bytes(targets, e)
    pca_share = pca // world + (1 if pca % world else 0)
    tokens = d.batch_size * d.max_length
    hidden = int(getattr(hf, "hidden_size", 0) or 0)
    inter = int(getattr(hf, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(hf, "num_attention_heads", 0) or 1)
    working = tokens * (4 * hidden + 3 * inter) * itemsize + d.batch_size * heads * d.max_length ** 2 * itemsize
    captured_all = sum(round(tokens * t.share) * t.in_features * F32 for t in targets)
    per_block = max(
        (sum(round(tokens * t.share) * t.in_features * F32 for t in targets if t.name.startswith(f"{blocks_name}.{i}."))
         for i in range(len(blocks))) if blocks_name else [captured_all],
        default=0,
    )
    round_size = m.sequential_round
    # where a layer can come back, a round parks every block's input of every batch (to feed it again)
    parked = round_size * len(blocks) * tokens * hidden * itemsize if layers_come_back(e.rho, e.refine_converged) else 0
    modes = [
        ModeEstimate("none", total, working + captured_all, pca_share, 0, spectrum),
        ModeEstimate("sequential", max(total - in_blocks - head_bytes, one_block), working + per_block, pca_share,
                     round_size * tokens * hidden * itemsize, spectrum, round_size * pca_share + parked),
        ModeEstimate("device_map", block[1], working + captured_all, pca_share, max(total - block[1], 0), spectrum),
    ]
    return JobEstimate(total, block, tokens, len(targets), world, modes)


@dataclass(frozen=True)
class PCATarget:
    """One PCA the job may hold: a target layer, or one expert of a targeted fused parameter (fed its share of the
    tokens: top_k / experts)."""

    name: str
    in_features: int
    share: float = 1.0


def pca_targets(model: Any, e: EvaSettings) -> list[PCATarget]:
    """Every target layer and every expert of the targeted expert parameters (eva.target_parameters)."""
    out = [PCATarget(t.name, t.in_features) for t in resolve_targets(model, e.target_modules, e.exclude_modules)]
    for p in resolve_expert_params(model, e.target_parameters):
        out += [PCATarget(k, p.in_features, p.share) for k in p.keys()]
    return out


def pca_bytes(targets: list[PCATarget], e: EvaSettings) -> tuple[int, int]:
    """(the PCA state, the spectrum rank 0 keeps at the end) in bytes, every target with its own PCA."""
    r = layer_r([t.name for t in targets], e.r, e.rank_pattern)
    pca = spectrum = 0
    for t in targets:
        k = min(round(r[t.name] * e.rho), t.in_features)
        track = min(t.in_features, k + (k if e.oversample is None else e.oversample))
        pca += track * t.in_features * F32 + t.in_features * 8 + 8 + track * F32  # components, mean, var, singular values
        spectrum += k * t.in_features * F32
    return pca, spectrum


def device_memory() -> tuple[str, int]:
    """The compute device this process would use and its memory: the first GPU, else the host's RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"cuda:0 ({props.name})", int(props.total_memory)
    import os

    return "cpu (host RAM)", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def report(est: JobEstimate, device: str, memory: int) -> str:
    """The estimate as a table, with whether each mode fits `memory` on the device."""
    name, size = est.block
    lines = [
        f"model: {fmt_bytes(est.model_bytes)} of weights; largest block {name} {fmt_bytes(size)}; {est.targets} "
        f"target layers; {est.tokens} tokens per batch; per process of {est.world}",
        f"device: {device}, {fmt_bytes(memory)}",
        "",
        f"{'offload':<11} {'weights':>11} {'activations':>12} {'PCA state':>11} {'device total':>13} "
        f"{'host extra':>11} {'spectrum':>10} {'temp disk':>10}  fits",
    ]
    for mode in est.modes:
        fits = "yes" if mode.device <= memory else "no"
        lines.append(
            f"{mode.mode:<11} {fmt_bytes(mode.weights):>11} {fmt_bytes(mode.activations):>12} {fmt_bytes(mode.pca):>11} "
            f"{fmt_bytes(mode.device):>13} {fmt_bytes(mode.host):>11} {fmt_bytes(mode.spectrum):>10} "
            f"{fmt_bytes(mode.disk):>10}  {fits}"
        )
    lines += ["", "device_map counts one block on the device (the least it needs; more is faster); its other weights "
              "sit in CPU memory or on disk. sequential's host extra is a round of hidden states; its PCA copies after each "
              "batch of the round (and, at rho > 1, every block's input of every batch) wait in a temporary file (TMPDIR)."]
    return "\n".join(lines)
