"""A state's model card (`README.md` the Hub understands) and `evapipe push`: publishing a state with its card.

The card's YAML front matter carries `library_name: evapipe`, `base_model` (a Hub model id), `datasets` (a Hub
dataset id, when the data came from the Hub), `tags: [eva, lora, peft]` and `license` when given; its body the
settings, the per-layer rank / explained-variance table, the figure, the data fingerprint and the commands that
apply the state. A push uploads the sidecar, the figure and the card first and the state last (remote_store.py:
the state object is the commit), so a reader never finds a state whose sidecar is still missing.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from ..core.remote import hub_repo, is_url, join, location, talking_to, upload
from .remote_store import sidecar_url
from .report import layer_table, plot_layers
from .state import atomic_write, read_metadata, spectrum_path
from .statecache import load_state

CARD_NAME = "README.md"
PLOT_NAME = "eva-layers.png"
TAGS = ("eva", "lora", "peft")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, not a local path or builtin:


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub id (org/name) and is no local folder, else None."""
    if not name or not HUB_ID.match(name) or Path(name).expanduser().exists():
        return None
    return name


def front_matter(meta: dict[str, Any], license: str | None = None) -> dict[str, Any]:
    """The card's YAML header: what the Hub indexes the repository by."""
    out: dict[str, Any] = {"library_name": "evapipe", "tags": list(TAGS)}
    base = hub_id((meta.get("model") or {}).get("id"))
    if base:
        out["base_model"] = base
    dataset = hub_id((meta.get("dataset") or {}).get("id"))
    if dataset:
        out["datasets"] = [dataset]
    if license:
        out["license"] = license
    return out


def model_card(meta: dict[str, Any], state_url: str | None = None, license: str | None = None,
               plot: str | None = PLOT_NAME) -> str:
    """The card's Markdown for a state's metadata; `state_url` is where the state will be read from."""
    import yaml

    model = (meta.get("model") or {}).get("id") or "<base model>"
    data = meta.get("dataset") or {}
    state = state_url or "eva.safetensors"
    settings = {k: meta.get(k) for k in ("task", "r", "lora_alpha", "rho", "tau", "whiten", "adjust_scaling_factors",
                                          "target_modules", "tokens", "batches", "world_size", "store_key",
                                          "format_version", "created")}
    ranks = [int(k) for k in meta["ranks"].values()]
    lines = [
        "---", yaml.safe_dump(front_matter(meta, license), sort_keys=False).rstrip(), "---", "",
        f"# EVA state: {meta['task']} on {model}", "",
        "An [EVA](https://arxiv.org/abs/2410.07170) (Explained Variance Adaptation) initialisation for LoRA, "
        "computed with [evapipe](https://github.com/evapipe/evapipe): each layer's LoRA A starts at the top "
        "principal components of its inputs on the task data, with ranks redistributed by explained variance. "
        f"Total rank {sum(ranks)} over {len(ranks)} layers ({sum(1 for k in ranks if k == 0)} at rank 0).", "",
        "## Apply it", "", "```bash", "pip install evapipe",
        f"evapipe apply --state {state} --model {model} --output adapter/", "```", "", "```python",
        "from evapipe import apply_eva_state, load_state", "",
        f"state = load_state({state!r})  # downloaded once, checksum verified, cached",
        "peft_model = apply_eva_state(base_model, state)  # lora_A = the state, lora_B = 0", "```", "",
        "## Settings", "", "| setting | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in settings.items() if v is not None), "",
        "## Data", "", "| | |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in (("dataset", data.get("id")), ("name", data.get("name")),
                                         ("split", data.get("split")), ("samples", data.get("samples")),
                                         ("max_length", data.get("max_length")),
                                         ("fingerprint", data.get("fingerprint"))) if v is not None), "",
        "## Layers", "",
    ]
    if plot:
        lines += [f"![rank per layer and explained variance kept]({plot})", ""]
    lines += ["```", layer_table(meta), "```", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()), ""]
    return "\n".join(lines)


def write_card(state_path: str | Path, out_dir: str | Path, license: str | None = None,
               state_url: str | None = None) -> list[Path]:
    """`evapipe card`: README.md (and the figure, when matplotlib is installed) for a state, into `out_dir`."""
    meta = read_metadata(state_path)
    out_dir = Path(out_dir)
    written = []
    try:
        written.append(plot_layers(meta, out_dir / PLOT_NAME))
    except ImportError:
        pass
    text = model_card(meta, state_url, license, PLOT_NAME if written else None)
    written.insert(0, atomic_write(out_dir / CARD_NAME, lambda tmp: Path(tmp).write_text(text)))
    return written


def push_files(state_path: Path, url: str) -> list[tuple[Path, str]]:
    """(local file, destination) pairs a push sends, in order: everything else first, the state last."""
    state_url = str(join(url, "eva.safetensors"))
    files = [(spectrum_path(state_path), sidecar_url(state_url))] if spectrum_path(state_path).is_file() else []
    card = state_path.parent / CARD_NAME
    files += [(p, str(join(url, p.name))) for p in (state_path.parent / PLOT_NAME, card) if p.is_file()]
    return [*files, (state_path, state_url)]


def push(state: str | Path, url: str, license: str | None = None) -> list[str]:
    """`evapipe push`: upload a state, its sidecar and a card to `url` (a Hub repo `hf://org/name`, or any store
    URL or folder). A Hub repo is created if missing. Returns what was written."""
    loaded = load_state(state)  # verified (downloaded first if `state` is a URL)
    with tempfile.TemporaryDirectory(prefix="evapipe-push-") as tmp:
        local = Path(tmp) / "eva.safetensors"
        loaded.save(local)
        write_card(local, tmp, license, str(join(url, "eva.safetensors")))
        files = push_files(local, url)
        if not is_url(url):
            import shutil

            from .state import atomic_write

            for src, dst in files:
                atomic_write(location(dst), lambda t, src=src: shutil.copyfile(src, t))
            return [str(dst) for _, dst in files]
        if url.startswith("hf://"):
            _create_hub_repo(url)
        for src, dst in files:
            upload(src, dst)
    return [dst for _, dst in files]


def _create_hub_repo(url: str) -> None:
    """The Hub repository a push writes to, created (private: False) if it does not exist yet."""
    from huggingface_hub import HfApi

    repo_type, repo_id, _, _ = hub_repo(url)
    with talking_to(url, "create the Hub repository for"):
        HfApi().create_repo(repo_id, repo_type=repo_type, exist_ok=True)
