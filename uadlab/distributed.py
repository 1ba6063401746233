"""torch.distributed for uadlab: launched by ``torchrun``, gloo on CPU, NCCL on GPU.

``python -m uadlab`` is the command line, so ``torchrun --standalone --nproc-per-node 2 -m uadlab fit ...``
runs it in two processes. Every helper here is a no-op (or the identity) in a plain one-process run, so the
code that calls them reads the same either way:

- ``init()`` joins the process group that torchrun describes in ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...;
- ``shard(n)`` is this rank's contiguous part of ``n`` items (sizes differ by at most one, any n);
- ``all_gather_cat(t)`` concatenates every rank's tensor along dim 0 in rank order (sizes may differ), so
  gathering the shards of ``shard`` gives back the one-process order;
- ``all_gather_stack(t)`` stacks every rank's same-shaped tensor, ``all_reduce_sum(t)`` sums them.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> bool:
    """Join torchrun's process group when launched by torchrun with several processes; True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints, writes runs and reports."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(n: int, r: int | None = None, world: int | None = None) -> slice:
    """Rank ``r``'s contiguous part of ``n`` items: the first ``n % world`` ranks get one more (uneven n)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order; the first dimension may differ per rank
    (other dimensions and dtype must agree). Padded to the largest size for the collective, then trimmed."""
    if not is_distributed():
        return t
    dev = _device()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(t)], device=dev))
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[:len(t)] = t.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """(world, *t.shape): every rank's ``t`` (same shape and dtype on every rank) in rank order; ``t[None]`` in
    one process."""
    if not is_distributed():
        return t[None]
    dev = _device()
    parts = [torch.empty_like(t, device=dev) for _ in range(world_size())]
    dist.all_gather(parts, t.to(dev))
    return torch.stack(parts).to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over ranks (a new tensor); ``t`` itself in one process. Where only one rank
    holds a non-zero value, the sum is that value exactly (x + 0 = x)."""
    if not is_distributed():
        return t
    out = t.to(_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_reduce_mean(x: float) -> float:
    """The mean of a number over ranks (a loss to report); ``x`` itself in one process."""
    if not is_distributed():
        return x
    t = torch.tensor([float(x)], device=_device())
    dist.all_reduce(t)
    return float(t) / world_size()


def local_part(n: int) -> slice:
    """This rank's part of a global batch of ``n`` in data-parallel training; the whole batch when it is
    smaller than the number of ranks (then every rank computes the same gradient)."""
    return shard(n) if is_distributed() and n >= world_size() else slice(0, n)


def average_gradients(params, n: int) -> None:
    """After ``backward`` on this rank's ``local_part(n)`` of a batch of ``n``: every rank's gradients replaced by
    their sum over ranks, each weighted by the rank's share of the batch, so a loss that is a mean over the
    batch gets exactly the one-process gradient (up to rounding), whatever the shard sizes. What
    DistributedDataParallel's reducer does (one flat all-reduce); the methods' training loops call their own
    modules' methods rather than one ``forward``, which DDP's hooks need. Parameters are equal on every rank
    from the start (same seed) and stay so (same gradients, same optimiser)."""
    if not is_distributed():
        return
    part = local_part(n)
    share = (part.stop - part.start) / n if n >= world_size() else 1.0 / world_size()
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads]) * share
    dist.all_reduce(flat)
    for g in grads:
        g.copy_(flat[:g.numel()].view_as(g))
        flat = flat[g.numel():]
