"""`evapipe` command line: thin click wrappers over the Python API (heavy imports happen inside commands)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from .core.config import MODEL_KINDS
from .core.errors import EvapipeError
from .core.quiet import quiet_dependencies

if TYPE_CHECKING:
    from .run.result import JobResult


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
    (`apply`) and check an adapter against a model (`check`); list a store (`list`), re-budget a state
    (`rebudget`), convert to and from PEFT (`convert`); see what a job needs in memory before running it
    (`estimate`); publish a state with its model card (`push`, `card`). States and stores may be URLs
    (s3://, gs://, az://, hf://) as well as paths.

    Results go to stdout; progress, logs and errors to stderr. Dependencies' own progress bars and warnings are
    off (their environment variables, e.g. TRANSFORMERS_VERBOSITY=info, turn them back on).
    """
    quiet_dependencies()


@click.command("compute")
@click.option("--config", "config_path", required=True, type=click.Path(),
              help="YAML job config (see configs/default.yaml and `evapipe config-reference`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set eva.r=16 --set data.batch_size=4 (value parsed as YAML).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (stderr).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON on stdout (path, cached, ranks and alphas per layer, tokens, processes) "
                   "instead of the table.")
@click.option("--quiet", "-q", is_flag=True,
              help="Print neither the summary table nor progress and logs (with --json: the JSON alone); errors and "
                   "warnings still go to stderr.")
@click.option("--force", is_flag=True, help="Recompute even if output.store already holds this job's state.")
@click.option("--restart", is_flag=True,
              help="Discard a checkpoint beside the output (e.g. one of another config) instead of resuming from it.")
def compute_command(config_path: str, overrides: tuple[str, ...], no_progress: bool, as_json: bool, quiet: bool,
                    force: bool, restart: bool) -> None:
    """Run the EVA compute job of a config and write the state file.

    Runs as one process, or as many under `torchrun` / `accelerate launch` (each rank reads its share of every
    step's samples; rank 0 writes the file). With output.store, a job already computed is a cache hit (no forward
    pass); a killed job run again resumes from its last checkpoint (output.checkpoint_every).

    Rank 0 prints the result on stdout (the per-layer rank table and the path written, or --json); progress and
    logs go to stderr, so `... > summary.txt` keeps only the result.
    """
    from .core.config import load_config
    from .job import launcher_rank, run_job

    try:
        cfg = load_config(config_path, overrides)
        result = run_job(cfg, show_progress=not no_progress, force=force, restart=restart, quiet=quiet)
        if launcher_rank() != 0 or (quiet and not as_json):  # --json --quiet: the JSON alone, nothing on stderr
            return
        click.echo(_job_output(result, as_json))
    except EvapipeError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


def _job_output(result: JobResult, as_json: bool) -> str:
    """The compute job's result as `evapipe compute` prints it (a cache hit's from its file's metadata)."""
    from .states.corda_state import read_state_metadata
    from .states.report import corda_record, corda_summary, job_record, job_summary

    meta = result.state.meta if result.state is not None else read_state_metadata(result.path)
    args = (meta, result.rank_stats, result.seconds, result.path, result.cached)
    corda = meta.get("method") == "corda"
    if as_json:
        return json.dumps((corda_record if corda else job_record)(*args), indent=2)
    return (corda_summary if corda else job_summary)(*args).lstrip("\n")


main.add_command(compute_command)


