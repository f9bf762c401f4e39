"""`evapipe` command line: thin click wrappers over the Python API (heavy imports happen inside commands)."""

from __future__ import annotations

import json
import sys

import click

from .errors import EvapipeError


class _Group(click.Group):
    """Print evapipe's own errors as one line (exit 2) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EvapipeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evapipe")
def main() -> None:
    """EVA (Explained Variance Adaptation) initialisation for LoRA adapters.

    Compute a state from a model and task data (`compute`), look at it (`show`), turn it into a PEFT adapter
    (`apply`); list a store (`list`), re-budget a state (`rebudget`), convert to and from PEFT (`convert`); see
    what a job needs in memory before running it (`estimate`).
    """


@click.command("compute")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML job config (see configs/default.yaml and `evapipe config-reference`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set eva.r=16 --set data.batch_size=4 (value parsed as YAML).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--force", is_flag=True, help="Recompute even if output.store already holds this job's state.")
@click.option("--restart", is_flag=True,
              help="Discard a checkpoint beside the output (e.g. one of another config) instead of resuming from it.")
def compute_command(config_path: str, overrides: tuple[str, ...], no_progress: bool, force: bool,
                    restart: bool) -> None:
    """Run the EVA compute job of a config and write the state file.

    Runs as one process, or as many under `torchrun` / `accelerate launch` (each rank reads its share of every
    step's samples; rank 0 writes the file). With output.store, a job already computed is a cache hit (no forward
    pass); a killed job run again resumes from its last checkpoint (output.checkpoint_every).
    """
    from .config import load_config
    from .job import run_job

    try:
        cfg = load_config(config_path, overrides)
        run_job(cfg, show_progress=not no_progress, force=force, restart=restart)
    except EvapipeError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


main.add_command(compute_command)


@main.command("estimate")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML job config; only its model's config.json is read, never the weights.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, as in compute.")
@click.option("--device-memory", default=None, metavar="SIZE",
              help="Memory of the compute device to check against (e.g. 80GiB); default: the first GPU's, else the "
                   "host's RAM.")
@click.option("--world-size", type=int, default=1, show_default=True,
              help="Processes the job will run on (each holds its share of the PCAs).")
def estimate_command(config_path: str, overrides: tuple[str, ...], device_memory: str | None, world_size: int) -> None:
    """Print the memory the job needs per process in each offload mode (weights, activations, PCA state,
    spectrum), and whether it fits the device."""
    from .config import load_config
    from .estimate import device_memory as seen_device
    from .estimate import estimate, report
    from .memory import budget_bytes

    cfg = load_config(config_path, overrides)
    device, memory = ("given", budget_bytes(device_memory)) if device_memory else seen_device()
    click.echo(report(estimate(cfg, max(1, world_size)), device, memory))


@main.command("show")
@click.argument("state_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a figure (PNG) of rank per layer and explained variance kept (needs matplotlib).")
def show_command(state_path: str, as_json: bool, plot: str | None) -> None:
    """Print a state's per-layer rank / explained-variance / convergence table (alias: inspect)."""
    from .report import layer_table, plot_layers
    from .state import read_metadata

    meta = read_metadata(state_path)
    if plot:
        plot_layers(meta, plot)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    total = sum(int(k) for k in meta["ranks"].values())
    click.echo(f"task {meta['task']}  model {(meta.get('model') or {}).get('id')}  r={meta['r']} rho={meta.get('rho')} "
               f"tau={meta.get('tau')}  total rank {total}  tokens {meta.get('tokens')}  batches {meta.get('batches')}  "
               f"format_version {meta['format_version']}  store key {meta.get('store_key')}")
    click.echo(layer_table(meta))
    if plot:
        click.echo(f"figure: {plot}")


main.add_command(show_command, "inspect")


@main.command("config-reference")
def config_reference_command() -> None:
    """Print every config key with its default and meaning (Markdown)."""
    from .config import reference_markdown

    click.echo(reference_markdown())


@main.command("apply")
@click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False),
              help="EVA state file written by `evapipe compute`.")
@click.option("--model", default=None,
              help="Hub id or local directory of the base model (default: the model the state was computed on).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Adapter directory to write (adapter_config.json + adapter_model.safetensors + evapipe.json).")
