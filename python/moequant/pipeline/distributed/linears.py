"""The plain Linears of a layer in a multi-process run: each rank's forward records its batches' capture inputs
(:class:`RecordingAccumulator`, the capture's accumulator factory), every shared accumulator is rebuilt on one rank
from the inputs of all ranks in batch order (rank order is batch order), so its Hessian is bit-identical to one
process's, rank 0 solves every Linear exactly as one process does, and the solved weights go to every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..jobs import quantize_linears
from .context import DistContext

__all__ = ["RecordingAccumulator", "recording_factory", "rebuild_accumulators", "solve_linears",
           "broadcast_parameters"]


class RecordingAccumulator:
    """Stands in for a :class:`~moequant.ops.HessianAccumulator` while a rank runs its batches: keeps each ``add``
    call's rows, expert ids and weights (copies, on their device) instead of accumulating them."""

    def __init__(self, num_experts: int, dim: int, device) -> None:
        self.num_experts, self.dim, self.device = num_experts, dim, torch.device(device)
        self.calls: list = []

    def add(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        self.calls.append((x.detach().clone(), expert_ids.detach().to(torch.int32).clone(),
                           None if weights is None else weights.detach().float().clone()))


def recording_factory(num_experts: int, dim: int, device) -> RecordingAccumulator:
    """The capture's accumulator factory of a distributed pass."""
    return RecordingAccumulator(num_experts, dim, device)


def _send_calls(ctx: DistContext, calls: list, dst: int, what: str) -> None:
    ctx.send_object([(tuple(x.shape), x.dtype, w is not None) for x, _, w in calls], dst, what)
    for x, ids, w in calls:
        ctx.send_tensor(x, dst, what)
        ctx.send_tensor(ids, dst, what)
        if w is not None:
            ctx.send_tensor(w, dst, what)


def _recv_calls(ctx: DistContext, src: int, what: str) -> list:
    calls = []
    for shape, dtype, has_w in ctx.recv_object(src, what):
        x = ctx.recv_tensor(shape, dtype, src, what)
        ids = ctx.recv_tensor(shape[:1], torch.int32, src, what)
        w = ctx.recv_tensor(shape[:1], torch.float32, src, what) if has_w else None
        calls.append((x, ids, w))
    return calls


_STATE = ("counts", "mass", "absmax")


def _send_state(ctx: DistContext, acc, dst: int, what: str) -> None:
    for t in (acc.hessians, acc.counts, acc.mass, acc.absmax):
        ctx.send_tensor(t, dst, what)


def _recv_state(ctx: DistContext, acc, src: int, what: str) -> None:
    acc.hessians = ctx.recv_tensor(acc.hessians.shape, acc.dtype, src, what).to(acc.device)
    for name in _STATE:
        cur = getattr(acc, name)
        cur.copy_(ctx.recv_tensor(cur.shape, cur.dtype, src, what).to(cur.device))


def rebuild_accumulators(ctx: DistContext, accumulators: dict, factory) -> dict:
    """Replaces the :class:`RecordingAccumulator` values of ``accumulators`` (name -> accumulator; aliases share
    one object) by real ones on rank 0 (the returned dict; empty on the other ranks). The i-th distinct recorder is
    rebuilt on rank ``i % world`` from every rank's recorded calls, rank by rank (batch order), then sent to rank 0."""
    recorders: list = []
    for acc in accumulators.values():
        if isinstance(acc, RecordingAccumulator) and all(acc is not r for r in recorders):
            recorders.append(acc)
    real: dict = {}
    for i, rec in enumerate(recorders):
        owner, what = ctx.owner(i), f"the Hessian inputs of Linear accumulator {i}"
        if ctx.rank == owner:
            acc = factory(rec.num_experts, rec.dim, rec.device)
            for r in range(ctx.world):
                calls = rec.calls if r == ctx.rank else _recv_calls(ctx, r, what)
                for x, ids, w in calls:
                    acc.add(x, ids, w)
                del calls
            if owner != 0:
                _send_state(ctx, acc, 0, what)
                acc = None
        else:
            _send_calls(ctx, rec.calls, owner, what)
            acc = None
            if ctx.is_root:
                acc = factory(rec.num_experts, rec.dim, rec.device)
                _recv_state(ctx, acc, owner, what)
        rec.calls = []
        if acc is not None:
            real[id(rec)] = acc
    if not ctx.is_root:
        return {}
    return {name: real.get(id(acc), acc) for name, acc in accumulators.items()}


def broadcast_parameters(ctx: DistContext, module: nn.Module, skip: frozenset = frozenset(), src: int = 0,
                         what: str = "the solved weights") -> None:
    """Every parameter of ``module`` but those in ``skip`` (ids) from rank ``src`` to every rank (in place)."""
    for p in module.parameters():
        if id(p) not in skip:
            ctx.broadcast_(p.data, src, what)


@torch.no_grad()
def solve_linears(ctx: DistContext, capture, family, recipe, storage: torch.dtype, factory, layer: nn.Module,
                  skip: frozenset = frozenset(), probe=None) -> tuple[dict, list]:
    """The distributed twin of :func:`~moequant.pipeline.jobs.quantize_linears` on a capture whose accumulators
    recorded this rank's batches: rank 0 gets the whole Hessians, solves and returns the results and records (the
    other ranks: ``{}, []``); every rank then holds the written-back weights of ``layer`` (but ``skip``)."""
    lc = capture.linears
    lc.accumulators = rebuild_accumulators(ctx, lc.accumulators, factory)
    res, recs = quantize_linears(capture, family, recipe, storage, probe) if ctx.is_root else ({}, [])
    broadcast_parameters(ctx, layer, skip)
    return res, recs
