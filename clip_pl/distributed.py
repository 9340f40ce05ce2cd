"""Collectives the contrastive losses need, with the gradients they must carry, and those evaluation needs.

All functions degrade to the identity when ``torch.distributed`` is not initialised, so the same
code runs on one CPU process, on gloo and on NCCL.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

from data_pipelines.ranks import rank_and_world_size


def free_port() -> int:
    """A TCP port free on this machine, for ``MASTER_PORT`` of a single-node process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenates equal-shaped tensors from every rank along dim 0, keeping gradients.

    Backward: every rank holds a gradient for the whole gathered tensor (its loss used all of it as
    negatives); the gradient of this rank's slice is the sum of those over ranks. A plain
    ``all_gather`` drops the other ranks' contributions and a full N x N loss on every rank
    multiplies this one by the world size; the sum is what makes DDP's mean come out exact.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = rank_and_world_size()
        ctx.rank, ctx.batch = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((ctx.batch, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        # gloo has no reduce-scatter; the features are small, so an all-reduce costs little more.
        dist.all_reduce(grad)
        return grad.narrow(0, ctx.rank * ctx.batch, ctx.batch)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each of W ranks to ``[W * B, ...]`` in rank order, differentiable.

    Every rank must pass the same shape; the data pipeline guarantees equal batches.
    """
    if rank_and_world_size()[1] == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[n_r, ...]`` tensors concatenated in rank order, for any ``n_r``; no gradient.

    For evaluation, where ranks hold different numbers of samples.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class DeferredSum:
    """An integer summed over all ranks now and read one training step later, without a wait.

    Reading a device value at once (``.item()``) waits until the device has run everything queued
    before it, the whole step, so the host cannot queue the next step meanwhile. ``start`` copies
    the value in from pinned memory, all-reduces it behind the step's work, copies the sum back into
    pinned memory and records an event; ``read``, a step later, waits for that event only, which the
    device has normally passed by then. Every rank must call ``start`` the same number of times.
    """

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def start(self, value: int, device: torch.device) -> None:
        """Starts summing ``value`` over ranks on ``device``; a pending sum is dropped."""
        cuda = device.type == "cuda"
        # From and to pinned memory: a copy with pageable host memory would wait for the device.
        value_on_device = torch.tensor([value], dtype=torch.int64, pin_memory=cuda).to(device, non_blocking=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(value_on_device)  # no barrier first: that would wait for the device
        total = torch.empty(1, dtype=torch.int64, pin_memory=cuda)
        total.copy_(value_on_device, non_blocking=True)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self._pending = (total, event)

    def read(self) -> int:
        """The sum last started (the same on every rank), or 0 when none is pending; clears it."""
        if self._pending is None:
            return 0
        total, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return int(total.tolist()[0])


@contextlib.contextmanager
def fail_together(device: torch.device, what: str, world_size: int) -> Iterator[None]:
    """Runs the block; if it raises on any of ``world_size`` ranks, every rank raises after it.

    Every rank must enter it. Evaluation data can fail on one rank only (a bad label in its
    share); without this the others would wait in the next collective until the process group
    times out. The failing rank raises its own error, the others one that points to it.

    Args:
        device: Where the collective's flag lives (a CUDA device under NCCL).
        what: The work, for the message of the ranks that did not fail themselves.
        world_size: 1 runs the block as it is, without a collective.
    """
    error = None
    try:
        yield
    except Exception as exn:
        error = exn
    if world_size > 1:
        failed = torch.tensor([error is not None], dtype=torch.int64, device=device)
        dist.all_reduce(failed)
        if error is None and failed.item():
            raise RuntimeError(f"{what} failed on {failed.item()} other rank(s); their error is in their log")
    if error is not None:
        raise error
