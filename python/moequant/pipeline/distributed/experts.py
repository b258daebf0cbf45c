"""The routed experts of a MoE layer in a multi-process run (the distributed twin of
:meth:`moequant.pipeline.experts.MoELayerEngine._experts`; orchestration only).

* the experts are cut into **units**: the engine's groups, or, when one group holds the whole layer, one
  contiguous slice per rank; unit ``u`` belongs to rank ``u % world`` and a round of ``world`` units runs in
  parallel: each owner receives, call by call in batch order, the pass-1 rows routed to its unit
  (:func:`stream_rows`; the ``shrink`` fallback: every row to every rank, :func:`all_calls`), so an expert's
  Hessian is accumulated from exactly the rows, in exactly the order, of one process; then it applies the fallback
  and solves the unit;
* the layer-wide means of the ``mean`` fallback are summed unit by unit in expert order (the owner adds its
  experts and hands the running sums to every rank), the ``shrink`` targets are computed on every rank;
* per unit, in order: its owner broadcasts the solved (dequantized) weights and the unit's statistics to every
  rank and sends its codes and records to rank 0; every rank adds the unit's quantized outputs on its own pass-2
  calls (several groups), or, with one group, runs the whole quantized experts module on them at the end;
* starved experts whose fallback needs the final mean are solved on rank 0 after all units, as one process does.
"""
from __future__ import annotations

import torch

from ...calibration.capture import ExpertCapture
from ..experts import ChunkedCalls, _RunningMean, expert_view, group_hessians
from ..host import results_to_host
from ..groups import local_ids
from ..jobs import expert_jobs, finish_jobs
from .context import DistContext

__all__ = ["all_calls", "stream_rows", "routing_calls", "units_of", "distributed_experts"]


def all_calls(ctx: DistContext, calls: list, device) -> list:
    """Every rank's experts calls ``(hidden_states, top_k_index, top_k_weights)``, rank by rank (batch order), on
    ``device`` on every rank."""
    out: list = []
    for src in range(ctx.world):
        what = f"pass 1's routed rows of rank {src}"
        mine = ctx.rank == src
        header = ctx.broadcast_object([[(tuple(t.shape), t.dtype) for t in c] for c in calls] if mine else None,
                                      src, what)
        for k, spec in enumerate(header):
            if mine:
                for t in calls[k]:
                    ctx.broadcast_(t.contiguous().to(ctx.device), src, what)
                out.append(calls[k])
            else:
                got = [ctx.broadcast_(torch.empty(s, dtype=d, device=ctx.device), src, what).to(device)
                       for s, d in spec]
                out.append(tuple(got))
    return out


def stream_rows(ctx: DistContext, engine, units: dict, mine: dict, calls: list, counts: list, device,
                per: int = 1) -> None:
    """Feeds each unit of a round (``units``: unit -> experts slice) on its owner (``mine[u] = (view, ids, capture,
    lut)``) with pass 1's rows of every batch routed to it: source rank by source rank, call by call (batch
    order), the rows of a call that route to the unit, in their order (``counts``: calls per rank), ``per`` calls
    a chunk by their batch index (:class:`~moequant.pipeline.experts.ChunkedCalls`). A capture fed so holds exactly
    the Hessians of one process's (each expert's rows, in the same order and chunks); the rows are not kept."""
    ref = calls[0]  # every rank has a call: the trailing shapes and dtypes of everyone's
    chunks = {u: ChunkedCalls(mine[u][2], per) for u in units if u in mine}
    first = [sum(counts[:src]) for src in range(ctx.world)]  # each rank's first batch index
    for src in range(ctx.world):
        for k in range(counts[src]):
            call = calls[k] if ctx.rank == src else None
            for u, g in units.items():
                owner = ctx.owner(u)
                if ctx.rank not in (src, owner):
                    continue
                if owner == src:
                    hs, idx, w = call
                elif ctx.rank == src:
                    hs, idx, w = (t.reshape(-1, t.shape[-1]) for t in call)
                    sel = ((idx >= g.start) & (idx < g.stop)).any(-1).nonzero().reshape(-1)
                    what = f"the routed rows of experts {g.start}..{g.stop - 1}"
                    ctx.send_tensor(torch.tensor([sel.numel()], dtype=torch.int64), owner, what)
                    if sel.numel():
                        for t in (hs, idx, w):
                            ctx.send_tensor(t.index_select(0, sel), owner, what)
                    continue
                else:
                    what = f"the routed rows of experts {g.start}..{g.stop - 1}"
                    n = int(ctx.recv_tensor((1,), torch.int64, src, what)[0])
                    if not n:
                        continue
                    hs, idx, w = (ctx.recv_tensor((n, t.shape[-1]), t.dtype, src, what).to(device) for t in ref)
                view, ids, cap, lut = mine[u]
                chunks[u].add(first[src] + k, hs, local_ids(idx, lut, len(ids)), w)
    for c in chunks.values():
        c.flush()


