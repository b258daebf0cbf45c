"""The calibration hidden states of a multi-process run: each rank computes its own batches (a contiguous range,
:meth:`~moequant.pipeline.distributed.context.DistContext.batch_range`); rank 0 also holds every batch (the work
directory's activations, which therefore do not depend on the number of ranks: a run resumes with any)."""
from __future__ import annotations

import torch

from ..states import HiddenStates, MemoryStates
from .context import DistContext

__all__ = ["BatchSlice", "gather_outputs", "scatter_states"]


class BatchSlice(HiddenStates):
    """Batches ``lo .. hi - 1`` of other hidden states (read through them; closing a slice closes nothing)."""

    def __init__(self, base: HiddenStates, batches: range) -> None:
        self.base, self.lo = base, batches.start
        self.shapes, self.dtype = list(base.shapes[batches.start:batches.stop]), base.dtype

    def _batch(self, b: int) -> torch.Tensor:
        return self.base[self.lo + b]


def gather_outputs(ctx: DistContext, sink, dtype: torch.dtype, local=None):
    """A layer's outputs of every batch on rank 0: ``sink`` (rank 0's, sized for every batch) holds rank 0's
    batches already; the other ranks' arrive in rank order and are appended; returns ``sink.finish()``. On another
    rank ``local`` (its finished :class:`HiddenStates`) is sent batch by batch; returns None."""
    what = "the layer's outputs"
    if ctx.is_root:
        for r in range(1, ctx.world):
            for shape in ctx.recv_object(r, what):
                sink.append(ctx.recv_tensor(shape, dtype, r, what).cpu())
        return sink.finish()
    ctx.send_object([tuple(s) for s in local.shapes], 0, what)
    for b in range(len(local)):
        ctx.send_tensor(local[b], 0, what)
    return None


def scatter_states(ctx: DistContext, full=None) -> HiddenStates:
    """This rank's batches of the hidden states ``full`` (every batch, given on rank 0, e.g. the resumed
    activations): rank 0 keeps a :class:`BatchSlice` of them, the others receive theirs (in memory)."""
    what = "the resumed activations"
    meta = ctx.broadcast_object((list(full.shapes), full.dtype) if ctx.is_root else None, 0, what)
    shapes, dtype = meta
    ranges = ctx.all_batch_ranges(len(shapes))
    if ctx.is_root:
        for r in range(1, ctx.world):
            for b in ranges[r]:
                ctx.send_tensor(full[b], r, what)
        return BatchSlice(full, ranges[0])
    return MemoryStates([ctx.recv_tensor(shapes[b], dtype, 0, what).cpu() for b in ranges[ctx.rank]])
