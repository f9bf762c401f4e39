"""The process group as EVA needs it: owners per PCA group, tokens routed to owners, agreement every step.

One code path serves one process (`Comm()`: every call is local) and many (`TorchComm`: gloo on CPU, NCCL on
GPU). Every step ends in an agreement that also carries an error flag: a rank that fails makes every rank
raise (with the failing rank's message) at the next agreement instead of hanging in a collective. `collectively`
is the one way code runs a part that may fail on some ranks only:

    with collectively(comm, values=local_sums) as shared:   # a failure inside is not raised here but agreed on
        work()
    total = shared.values        # local_sums() of every rank, summed; every rank gets here, or every rank raises
"""

from __future__ import annotations

import datetime
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, DistributedError

log = logging.getLogger("evapipe")


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank per item, most expensive first onto the least-loaded rank (deterministic on every rank)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


ROUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_code(x: torch.Tensor) -> int:
    return ROUTE_DTYPES.index(x.dtype) if x.dtype in ROUTE_DTYPES else 0


def _sendable(x: torch.Tensor) -> torch.Tensor:
    """Tokens as sent: contiguous, in a dtype the receiver can name (anything else goes as float32)."""
    return (x if x.dtype in ROUTE_DTYPES else x.float()).contiguous()


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows from all ranks in rank order, in the dtype of the first non-empty part."""
    dtype = next((p.dtype for p in parts if p.shape[0] > 0), parts[0].dtype)
    return torch.cat([p.to(dtype) for p in parts]) if len(parts) > 1 else parts[0]


class Comm:
    """A world of one: every collective is the identity. Subclassed by TorchComm."""

    rank = 0
    world = 1

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, error: BaseException | None, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sum `values` over ranks; raise on every rank if any rank passed an error."""
        if error is not None:
            raise error
        return values

    def broadcast(self, obj: Any) -> Any:
        return obj

    def route(self, tokens: Mapping[str, torch.Tensor], owner: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Each owner receives the rows all ranks captured for its groups (concatenated in rank order)."""
        return dict(tokens)

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        return [obj]

    def close(self) -> None:
        pass


class TorchComm(Comm):
    """torch.distributed-backed Comm; the collective device is the local GPU under NCCL, CPU under gloo."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        super().__init__(device if self.backend == "nccl" else "cpu")

    def agree(self, error: BaseException | None, values: torch.Tensor | None = None) -> torch.Tensor | None:
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=self.device)
        payload = flag if values is None else torch.cat([flag, values.to(self.device, torch.float64).reshape(-1)])
        self.dist.all_reduce(payload)
        if payload[0] > 0:
            message = None if error is None else "".join(traceback.format_exception_only(type(error), error)).strip()
            messages: list[Any] = [None] * self.world
            self.dist.all_gather_object(messages, (self.rank, message))
            if error is not None:
                raise error
            failed = "; ".join(f"rank {r}: {m}" for r, m in messages if m is not None)
            raise DistributedError(f"another rank failed, stopping this one too ({failed})")
        return None if values is None else payload[1:].to(values.dtype).reshape(values.shape)

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def route(self, tokens: Mapping[str, torch.Tensor], owner: Mapping[str, int]) -> dict[str, torch.Tensor]:
        names = list(tokens)
        if not names:
            return {}
        # per group: rows and dtype code of every rank's tokens, so owners size their buffers (a rank with an
        # empty share holds a placeholder whose dtype may differ from the others' real tokens)
        meta = torch.tensor([[tokens[n].shape[0] for n in names], [_dtype_code(tokens[n]) for n in names]],
                            dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(meta) for _ in range(self.world)]
        self.dist.all_gather(gathered, meta)
        counts, codes = torch.stack(gathered).unbind(1)  # each [rank][layer]
        counts, codes = counts.tolist(), codes.tolist()
        ops, received, error = [], {}, None
        try:  # moving and allocating can fail on one rank (out of memory): agreed before any transfer starts
            for j, name in enumerate(names):
                x, dst = tokens[name].to(self.device), owner[name]
                if dst != self.rank:
                    if counts[self.rank][j] > 0:
                        ops.append(self.dist.P2POp(self.dist.isend, _sendable(x), dst, tag=j))
                    continue
                parts = []
                for src in range(self.world):
                    if src == self.rank:
                        parts.append(x)
                    elif counts[src][j] > 0:
                        buf = x.new_empty((counts[src][j], x.shape[1]), dtype=ROUTE_DTYPES[codes[src][j]])
                        ops.append(self.dist.P2POp(self.dist.irecv, buf, src, tag=j))
                        parts.append(buf)
                received[name] = parts
        except Exception as err:
            error = err
        self.agree(error)
        if ops:
            for req in self.dist.batch_isend_irecv(ops):
                req.wait()
        return {n: _concat(parts) for n, parts in received.items()}

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


@dataclass
class Shared:
    """What a `collectively` block agreed on: the `values` of every rank, summed (None when none were given)."""

    values: torch.Tensor | None = None


@contextmanager
def collectively(
    comm: Comm, error: BaseException | None = None, values: Callable[[], torch.Tensor] | None = None
) -> Iterator[Shared]:
    """Run a block on every rank, then agree: if it failed on any rank (or this rank met `error` before it),
    every rank raises, the failing ones their own error, the others a DistributedError naming it.

    Every rank reaches the agreement (a rank that fails does not skip the collective the others wait in); a
    block should do nothing when `error` is already set. `values()`, called after the block even when it
    failed (it must not fail itself: the others wait for its sum), is summed over ranks into `Shared.values`.
    """
    shared = Shared()
    try:
        yield shared
    except Exception as err:
        error = error or err
    shared.values = comm.agree(error, None if values is None else values())


def local_device(requested: str = "auto") -> torch.device:
    """This rank's device: its local GPU (LOCAL_RANK) when there is one and it is not declined, else the CPU.

    `auto` falls back to the CPU when no GPU is visible, whatever a launcher set in the environment (an accelerate
    MULTI_GPU config on a CPU-only machine still starts CPU processes); `cuda` insists on a GPU.
    """
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):  # an explicit device such as cuda:1: the user placed this rank
        device = torch.device(requested)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's object collectives use the current device
        return device
    if not torch.cuda.is_available():
        raise ConfigError("model.device is `cuda` but no GPU is visible to this process; use `auto` or `cpu`")
    local_rank, n_gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= n_gpus:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own ({n_gpus} visible): start at most {n_gpus} processes "
            "per node, or set model.device=cpu"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def attempt_store(timeout: datetime.timedelta) -> Any:
    """Under torchrun's elastic agent: the agent's store, with keys of their own for this attempt; else None.

    The agent's store outlives a restart (`--max-restarts`) and still holds the previous attempt's addresses, which
    a restarted rank can read before its peers overwrite them, and then fail to connect (seen with gloo here, and
    pytorch/pytorch#167288 with NCCL). A key prefix per restart count keeps the attempts apart.
    """
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"evapipe/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_comm(device: torch.device, timeout_s: float = 600.0, backend: str = "auto") -> Comm:
    """Join the process group that torchrun / accelerate launch describe in the environment, if any.

    Rank and world size come from torch.distributed, not accelerate's PartialState (which reports a world of one
    for multi-process CPU jobs).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Comm(device)
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        extra = {"device_id": device} if backend == "nccl" and device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        store = attempt_store(timeout)
        if store is not None:
            extra.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(backend=backend, timeout=timeout, **extra)
    if dist.get_world_size() == 1:
        return Comm(device)
    return TorchComm(device)
