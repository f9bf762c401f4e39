"""Fine-tune a chat model with TRL's SFTTrainer, starting from an evapipe adapter directory.

    python -m evapipe.compute --config configs/chat-sft.yaml                    # the EVA state (chat data)
    evapipe apply --state out/ultrachat-qwen2.5-0.5b.safetensors --output out/ultrachat-adapter
    python examples/sft_trl.py --adapter out/ultrachat-adapter --data HuggingFaceH4/ultrachat_200k \
        --split train_sft --steps 200 --out out/ultrachat-sft

1. `evapipe check`'s test: the adapter's keys load onto the model (else PEFT would only warn and train its random
   init).
2. The base model (`--model`, default: the one the adapter names) and PeftModel.from_pretrained(base, ADAPTER,
   is_trainable=True): lora_A = the EVA components, lora_B = 0, so training starts at the base model.
3. SFTTrainer on conversations (a `messages` column of {role, content}), rendered with the tokenizer's chat template.
4. The trained adapter is saved to OUT/adapter (a standard PEFT adapter again).

Needs `pip install 'evapipe[train]'` (TRL).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recipe_args import base_model, recipe_parser  # noqa: E402 (examples/, beside this file)


def main(argv: list[str] | None = None) -> list[float]:
    """Train; return the logged training losses."""
    args = recipe_parser(__doc__.splitlines()[0], steps=100, max_length=1024, out="out/sft").parse_args(argv)
    import torch
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from evapipe.adapters.check import check_adapter_dir

    model_path = base_model(args)
    check_adapter_dir(args.adapter, model_path)  # 1. fails with what to run instead
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)  # 2.
    model.print_trainable_parameters()

    local = Path(args.data).suffix in (".json", ".jsonl")
    data = load_dataset("json", data_files=args.data, split="train") if local else load_dataset(args.data,
                                                                                                 split=args.split)
    data = data.select_columns(["messages"])
    config = SFTConfig(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        max_length=args.max_length, seed=0, use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)  # 3.
    trainer.train()
    model.save_pretrained(str(args.out / "adapter"))  # 4.
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"trained {args.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter in {args.out / 'adapter'}")
    return losses


if __name__ == "__main__":
    main()
