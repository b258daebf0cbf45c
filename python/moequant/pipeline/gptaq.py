"""Asymmetric calibration (GPTAQ-style) of the routed experts' down_proj inside the expert streaming engine
(orchestration only; the math is :mod:`moequant.ops.gptaq`, twin :mod:`moequant.ref.gptaq`).

:func:`solve_group` replaces the engine's one ``finish_jobs`` call of a group of experts when the recipe's
``gptaq.enabled`` is set:

1. the group's gate/up jobs are solved and written back (the view now computes with the quantized gate/up);
2. pass 1's experts calls run through the group again, on the same routed rows and routing weights: the down_proj
   inputs through the original gate/up (``x``, from a copy of them) and through the quantized ones (``x~``) feed
   one Hessian accumulator of width ``2 I`` with the rows ``[x~, x - x~]``, which holds ``H~`` and ``C`` for every
   expert of the group at once;
3. the down_proj of every expert with its own Hessian (not on a fallback) gets the corrected target
   ``W* = W + alpha W C (H~ + damp)^-1`` (one batched solve for all of them) and ``H~`` as its Hessian; the
   experts on a fallback Hessian keep their plain job (no correction: they have no reliable ``C``);
4. the down_proj jobs are solved and written back.

With the ``shrink`` fallback policy a calibrated expert's ``H~`` is shrunk as its plain Hessian would be,
``(m H~ + k T) / (m + k)`` (T the layer's target of the plain down_proj Hessian), and ``C`` divided by ``m + k``.
The per-group sums are those of the whole-layer path (the same rows in the same order), so grouped and
whole-layer runs solve the same matrices.
"""
from __future__ import annotations

import torch
from torch import nn

from ..calibration.routing import expert_intermediate, route_tokens
from ..models import intermediate_size
from ..ops.gptaq import gptaq_targets, joint_rows, normalised_statistics
from .jobs import ExpertHessians, expert_jobs, finish_jobs

__all__ = ["solve_group", "original_copy"]


def original_copy(view: nn.Module) -> nn.Module:
    """A module computing like ``view`` (a fused experts view, :func:`~moequant.pipeline.experts.expert_view`)
    with its own copies of every parameter but the down projection's: the original gate/up while ``view``'s are
    overwritten by their quantized values."""
    copy = nn.Module.__new__(type(view))
    copy.__dict__.update(view.__dict__)
    copy._parameters = {n: (p if n.startswith("down_proj") else nn.Parameter(p.data.clone(), requires_grad=False))
                        for n, p in view._parameters.items()}
    return copy


def _local(idx: torch.Tensor, lut: torch.Tensor, pad: int) -> torch.Tensor:
    i = idx.long()
    valid = (i >= 0) & (i < lut.numel())
    return torch.where(valid, lut.to(i.device)[i.clamp(0, lut.numel() - 1)], torch.full_like(i, pad))


@torch.no_grad()
def joint_hessians(view: nn.Module, original: nn.Module, family, calls: list, lut: torch.Tensor, weighted: bool,
                   factory, device):
    """The ``2 I`` accumulator of the rows ``[x~, x - x~]`` of every routed row of ``calls`` (pass 1's experts
    calls; layer ids mapped to the view's by ``lut``, others padded), ``x`` through ``original``'s gate/up and
    ``x~`` through ``view``'s, weighted by the routing weights when ``weighted``."""
    n = int(view._parameters["gate_up_proj"].shape[0])
    acc = factory(n, 2 * intermediate_size(view, family), device)
    for hs, idx, w in calls:
        batch = route_tokens(hs, _local(idx, lut, n), w, n)
        if not batch.x.shape[0]:
            continue
        xt = expert_intermediate(view, family, batch)
        x = expert_intermediate(original, family, batch)
        acc.add(joint_rows(x, xt), batch.expert_ids, batch.weights if weighted else None)
    return acc


@torch.no_grad()
def solve_group(view: nn.Module, family, recipe, prefix: str, ids: list, now: list, hgu: ExpertHessians,
                hdn: ExpertHessians, amax, calls: list, lut: torch.Tensor, factory, device, storage,
                probe=None) -> tuple[dict, list]:
    """The group's ``finish_jobs`` with the asymmetric down_proj (module docstring). ``view`` holds the layer's
    experts ``ids`` (``now``: the local indices solved now); ``hgu`` / ``hdn``: the group's plain Hessians;
    ``calls``: pass 1's experts calls; ``lut``: layer expert id -> view index. Returns ``finish_jobs``' results in
    the plain path's order."""
    jobs = expert_jobs(view, family, recipe, prefix, ids, now, hgu.get, hdn.get, hgu.counts, amax)
    down = {family.disk_expert_names(prefix, ids[j])["down"]: j for j in now}
    gu_jobs = [job for job in jobs if job.record not in down]
    dn_jobs = [job for job in jobs if job.record in down]
    original = original_copy(view) if dn_jobs else None
    res_gu, rec_gu = finish_jobs(gu_jobs, storage, recipe, probe)
    if dn_jobs:
        _correct(dn_jobs, down, view, original, family, recipe, hdn, calls, lut, factory, device)
    del original
    res_dn, rec_dn = finish_jobs(dn_jobs, storage, recipe, probe)
    res = {**res_gu, **res_dn}
    order = [name for job in jobs for name, _, _ in job.outputs]
    return {k: res[k] for k in order if k in res}, rec_gu + rec_dn


def _correct(dn_jobs: list, down: dict, view, original, family, recipe, hdn: ExpertHessians, calls, lut,
             factory, device) -> None:
    """Gives every down_proj job of an expert with its own Hessian the corrected target and ``H~``."""
    cfg = recipe.gptaq
    todo = [job for job in dn_jobs if job.fallback is None and not job.force_rtn and job.h is not None
            and hdn.calibrated(down[job.record])]
    if not todo:
        return
    acc = joint_hessians(view, original, family, calls, lut, recipe.routing_weighted, factory, device)
    raw = acc.hessians
    shrink = hdn.policy == "shrink"
    hs, cs = [], []
    for job in todo:
        j = down[job.record]
        target = hdn._target(j) if shrink else None  # noqa: SLF001 - the plain Hessian's shrinkage target
        h, c = normalised_statistics(raw[j], hdn.mass[j], hdn.k, target)
        hs.append(h)
        cs.append(c)
    by_damp: dict = {}
    for i, job in enumerate(todo):
        by_damp.setdefault(float(job.scheme.damp), []).append(i)
    for damp, idx in by_damp.items():
        w = torch.stack([todo[i].w for i in idx])
        targets = gptaq_targets(w, torch.stack([hs[i] for i in idx]), torch.stack([cs[i] for i in idx]),
                                cfg.alpha, damp, recipe.solver_memory_gb)
        for k, i in enumerate(idx):
            todo[i].w, todo[i].h = targets[k], hs[i].contiguous()