def routing_calls(ctx: DistContext, calls: list) -> list:
    """On rank 0, ``(None, top_k_index, top_k_weights)`` of every rank's calls in batch order (the routing mass);
    elsewhere []."""
    what = "the routing weights"
    if not ctx.is_root:
        ctx.send_object([(tuple(c[1].shape), c[1].dtype, tuple(c[2].shape), c[2].dtype) for c in calls], 0, what)
        for _, idx, w in calls:
            ctx.send_tensor(idx, 0, what)
            ctx.send_tensor(w, 0, what)
        return []
    out = [(None, idx, w) for _, idx, w in calls]
    for src in range(1, ctx.world):
        for si, di, sw, dw in ctx.recv_object(src, what):
            out.append((None, ctx.recv_tensor(si, di, src, what), ctx.recv_tensor(sw, dw, src, what)))
    return out


def units_of(groups: list, single: bool, num: int, world: int) -> list[slice]:
    """The units of distribution: the engine's groups, or with one group ``min(world, num)`` contiguous slices."""
    if not single:
        return list(groups)
    n = min(world, num)
    return [slice(u * num // n, (u + 1) * num // n) for u in range(n)]


def _broadcast_mean(ctx: DistContext, mean: _RunningMean, src: int, device, what: str) -> None:
    """The running sums of ``src`` on every rank (``mean`` updated in place)."""
    specs = ctx.broadcast_object((mean.n_ok, mean.n_any, [None if t is None else (tuple(t.shape), t.dtype,
                                                                                 t.device.type)
                                                          for t in (mean.ok, mean.any)]) if ctx.rank == src else None,
                                 src, what)
    mean.n_ok, mean.n_any = specs[0], specs[1]
    vals = []
    for t, spec in zip((mean.ok, mean.any), specs[2]):
        if spec is None:
            vals.append(None)
            continue
        if ctx.rank != src:
            t = torch.empty(spec[0], dtype=spec[1], device=device if spec[2] == "cuda" else "cpu")
        vals.append(ctx.broadcast_(t, src, what))
    mean.ok, mean.any = vals


def _broadcast_weights(ctx: DistContext, experts, view, where, src: int, what: str) -> None:
    """The solved weights of the experts ``where`` (a slice or an index tensor) from ``src``'s ``view`` into every
    rank's layer parameters."""
    for name, p in experts._parameters.items():
        if ctx.rank == src:
            v = view._parameters[name].data
            ctx.broadcast_(v, src, what)
            got = v
        else:
            got = ctx.broadcast_(torch.empty_like(view._parameters[name].data if view is not None else
                                                  (p.data[where] if isinstance(where, slice) else
                                                   p.data.index_select(0, where.to(p.device)))),
                                 src, what)
        if isinstance(where, slice):
            if got.data_ptr() != p.data[where].data_ptr():
                p.data[where].copy_(got.to(p.device))
        else:
            p.data.index_copy_(0, where.to(p.device), got.to(p.device))


@torch.no_grad()
def distributed_experts(engine, plan, calls1: list, calls2: list, ctx: DistContext):
    """What :meth:`~moequant.pipeline.experts.MoELayerEngine._experts` returns (results and records complete on
    rank 0, empty elsewhere; tokens, mass and the outputs of this rank's pass-2 calls on every rank) and the
    routing mass of every batch's calls (``_routing_mass``)."""
    recipe, fam, ph = engine.recipe, engine.family, engine.phases
    fb = recipe.fallback
    weighting = "routing" if recipe.routing_weighted else "none"
    shrink, defer = fb.policy == "shrink", fb.policy == "mean"
    groups = engine._groups(plan.size)
    single = len(groups) == 1 and plan.resident
    num, device = engine.num, engine.device
    units = units_of(groups, single, num, ctx.world)
    with ph("expert_exchange"):
        # shrink needs every row on every rank (its all-token targets); else each owner receives, round by round
        # and batch by batch, only the rows routed to its unit (stream_rows) and nothing is kept
        calls = all_calls(ctx, calls1, device) if shrink else None
        counts = None if shrink else [ctx.broadcast_object(len(calls1), r, "the experts calls per rank")
                                      for r in range(ctx.world)]
        # the Hessian chunks of the one-process run (ChunkedCalls): from batch 0's tokens, on rank 0
        per = ctx.broadcast_object(engine.chunk_calls(calls1) if ctx.is_root else None, 0, "the calls per chunk")
    prior = pooled = None
    if shrink:  # every rank computes the targets (the same rows in the same order: the same values)
        with ph("expert_hessians"):
            prior = engine._all_token_hessian(calls)
            if len(units) > 1:
                pooled = engine._pooled(calls, groups, weighting, per)
    tokens, mass = [0] * num, [0.0] * num
    amax = [(0.0, 0.0)] * num
    results, records = {}, {}
    means = (_RunningMean(), _RunningMean())
    deferred: list[int] = []
    out_acc = None if single else [torch.zeros(c[0].shape, dtype=torch.float32, device=c[0].device) for c in calls2]
    last = None
    for start in range(0, len(units), ctx.world):
        rnd = list(range(start, min(start + ctx.world, len(units))))
        mine = {}  # unit -> (view, ids, cap, hgu, hdn, res, recs, now, starved)
        for u in rnd:
            if ctx.owner(u) != ctx.rank:
                continue
            g = units[u]
            ids = list(range(g.start, g.stop))
            view = expert_view(engine.experts, g, device)
            lut = engine._lut(ids, len(ids))
            with ph("expert_hessians"):
                cap = ExpertCapture(view, fam, weighting=weighting, accumulator_factory=engine.factory,
                                    all_token_down=shrink and fb.calibrate_all_experts)
                if calls is not None:
                    engine._feed(cap, calls, lut, len(ids), per)
            mine[u] = (view, ids, cap, lut)
        if calls is None:  # every owner's unit gets its rows, in batch order
            with ph("expert_exchange"):
                stream_rows(ctx, engine, {u: units[u] for u in rnd}, mine, calls1, counts, device, per)
        for u in rnd:
            if ctx.owner(u) != ctx.rank:
                continue
            view, ids, cap, lut = mine[u]
            hgu, hdn = group_hessians(cap, fb, prior, pooled, means)
            for j, (e, a_gu, a_dn) in enumerate(zip(ids, cap.gate_up.absmax.tolist(), cap.down.absmax.tolist())):
                tokens[e], mass[e], amax[e] = hgu.counts[j], round(hgu.mass[j], 6), (a_gu, a_dn)
            now = [j for j in range(len(ids)) if not defer or hgu.calibrated(j)]
            starved = [ids[j] for j in range(len(ids)) if defer and not hgu.calibrated(j)]
            with ph("expert_solve"):
                jobs = expert_jobs(view, fam, recipe, engine.prefix, ids, now, hgu.get, hdn.get, hgu.counts,
                                   lambda j, ids=ids: amax[ids[j]])
                res, recs = finish_jobs(jobs, engine.storage, recipe, probe=engine.probe)
            mine[u] = (view, ids, cap, hgu, hdn, res, recs, [ids[j] for j in now], starved)
            last = (hgu, hdn)
            del jobs
        if defer:  # the layer means, summed in expert order: unit by unit, each owner adding its experts
            with ph("expert_exchange"):
                for u in rnd:
                    if u in mine:
                        _, ids, cap, hgu, hdn, *_ = mine[u]
                        for j in range(len(ids)):
                            for running, acc, hess in zip(means, (cap.gate_up, cap.down), (hgu, hdn)):
                                running.add(acc, j, hess)
                    for k, running in enumerate(means):
                        _broadcast_mean(ctx, running, ctx.owner(u), device, f"the layer's mean Hessians ({k})")
        for u in rnd:  # every rank: the unit's weights and statistics; rank 0: its codes and records
            owner, g, what = ctx.owner(u), units[u], f"the solved experts {units[u].start}..{units[u].stop - 1}"
            with ph("expert_exchange"):
                if owner == ctx.rank:
                    view, ids, cap, hgu, hdn, res, recs, solved, starved = mine.pop(u)
                    del cap
                    stats = (ids, [tokens[e] for e in ids], [mass[e] for e in ids], [amax[e] for e in ids],
                             solved, starved)
                else:
                    view, res, recs = None, None, None
                    stats = None
                stats = ctx.broadcast_object(stats, owner, what)
                ids, t_, m_, a_, solved, starved = stats
                for e, t, m, a in zip(ids, t_, m_, a_):
                    tokens[e], mass[e], amax[e] = t, m, a
                deferred += starved
                _broadcast_weights(ctx, engine.experts, view, g, owner, what)
                if owner == 0 and ctx.is_root:
                    _keep(results, records, res if single else results_to_host(res), recs)
                elif owner == ctx.rank:
                    ctx.send_object((results_to_host(res), recs), 0, what)
                elif ctx.is_root:
                    _keep(results, records, *ctx.recv_object(owner, what))
            if not single:
                with ph("expert_outputs"):
                    v = view if view is not None else expert_view(engine.experts, g, device)
                    engine._outputs(v, ids, solved, calls2, out_acc)
            del view
    if deferred:  # starved experts: their fallback needs the layer's final mean Hessians (rank 0 solves them)
        ids = sorted(deferred)
        sel = torch.tensor(ids, dtype=torch.long)
        view = expert_view(engine.experts, sel, device)
        what = "the fallback experts"
        if ctx.is_root:
            with ph("expert_solve"):
                res, recs = engine.solve_deferred(view, ids, last, tokens, amax)
            _keep(results, records, results_to_host(res), recs)
        with ph("expert_exchange"):
            _broadcast_weights(ctx, engine.experts, view, sel, 0, what)
        if not single:
            with ph("expert_outputs"):
                engine._outputs(expert_view(engine.experts, sel, device), ids, ids, calls2, out_acc)
    routing = engine._routing_mass(calls if calls is not None else routing_calls(ctx, calls1))
    del calls
    with ph("expert_outputs"):
        if single:  # every rank holds the whole quantized experts module now: one process's computation
            expert_out = [engine.experts(hs, idx, w) for hs, idx, w in calls2]
        else:
            expert_out = [a.to(c[0].dtype) for a, c in zip(out_acc, calls2)]
    return results, [r for e in sorted(records) for r in records[e]], tokens, mass, expert_out, routing


def _keep(results: dict, records: dict, res: dict, recs: list) -> None:
    results.update(res)
    for r in recs:
        e = int(r.name.split("+")[0].rsplit(".", 2)[-2])
        records.setdefault(e, []).append(r)
