"""A state's metadata as one typed object: what every producer (compute, rebudget, convert, apply) fills in.

Format versions (`format_version`; the loader reads every one evapipe has shipped, via MIGRATIONS):
  1  evapipe 0.1.0: tensors keyed by module name, metadata below (without the keys version 2 added).
  2  adds `store_key` (the store key of the job that computed it, or null), `layer_alpha` (each layer's alpha
     before rank scaling, so re-budgeting gives every layer its own alpha back) and `spectrum_id`; `layer_r` is
     always present.
  3  adds `checksum`: sha256 of the other metadata entries and of the tensors (the sidecar carries its tensors'
     one), required from this version on (state.py checks it on the raw file; parsed metadata never carries it),
     so a changed byte is an error, never a different state.
  Mixture-of-experts states (eva.target_parameters) are files of this layout with more layers and keys: each expert is
  a layer named `<parameter>[<expert>]`, and `target_parameters`, `experts`, `expert_tokens` and `unrouted` say
  which (see evapipe.model.experts). A state without them is one without experts, so no migration.

Migrations work on the parsed JSON (a file's metadata as written); `StateMeta.from_dict` then reads the migrated
dict. Keys a newer writer added that this version does not know are kept in `extra` and written back unchanged.
Nothing here imports torch, so `evapipe show/list` and cache lookups stay fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..core.errors import StateError

FORMAT = "evapipe.eva"
FORMAT_VERSION = 3
SEALED_SINCE = 3  # format_version from which a state file must carry its checksum
# what every state has once migrated to FORMAT_VERSION (readers such as report and rebudget rely on these)
REQUIRED_KEYS = (
    "task", "r", "lora_alpha", "ranks", "in_features", "layer_r", "layer_alpha", "rank_pattern", "alpha_pattern",
    "explained_variance", "converged",
)
LAYER_KEYED = ("ranks", "in_features", "layer_r", "layer_alpha", "max_components", "rank_pattern", "alpha_pattern",
               "explained_variance", "singular_values", "converged", "expert_tokens",
               "experts")  # metadata keyed by layer (or, for `experts`, expert parameter) name


def utc_now() -> str:
    """The timestamp format of every file evapipe writes (`created`, a checkpoint's `written`)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions(*packages: str) -> dict[str, str]:
    """The versions a state records: evapipe's, torch's and those of the given packages."""
    import importlib

    from .. import __version__

    return {"evapipe": __version__} | {p: importlib.import_module(p).__version__ for p in ("torch", *packages)}


class MetaRecord:
    """A metadata dataclass (with an `extra` field) as a state stores it: unknown keys are kept in `extra` and
    written back unchanged."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form a state file stores."""
        out = asdict(self)
        return out | out.pop("extra")

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> Any:
        """Read parsed (migrated) metadata; unknown keys go to `extra`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in meta.items() if k in known},
                   extra={k: v for k, v in meta.items() if k not in known})


@dataclass
class StateMeta(MetaRecord):
    """Everything a state file says besides its tensors. Per-layer maps are keyed by module name."""

    r: int
    lora_alpha: float
    ranks: dict[str, int]
    in_features: dict[str, int]
    layer_r: dict[str, int]
    layer_alpha: dict[str, float]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task: str = "default"
    rho: float | None = None
    tau: float | None = None
    whiten: bool | None = None
    adjust_scaling_factors: bool = True
    use_label_mask: bool | None = None
    label_mask_value: int | None = None
    target_modules: Any = None
    exclude_modules: Any = None
    oversample: int | None = None
    refine_converged: bool | None = None
    store_key: str | None = None
    max_components: dict[str, int] = field(default_factory=dict)
    explained_variance: dict[str, list[float]] = field(default_factory=dict)
    singular_values: dict[str, list[float]] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)
    shared_inputs: list[list[str]] = field(default_factory=list)
    target_parameters: list[str] | None = None
    experts: dict[str, dict[str, int]] = field(default_factory=dict)  # expert parameter -> num_experts, in/out
    expert_tokens: dict[str, int] = field(default_factory=dict)  # expert -> tokens its PCA received
    unrouted: list[str] = field(default_factory=list)  # experts that received no token (rank 0, no spectrum)
    tokens: int | None = None
    batches: int | None = None
    world_size: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    spectrum_id: str | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other producers (source, rebudgeted_from, ...)

    def with_patterns(self) -> StateMeta:
        """rank_pattern / alpha_pattern (PEFT semantics) recomputed from ranks, layer_r and layer_alpha."""
        from ..eva.budget import state_patterns  # budget imports torch; reading metadata must not

        rank_pattern, alpha_pattern = state_patterns(self.ranks, self.layer_r, self.layer_alpha, self.r,
                                                     self.lora_alpha, self.adjust_scaling_factors)
        return replace(self, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _v1_to_v2(meta: dict[str, Any]) -> dict[str, Any]:
    """v1 lacks store_key, spectrum_id and layer_alpha; layer_alpha is recovered by undoing the rank scaling."""
    ranks, r, alpha = meta["ranks"], meta["r"], meta["lora_alpha"]
    layer_r = meta.get("layer_r") or {n: r for n in ranks}
    scaled = meta.get("alpha_pattern") or {}
    adjust = meta.get("adjust_scaling_factors", True)
    layer_alpha = {}
    for n, rank in ranks.items():
        a = scaled.get(n, alpha)
        if adjust:  # v1 stored alpha * rank / r; at rank 0 that is 0 and the base alpha is lost: assume lora_alpha
            a = round(a * layer_r[n] / rank, 10) if rank > 0 else alpha
        layer_alpha[n] = a
    return {**meta, "format_version": 2, "layer_r": layer_r, "layer_alpha": layer_alpha, "store_key": None,
            "spectrum_id": None}


def _v2_to_v3(meta: dict[str, Any]) -> dict[str, Any]:
    """v2 is v3 without the checksum, which is checked on the raw file and never carried in parsed metadata."""
    return {**meta, "format_version": 3}


# format_version -> function upgrading that version's parsed metadata to the next version
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3}


def migrate(meta: dict[str, Any], path: str | Path = "state") -> dict[str, Any]:
    """Upgrade parsed metadata of any shipped format_version to FORMAT_VERSION; refuse newer or unknown ones."""
    version = meta.get("format_version")
    is_int = isinstance(version, int) and not isinstance(version, bool)
    if is_int and version > FORMAT_VERSION:
        raise StateError(
            f"{path} has format_version {version}, newer than this evapipe reads (format_version {FORMAT_VERSION}); "
            "upgrade evapipe to read it"
        )
    if not is_int or (version != FORMAT_VERSION and version not in MIGRATIONS):
        known = ", ".join(str(v) for v in sorted({*MIGRATIONS, FORMAT_VERSION}))
        raise StateError(
            f"{path} has an unknown format_version {version!r}; this evapipe reads format_version {known} "
            f"(current: {FORMAT_VERSION})"
        )
    try:
        while meta["format_version"] < FORMAT_VERSION:
            meta = MIGRATIONS[meta["format_version"]](meta)
    except (KeyError, TypeError, AttributeError, ZeroDivisionError) as err:
        raise StateError(f"{path}: format_version {version} metadata is incomplete or corrupt ({err!r})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(meta.get(k), (dict, list, str, int, float))]
    if missing:
        raise StateError(f"{path}: metadata lacks {', '.join(missing)} (format_version {version})")
    return meta