@click.option("--load-in-4bit", "load_4bit", is_flag=True, help="Load the base bitsandbytes 4-bit quantized (QLoRA).")
@click.option("--load-in-8bit", "load_8bit", is_flag=True, help="Load the base bitsandbytes 8-bit quantized.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of the base model's non-quantized weights (and 4-bit compute dtype).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of the base model.")
@click.option("--trust-remote-code", is_flag=True, help="Passed to transformers' from_pretrained.")
@click.option("--device", default="auto", show_default=True, help="Where to load the base: auto, cpu or cuda.")
@click.option("--force", is_flag=True,
              help="Apply even if the architecture fingerprint differs (layer names and shapes are always checked).")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter directory at --output.")
def apply_command(state_path: str, model: str | None, output: str, load_4bit: bool, load_8bit: bool, dtype: str,
                  revision: str | None, trust_remote_code: bool, device: str, force: bool, overwrite: bool) -> None:
    """Turn a state into a PEFT LoRA adapter directory, ready to train.

    lora_A = the state's components, lora_B = 0 (the adapted model starts equal to the base), per-layer ranks and
    alphas from the state; rank-0 layers get no adapter. Load it with
    PeftModel.from_pretrained(base, OUTPUT, is_trainable=True).
    """
    from .apply import apply_to_directory

    if load_4bit and load_8bit:
        raise click.UsageError("--load-in-4bit and --load-in-8bit exclude each other")
    quantization = "4bit" if load_4bit else "8bit" if load_8bit else None
    path, state = apply_to_directory(state_path, output, model, quantization=quantization, dtype=dtype,
                                     revision=revision, trust_remote_code=trust_remote_code, device=device,
                                     force=force, overwrite=overwrite)
    ranks = [k for k in state.ranks.values() if k > 0]
    click.echo(f"wrote {path}: {len(ranks)} LoRA layers (rank {min(ranks)}-{max(ranks)}, total {sum(ranks)}), "
               f"{len(state.ranks) - len(ranks)} at rank 0 left without an adapter")


@main.command("list")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_command(directory: str | None, as_json: bool) -> None:
    """List the EVA states in a store (or any folder): task, model, r, rho, total rank, tokens, created, size.

    DIRECTORY defaults to $EVAPIPE_STORE, else the current folder.
    """
    import dataclasses
    import os

    from .report import store_table
    from .store import list_states

    entries = list_states(directory or os.environ.get("EVAPIPE_STORE") or ".")
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in entries], indent=2, default=str))
    else:
        click.echo(store_table(entries))


@main.command("rebudget")
@click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False), help="State to re-budget.")
@click.option("--r", "r", required=True, type=int, help="New rank per layer before redistribution.")
@click.option("--rho", type=float, default=None, help="New redistribution factor (default: the state's).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Where the new state goes.")
def rebudget_command(state_path: str, r: int, rho: float | None, output: str) -> None:
    """Redistribute a state's ranks for another budget from its stored spectrum, without a forward pass."""
    from .rebudget import rebudget_file

    state = rebudget_file(state_path, output, r, rho)
    ranks = list(state.ranks.values())
    click.echo(f"wrote {output}: r={r} rho={state.meta['rho']:g}, total rank {sum(ranks)} over {len(ranks)} layers "
               f"({sum(1 for k in ranks if k == 0)} at rank 0)")


@main.command("convert")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--no-prefix", is_flag=True,
              help="Writing PEFT: plain base-model keys instead of `base_model.model.` ones.")
@click.option("--r", "r", type=int, default=None, help="Reading PEFT: the LoraConfig r it was computed with (required).")
@click.option("--lora-alpha", type=float, default=None, help="Reading PEFT: lora_alpha (default 8, PEFT's).")
@click.option("--rho", type=float, default=None, help="Reading PEFT: EvaConfig rho (default 2).")
@click.option("--tau", type=float, default=None, help="Reading PEFT: EvaConfig tau (default 0.99).")
@click.option("--whiten/--no-whiten", default=None, help="Reading PEFT: whether the components are whitened.")
@click.option("--adjust-scaling-factors/--no-adjust-scaling-factors", default=None,
              help="Reading PEFT: EvaConfig adjust_scaling_factors (default on).")
@click.option("--task", default=None, help="Reading PEFT: the task name to record.")
@click.option("--model", default=None, help="Reading PEFT: the base model (hub id or path) to record.")
def convert_command(src: str, dst: str, no_prefix: bool, **settings) -> None:
    """Convert between an evapipe state (.safetensors) and a PEFT EVA state dict (torch.save: .pt/.pth/.bin).

    The direction follows the file names. PEFT files carry no metadata: give what they lack as options.
    """
    from .convert import convert_file

    state = convert_file(src, dst, prefix=not no_prefix, **settings)
    click.echo(f"wrote {dst}: {len(state.ranks)} layers, total rank {state.total_rank()}")


if __name__ == "__main__":
    main()