@main.command("estimate")
@click.option("--config", "config_path", required=True, type=click.Path(),
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
    from .core.config import load_config
    from .model.memory import budget_bytes
    from .run.estimate import device_memory as seen_device
    from .run.estimate import estimate, report

    cfg = load_config(config_path, overrides)
    device, memory = ("given", budget_bytes(device_memory)) if device_memory else seen_device()
    click.echo(report(estimate(cfg, max(1, world_size)), device, memory))


@main.command("show")
@click.argument("state_path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON instead of a table.")
@click.option("--plot", type=click.Path(), default=None,
              help="Also write a figure (PNG) of rank per layer and explained variance kept (needs matplotlib).")
def show_command(state_path: str, as_json: bool, plot: str | None) -> None:
    """Print a state's per-layer rank / explained-variance / convergence table (alias: inspect)."""
    from .states.corda_state import read_state_metadata
    from .states.report import corda_table, layer_table, plot_layers

    meta = read_state_metadata(state_path)
    if meta.get("method") == "corda":
        if plot:
            raise click.UsageError("--plot draws EVA states' ranks and explained variance; a CorDA state has neither")
        click.echo(json.dumps(meta, indent=2) if as_json else
                   f"task {meta['task']}  model {(meta.get('model') or {}).get('id')}  CorDA {meta['corda_method']} "
                   f"r={meta['r']} lora_alpha={meta['lora_alpha']}  tokens {meta.get('tokens')}  batches "
                   f"{meta.get('batches')}  store key {meta.get('store_key')}\n{corda_table(meta)}")
        return
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
    from .core.config import reference_markdown

    click.echo(reference_markdown())


def _model_options(func):
    """--model / --kind / --num-labels / --revision / --trust-remote-code, shared by `apply` and `check`."""
    options = [
        click.option("--model", default=None,
                     help="Hub id or local directory of the model the adapter is for, loaded with its own architecture "
                          "(a saved classifier keeps its head). Default: the model the state was computed on "
                          "(for check: the one the adapter was written for)."),
        click.option("--kind", type=click.Choice(MODEL_KINDS), default=None,
                     help="Load the model as this kind instead (e.g. seq-cls: a sequence classifier with a new head "
                          "on a bare encoder checkpoint). Default: the model's own architecture; without --model, "
                          "the kind the state was computed as."),
        click.option("--num-labels", type=click.IntRange(min=1), default=None,
                     help="Labels of the new classifier head that --kind seq-cls / image-cls adds."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of the model."),
        click.option("--trust-remote-code", is_flag=True, help="Passed to transformers' from_pretrained."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command("apply")
@click.option("--state", "state_path", required=True, type=click.Path(),
              help="EVA or CorDA state file written by `evapipe compute`: a path or a URL (s3://..., hf://org/repo/"
                   "eva.safetensors), downloaded once into the local cache and verified.")
@_model_options
@click.option("--output", required=True, type=click.Path(),
              help="Adapter directory to write (adapter_config.json + adapter_model.safetensors + evapipe.json).")
@click.option("--use-dora", is_flag=True,
              help="DoRA adapter: its magnitude vector starts at the base weight's norms, so outputs still equal "
                   "the base model's.")
@click.option("--use-rslora", is_flag=True,
              help="rsLoRA scaling (alpha / sqrt(rank)); every layer's scaling stays lora_alpha / sqrt(r) whatever "
                   "its EVA rank (lora_alpha / sqrt(rank) if the state was computed without adjust_scaling_factors).")
@click.option("--load-in-4bit", "load_4bit", is_flag=True, help="Load the base bitsandbytes 4-bit quantized (QLoRA).")
@click.option("--load-in-8bit", "load_8bit", is_flag=True, help="Load the base bitsandbytes 8-bit quantized.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of the base model's non-quantized weights (and 4-bit compute dtype).")
@click.option("--device", default="auto", show_default=True, help="Where to load the base: auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of a new task head's initialisation (and, with --baseline, of PEFT's lora_A init).")
@click.option("--baseline", is_flag=True,
              help="The same adapter (targets, per-layer ranks and alphas, head, DoRA/rsLoRA) with PEFT's default "
                   "init instead of the state's components: the fair baseline to compare EVA against.")
@click.option("--force", is_flag=True,
              help="Apply even if the architecture fingerprint differs (layer names and shapes are always checked).")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter directory at --output.")
def apply_command(state_path: str, output: str, load_4bit: bool, load_8bit: bool, **options) -> None:
    """Turn a state into a PEFT LoRA adapter directory for a model, ready to train.

    lora_A = the state's components, lora_B = 0 (the adapted model starts equal to the base), per-layer ranks and
    alphas from the state; rank-0 layers get no adapter. A state computed on a backbone (MiniLM's BertModel) applies
    to a task model around it (--model a saved classifier, or --kind seq-cls --num-labels N): the adapter then
    carries the head (PEFT task type, modules_to_save). Load it with
    PeftModel.from_pretrained(<that model>, OUTPUT, is_trainable=True); `evapipe check` checks a model first.

    A CorDA state (method: corda) gives lora_A and lora_B from its decomposition and changes the base weights:
    OUTPUT/residual_model holds that residual base; train and merge on it
    (PeftModel.from_pretrained(OUTPUT/residual_model, OUTPUT, is_trainable=True)).
    With --baseline the adapter is the same but keeps PEFT's default init, for an A/B run that differs only in it.
    """
    from .adapters.apply import apply_to_directory, read_provenance
    from .states.corda_state import is_corda_state

    if is_corda_state(state_path):
        _apply_corda(state_path, output, load_4bit or load_8bit, **options)
        return
    if load_4bit and load_8bit:
        raise click.UsageError("--load-in-4bit and --load-in-8bit exclude each other")
    quantization = "4bit" if load_4bit else "8bit" if load_8bit else None
    path, state = apply_to_directory(state_path, output, quantization=quantization, **options)
    built = read_provenance(path)["adapter_for"]
    ranks = [k for k in state.ranks.values() if k > 0]
    init = " with PEFT's default init (baseline)" if options["baseline"] else ""
    click.echo(f"wrote {path} for a {built['class']} (PEFT task {built['task_type']}){init}: {len(ranks)} LoRA layers "
               f"(rank {min(ranks)}-{max(ranks)}, total {sum(ranks)}), {len(state.ranks) - len(ranks)} at rank 0 "
               "left without an adapter")


def _apply_corda(state_path: str, output: str, quantized: bool, *, kind: str | None, num_labels: int | None,
                 use_dora: bool, use_rslora: bool, seed: int, baseline: bool, **options) -> None:
    """`evapipe apply` of a CorDA state: the adapter plus the residual model it trains on."""
    from .adapters.corda import RESIDUAL_DIR, apply_corda_to_directory

    unsupported = [flag for flag, on in (("--load-in-4bit/--load-in-8bit", quantized), ("--kind", kind),
                                         ("--num-labels", num_labels), ("--use-dora", use_dora),
                                         ("--use-rslora", use_rslora), ("--baseline", baseline)) if on]
    if unsupported:
        raise click.UsageError(f"{', '.join(unsupported)} are not supported for CorDA states (CorDA changes the float "
                               "base weights of the model it was computed on)")
    path, state = apply_corda_to_directory(state_path, output, **options)
    click.echo(f"wrote {path}: CorDA {state.meta['corda_method']} adapter, {len(state.layers)} LoRA layers at rank "
               f"{state.meta['r']}, and {path / RESIDUAL_DIR} (the residual base model: train and merge on it)")


@main.command("check")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(),
              help="PEFT adapter directory (e.g. written by `evapipe apply`).")
@_model_options
def check_command(adapter_dir: str, **options) -> None:
    """Check, before training, that an adapter loads onto a model: every adapter weight has its layer, with equal
    shapes, and a model with a task head gets an adapter for that task (else PEFT only warns and trains a random
    init with a frozen head). Reads no weights (the model is built on the meta device); exit 2 with what to run
    instead when it does not fit.
    """
    from .adapters.check import check_adapter_dir

    fit = check_adapter_dir(adapter_dir, **options)
    full = f"; trained in full: {', '.join(fit.trained_in_full)}" if fit.trained_in_full else ""
    click.echo(f"ok: {adapter_dir} loads onto a {fit.model_class} (PEFT task {fit.task_type}): "
               f"{fit.lora_layers} LoRA layers{full}")


@main.command("list")
@click.argument("directory", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_command(directory: str | None, as_json: bool) -> None:
    """List the EVA states in a store (or any folder): task, model, r, rho, total rank, tokens, created, size.

    DIRECTORY defaults to $EVAPIPE_STORE, else the current folder.
    """
    import dataclasses
    import os

    from .states.report import store_table
    from .states.store import list_states

    entries = list_states(directory or os.environ.get("EVAPIPE_STORE") or ".")
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in entries], indent=2, default=str))
    else:
        click.echo(store_table(entries))


@main.command("rebudget")
@click.option("--state", "state_path", required=True, type=click.Path(), help="State to re-budget.")
@click.option("--r", "r", required=True, type=int, help="New rank per layer before redistribution.")
@click.option("--rho", type=float, default=None, help="New redistribution factor (default: the state's).")
@click.option("--output", required=True, type=click.Path(), help="Where the new state goes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --output.")
def rebudget_command(state_path: str, r: int, rho: float | None, output: str, overwrite: bool) -> None:
    """Redistribute a state's ranks for another budget from its stored spectrum, without a forward pass."""
    from .states.rebudget import rebudget_file

    state = rebudget_file(state_path, output, r, rho, overwrite=overwrite)
    ranks = list(state.ranks.values())
    click.echo(f"wrote {output}: r={r} rho={state.meta['rho']:g}, total rank {sum(ranks)} over {len(ranks)} layers "
               f"({sum(1 for k in ranks if k == 0)} at rank 0)")


@main.command("convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
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
@click.option("--overwrite", is_flag=True, help="Replace an existing file at DST.")
def convert_command(src: str, dst: str, no_prefix: bool, overwrite: bool, **settings) -> None:
    """Convert between an evapipe state (.safetensors) and a PEFT EVA state dict (torch.save: .pt/.pth/.bin).

    The direction follows the file names. PEFT files carry no metadata: give what they lack as options.
    """
    from .adapters.convert import convert_file

    state = convert_file(src, dst, prefix=not no_prefix, overwrite=overwrite, **settings)
    click.echo(f"wrote {dst}: {len(state.ranks)} layers, total rank {state.total_rank()}")


@main.command("card")
@click.argument("state_path", type=click.Path(dir_okay=False))
@click.option("--output", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write README.md (the card) and eva-layers.png (the figure, needs matplotlib) into.")
@click.option("--license", "license_", default=None, help="License to record in the card's front matter (e.g. apache-2.0).")
@click.option("--url", default=None, help="Where the state will be read from, for the card's apply commands "
                                          "(e.g. hf://org/repo/eva.safetensors); default: eva.safetensors.")
def card_command(state_path: str, out_dir: str, license_: str | None, url: str | None) -> None:
    """Write a state's model card (README.md with Hub front matter: base model, datasets, tags, license) locally."""
    from .states.card import write_card

    for path in write_card(state_path, out_dir, license_, url):
        click.echo(f"wrote {path}")


@main.command("push")
@click.argument("state_path", type=click.Path(dir_okay=False))
@click.argument("url")
@click.option("--license", "license_", default=None, help="License to record in the card's front matter.")
def push_command(state_path: str, url: str, license_: str | None) -> None:
    """Publish a state: upload it, its spectrum sidecar and a model card to URL (a Hub repo hf://org/name, a
    store URL such as s3://bucket/prefix, or a folder). The state goes last, so it is visible only when complete.
    Credentials: HF_TOKEN / `huggingface-cli login`, the AWS variables, Google's default credentials."""
    from .states.card import push

    for dst in push(state_path, url, license_):
        click.echo(f"uploaded {dst}")


if __name__ == "__main__":
    main()
