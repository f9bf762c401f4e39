"""Apply an EVA state to MiniLM and fine-tune it with the Hugging Face Trainer (CPU, a few dozen steps).

    python examples/train_minilm_trainer.py                       # computes the EVA state first (seconds)
    python examples/train_minilm_trainer.py --steps 60 --out out/minilm-intents

1. The packaged all-MiniLM-L6-v2 as a 6-way intent classifier (a new head) on evapipe's support messages.
2. An EVA state for that very model (a state applies only to the model class it was computed on), with the data
   and EVA settings of configs/default.yaml; saved to OUT/eva.safetensors and reused when it is there.
3. apply_eva_state -> a trainable PeftModel: lora_A = the EVA components, lora_B = 0, so it starts out computing
   exactly what the base model computes; the new head trains too (modules_to_save).
4. Trainer for --steps steps; held-out accuracy before and after.
5. save_pretrained, reload with AutoPeftModelForSequenceClassification, and check it predicts the same.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from evapipe import compute_eva_state, load_config, load_state  # noqa: E402
from evapipe.adapters.apply import apply_eva_state  # noqa: E402
from evapipe.core.sources import resolve_data_path, resolve_model_path  # noqa: E402
from evapipe.data import make_collator, open_rows, rank_batches  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in Path(resolve_data_path(f"builtin:{name}")).read_text().splitlines()]


def main(argv: list[str] | None = None) -> list[float]:
    """Train; return the logged training losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "minilm-intents")
    args = parser.parse_args(argv)

    path = resolve_model_path("builtin:minilm")
    tok = AutoTokenizer.from_pretrained(path)
    train_rows, heldout_rows = rows("support_intents"), rows("support_intents_heldout")
    labels = sorted({r["label"] for r in train_rows})
    label_kw = dict(dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)})

    torch.manual_seed(0)  # the new head's init
    model = AutoModelForSequenceClassification.from_pretrained(path, **label_kw)

    # 2. the EVA state for this model
    state_path = args.out / "eva.safetensors"
    if state_path.is_file():
        state = load_state(state_path)
    else:
        cfg = load_config(REPO / "configs" / "default.yaml")
        collate = make_collator(tok, cfg.data, "seq-cls")
        batches = rank_batches(open_rows(cfg.data, "seq-cls"), collate, cfg.data.batch_size, 1, 0)
        state = compute_eva_state(model, batches, cfg.eva, show_progress=False)
        state.save(state_path)
    print(f"EVA state: {len(state.tensors)} layers, ranks {min(state.ranks.values())}-{max(state.ranks.values())}")

    # 3. apply: raises StateError if the state was computed on another model
    model = apply_eva_state(model, state)
    model.print_trainable_parameters()

    # 4. train with the Trainer
    def encode(split: list[dict]) -> Dataset:
        enc = tok([r["text"] for r in split], truncation=True, max_length=128)
        return Dataset.from_dict({**enc, "labels": [labels.index(r["label"]) for r in split]})

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=min(5, args.steps), save_strategy="no",
            report_to="none", use_cpu=True, seed=0, per_device_eval_batch_size=60,
        ),
        train_dataset=encode(train_rows),
        eval_dataset=encode(heldout_rows),
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=accuracy,
    )
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    print(f"held-out accuracy: {before:.3f} before training, {after:.3f} after {args.steps} steps")

    # 5. save, reload, same predictions
    adapter = args.out / "adapter"
    model.save_pretrained(str(adapter))
    from peft import AutoPeftModelForSequenceClassification

    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter), **label_kw).eval()
    model.eval()
    batch = DataCollatorWithPadding(tok)([{k: v for k, v in x.items() if k != "labels"} for x in encode(heldout_rows)])
    with torch.no_grad():
        same = torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
    print(f"saved {adapter}; reloaded with AutoPeftModelForSequenceClassification: same predictions = {same}")
    if not same:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


if __name__ == "__main__":
    main()
