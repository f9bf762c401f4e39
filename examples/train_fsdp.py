"""Train an evapipe adapter under FSDP: every process loads the adapter directory, the model is sharded, trained,
and the trained adapter gathered and saved once.

    accelerate launch --config_file jobs/cpu-2proc.yaml examples/train_fsdp.py \
        --adapter out/chat-adapter --data chat.jsonl --steps 50 --out out/chat-fsdp
    torchrun --nproc_per_node 8 examples/train_fsdp.py --adapter ... --data ...       # the same, 8 GPUs

This is the case where SVD-based inits computed inside the trainer break (PiSSA, LoRA-GA under ZeRO-3 / FSDP:
the SVD needs whole weights that are sharded by then). Here the init was computed beforehand (`evapipe compute` ->
`evapipe apply`), so each process only reads lora_A from a file before sharding.

Sharding is PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard` on every decoder layer, then on the root): the
call accelerate's `fsdp_version: 2` makes. It is called here directly because accelerate 1.15 turns FSDP on only
for GPU-type process groups; on a CPU-only machine its `Accelerator(cpu=True)` is MULTI_CPU and `prepare` would wrap
the model in DDP instead. Processes join gloo on CPU, nccl on GPUs (one GPU per process).

Data: conversations (a `messages` column) rendered with the tokenizer's chat template by evapipe's collator, labels
on the assistant replies only; each step every process trains on its own share of the global batch.
"""

from __future__ import annotations

import itertools
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recipe_args import base_model, recipe_parser  # noqa: E402 (examples/, beside this file)


def decoder_layers(model):
    """The transformer blocks to shard one by one (what accelerate's TRANSFORMER_BASED_WRAP picks)."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def main(argv: list[str] | None = None) -> None:
    args = recipe_parser(__doc__.splitlines()[0], steps=50, max_length=512, out="out/fsdp").parse_args(argv)
    import torch
    import torch.distributed as dist
    from peft import PeftModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evapipe.adapters.check import check_adapter_dir
    from evapipe.core.config import DataConfig
    from evapipe.data import make_collator, open_rows, rank_batches

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model_path = base_model(args)
    check_adapter_dir(args.adapter, model_path)  # every process: the adapter's keys load onto this model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)  # lora_A = EVA, lora_B = 0
    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())

    data = DataConfig(path=args.data, messages_field="messages", max_length=args.max_length,
                      batch_size=args.batch_size, seed=0)
    rows = open_rows(data, "causal-lm")
    first_row = next(rows.steps(1, 1, 0))
    collate = make_collator(tokenizer, data, "causal-lm")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for batch in itertools.islice(rank_batches(rows, collate, data.batch_size, world, rank), args.steps):  # endless passes
        if batch is None:  # an uneven last step left this process no samples: it still joins the step, at loss 0
            batch = collate(first_row)
            batch["labels"][:] = -100
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        loss = out.loss if bool((batch["labels"] != -100).any()) else out.logits.sum() * 0
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))

    # gather the full adapter onto every process (collective), write it once
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        adapter_state = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k}
        model.save_pretrained(str(args.out / "adapter"), state_dict=adapter_state)
    shares = [None] * world
    dist.all_gather_object(shares, {"rank": rank, "losses": losses, "local_params": local, "params": total})
    if rank == 0:
        (args.out / "report.json").write_text(json.dumps({"world_size": world, "processes": shares}, indent=2))
        print(f"{world} processes, {args.steps} steps: process 0 loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
              f"{local} of {total} parameters held per process; adapter in {args.out / 'adapter'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
