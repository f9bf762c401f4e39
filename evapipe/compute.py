"""Compute EVA states: `compute_eva_state` for a model and dataloader you have, and the job's launcher.

    python -m evapipe.compute --config configs/default.yaml [--set eva.r=16 ...]
    accelerate launch --config_file jobs/cpu-2proc.yaml -m evapipe.compute --config configs/default.yaml
    torchrun --nproc_per_node 2 -m evapipe.compute --config configs/default.yaml

The launcher is `evapipe compute` (cli.py) under another name; the job itself is job.py. The engine is imported
inside `compute_eva_state`, so launching (and a cache hit, and --help) does not wait for torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .core.config import EvaSettings
    from .core.distributed import Comm
    from .model.forward import ForwardFn
    from .states.state import EvaState


def compute_eva_state(
    model: nn.Module,
    dataloader: Iterable[Any],
    settings: EvaSettings | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    prepare_model_inputs_fn: Callable | None = None,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = None,
    comm: Comm | None = None,
    show_progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> EvaState | None:
    """EVA state for a model and a dataloader you already have (PEFT-style hooks optional).

    Keyword overrides set EvaSettings fields (`r=16, rho=2`). Under torch.distributed each rank passes its own
    dataloader shard and gets the state on rank 0 (None elsewhere). The model is left as it was (mode, hooks).
    """
    import dataclasses

    import torch

    from .core.config import EvaSettings
    from .model.forward import UserHooks, cycle_batches
    from .model.loading import model_info
    from .run.engine import EvaRun

    settings = dataclasses.replace(settings or EvaSettings(), **overrides)
    training = model.training
    model.eval()
    try:
        hooks = UserHooks(forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn)
        run = EvaRun(model, settings, comm, hooks)
        with torch.no_grad():
            run.run(cycle_batches(dataloader), show_progress=show_progress, pass_steps=_length(dataloader))
        extra = {"model": model_info(model), "dataset": {"id": None, "split": None, "fingerprint": None}}
        return run.result(extra | dict(metadata or {}))
    finally:
        model.train(training)


def _length(dataloader: Iterable[Any]) -> int | None:
    """Batches in one pass over a dataloader, when it knows (an iterable dataset may not)."""
    try:
        return len(dataloader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m evapipe.compute` (and `accelerate launch -m evapipe.compute`)."""
    from .cli import compute_command
    from .core.quiet import quiet_dependencies

    quiet_dependencies()
    compute_command.main(args=argv, prog_name="python -m evapipe.compute")


if __name__ == "__main__":
    main()
