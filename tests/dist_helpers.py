"""Helpers that the multi-process tests run inside the launched ranks (tests/ is on their PYTHONPATH).

* `fail_on_rank1_step2`: a `hooks.forward_fn` that raises on rank 1 at its third forward pass (step 2);
* `python tests/dist_helpers.py --config C --stats S`: the compute job, plus what each rank did (the PCAs it owned
  and how often it updated them) written by rank 0 to S as JSON, for the ownership checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

INJECTED = "injected failure on rank 1 at step 2"
_calls = 0


def fail_on_rank1_step2(model: Any, inputs: Any) -> Any:
    from evapipe.model.forward import default_forward

    global _calls
    _calls += 1
    if os.environ.get("RANK") == "1" and _calls == 3:
        raise RuntimeError(INJECTED)
    return default_forward(model, inputs)


def main() -> None:
    from evapipe import load_config, run_job

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--stats", required=True)
    args = parser.parse_args()
    result = run_job(load_config(args.config), show_progress=False)
    if result.path is not None:  # rank 0
        Path(args.stats).write_text(json.dumps([dataclasses.asdict(s) for s in result.rank_stats]))


if __name__ == "__main__":
    main()
