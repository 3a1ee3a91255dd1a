"""Training across processes (`torchrun`): the process group, which rank this is, and the few collectives the
trainer uses. With one process (no torchrun environment) every function here is the identity, so the trainer has
one code path.

- `start()` joins the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
  NCCL when the process trains on a GPU, gloo on CPU;
- `gather_rows(x)`: every rank's (n_r, D) rows concatenated in rank order, differentiable: the local slice is the
  tensor itself, and the backward pass hands every rank the gradient of ITS rows summed over all ranks' losses,
  so a loss computed against the gathered rows has the gradient one process holding all rows would compute;
- `gather_array`, `sum_array`, `broadcast`, `barrier`: plain collectives for codes, counts and decisions.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# How long ranks wait for each other (rank 0 validating while the others wait, a slow first data load).
TIMEOUT = dt.timedelta(minutes=30)


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that validates, logs progress and writes artifacts."""
    return rank() == 0


def start(device: torch.device) -> None:
    """Join the process group torchrun set up (no-op without one): NCCL for CUDA devices, gloo otherwise."""
    if not launched() or active():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=TIMEOUT)


def stop() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object; small: a decision, a version name)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _device_of(x: torch.Tensor) -> torch.device:
    return x.device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_array(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's 1-d `x` concatenated in rank order, and each rank's length."""
    if not active():
        return x, np.array([len(x)])
    sizes = _sizes(len(x), torch.device("cpu") if dist.get_backend() != "nccl" else torch.device("cuda"))
    padded = torch.zeros(int(sizes.max()), dtype=torch.int64)
    padded[: len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
    if dist.get_backend() == "nccl":
        padded = padded.cuda()
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    out = np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, sizes.tolist(), strict=True)])
    return out, sizes


def sum_array(x: np.ndarray) -> np.ndarray:
    """The elementwise sum of `x` over ranks (float64 or int64 arrays of the same shape everywhere)."""
    if not active():
        return x
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def _sizes(n: int, device: torch.device) -> np.ndarray:
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world())]
    dist.all_gather(sizes, local)
    return np.array([int(s.item()) for s in sizes])


class _GatherRows(torch.autograd.Function):
    """all_gather of (n_r, D) tensors of different n_r: padded to the largest, gathered, unpadded."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], rank_: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank_
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank's loss used every rank's rows: sum the gradients of all ranks, keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order; differentiable (see the module docstring). With one
    process: `x`."""
    if not active():
        return x
    sizes = _sizes(x.shape[0], _device_of(x)).tolist()
    out: torch.Tensor = _GatherRows.apply(x, sizes, rank())
    return out
