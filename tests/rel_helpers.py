"""Helpers that the reliability tests run inside torchrun's ranks (tests/ is on their PYTHONPATH).

* `die_once_on_rank1`: a `hooks.forward_fn` that SIGKILLs rank 1 at its 6th forward pass (step 5) on the first
  attempt only (TORCHELASTIC_RESTART_COUNT 0), so `torchrun --max-restarts 1` restarts the group;
* `gated_forward`: a `hooks.forward_fn` that touches `$EVAPIPE_TEST_GATE.reached` and waits until the file
  `$EVAPIPE_TEST_GATE` exists, so a test orders events between processes without sleeping for a guessed time;
* `python tests/rel_helpers.py skew-key --config C`: the compute job where every rank but 0 hashes the model
  folder differently (node-local copies with other mtimes), printing `rank R cached=...`;
* `python tests/rel_helpers.py fail-mark --config C`: the compute job where rank 0 cannot write a checkpoint's
  completion mark (a full disk).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_calls = 0


def die_once_on_rank1(model: Any, inputs: Any) -> Any:
    from evapipe.model.forward import default_forward

    global _calls
    _calls += 1
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and _calls == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return default_forward(model, inputs)


def gated_forward(model: Any, inputs: Any) -> Any:
    from evapipe.model.forward import default_forward

    gate = Path(os.environ["EVAPIPE_TEST_GATE"])
    Path(f"{gate}.reached").touch()
    deadline = time.monotonic() + 300
    while not gate.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test never opened {gate}")
        time.sleep(0.02)
    return default_forward(model, inputs)


def main() -> None:
    from evapipe import load_config, run_job
    from evapipe.states import checkpoint, store

    mode, config = sys.argv[1], sys.argv[sys.argv.index("--config") + 1]
    rank = int(os.environ["RANK"])
    if mode == "skew-key" and rank != 0:
        real = store.model_folder_digest
        store.model_folder_digest = lambda folder: real(folder) + f"-node{rank}"
    if mode == "fail-mark" and rank == 0:
        def full_disk(*args: Any) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        checkpoint._mark_complete = full_disk
    result = run_job(load_config(config), show_progress=False)
    print(f"rank {rank} cached={result.cached}", flush=True)


if __name__ == "__main__":
    main()
