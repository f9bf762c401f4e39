"""What the adapter-directory recipes (sft_trl.py, train_fsdp.py) share: their command line and the base model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def recipe_parser(description: str, *, steps: int, max_length: int, out: str) -> argparse.ArgumentParser:
    """--adapter / --model / --data and the training knobs; each recipe adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--adapter", required=True, help="adapter directory written by `evapipe apply`")
    parser.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    parser.add_argument("--data", required=True, help="a .jsonl/.json file or hub dataset with a `messages` column")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step, per process")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def base_model(args: argparse.Namespace) -> str:
    """--model, else the base model the adapter directory names (adapter_config.json)."""
    config = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
    return args.model or config["base_model_name_or_path"]
