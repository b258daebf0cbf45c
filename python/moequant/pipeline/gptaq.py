"""Asymmetric calibration (GPTAQ-style) inside the expert streaming engine (orchestration only; the math is
:mod:`moequant.ops.gptaq`, twin :mod:`moequant.ref.gptaq`): the routed experts' down_proj (:func:`solve_group`),
o_proj and the shared expert's down_proj (:func:`solve_linears`).

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

:func:`solve_linears` replaces the engine's ``quantize_linears``: the Linears of :func:`deferred_linears` (each
attention's output projection, the shared expert's down_proj) have their pass-1 inputs recorded
(:class:`LinearInputs`), are solved after the layer's other Linears, on the inputs one more forward of the layer
gives them, paired call by call with the recorded ones.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..calibration.routing import expert_intermediate, route_tokens
from ..models import intermediate_size
from ..ops.gptaq import gptaq_targets, joint_rows, normalised_statistics
from .groups import local_ids
from .jobs import ExpertHessians, expert_jobs, finish_jobs, linear_jobs

__all__ = ["solve_group", "original_copy", "joint_hessians", "deferred_linears", "LinearInputs", "solve_linears"]


def original_copy(view: nn.Module) -> nn.Module:
    """A module computing like ``view`` (a fused experts view, :func:`~moequant.pipeline.experts.expert_view`)
    with its own copies of every parameter but the down projection's: the original gate/up while ``view``'s are
    overwritten by their quantized values."""
    copy = nn.Module.__new__(type(view))
    copy.__dict__.update(view.__dict__)
    copy._parameters = {n: (p if n.startswith("down_proj") else nn.Parameter(p.data.clone(), requires_grad=False))
                        for n, p in view._parameters.items()}
    return copy


@torch.no_grad()
def joint_hessians(view: nn.Module, original: nn.Module, family, calls: list, lut: torch.Tensor, weighted: bool,
                   factory, device):
    """The ``2 I`` accumulator of the rows ``[x~, x - x~]`` of every routed row of ``calls`` (pass 1's experts
    calls; layer ids mapped to the view's by ``lut``, others padded), ``x`` through ``original``'s gate/up and
    ``x~`` through ``view``'s, weighted by the routing weights when ``weighted``."""
    n = int(view._parameters["gate_up_proj"].shape[0])
    acc = factory(n, 2 * intermediate_size(view, family), device)
    for hs, idx, w in calls:
        batch = route_tokens(hs, local_ids(idx, lut, n), w, n)
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
    stats = [normalised_statistics(raw[down[job.record]], hdn.mass[down[job.record]], hdn.k,
                                   hdn.shrinkage_target(down[job.record]) if shrink else None) for job in todo]
    _retarget(todo, stats, cfg.alpha, recipe.solver_memory_gb)


def _retarget(jobs: list, stats: list, alpha: float, memory_gb: float) -> None:
    """Gives every job its corrected target and ``H~`` (``stats[i]``: ``(H~, C)`` of ``jobs[i]``), the targets
    computed in one batch per damping and shape."""
    batches: dict = {}
    for i, job in enumerate(jobs):
        batches.setdefault((float(job.scheme.damp), tuple(job.w.shape)), []).append(i)
    for (damp, _), idx in batches.items():
        targets = gptaq_targets(torch.stack([jobs[i].w for i in idx]), torch.stack([stats[i][0] for i in idx]),
                                torch.stack([stats[i][1] for i in idx]), alpha, damp, memory_gb)
        for k, i in enumerate(idx):
            jobs[i].w, jobs[i].h = targets[k], stats[i][0].contiguous()


# ---------------------------------------------------------------------------------------------- plain Linears

ATTENTION_OUT = ("o_proj", "out_proj")  # an attention's output projection (after q/k/v, or in_proj_qkvz)
SHARED_DOWN = ("down_proj", "w2")  # a shared expert's down projection (after its gate/up)


def deferred_linears(layer: nn.Module, family, modules: dict, kinds=("shared", "attention")) -> list:
    """The names (of ``modules``, the capture's Linears) solved after the layer's other Linears: with ``"attention"``
    in ``kinds`` every attention's output projection (``*att*.o_proj`` / ``out_proj``), with ``"shared"`` the shared
    expert's down projection."""
    shared = family.shared_expert_of(layer) if "shared" in kinds else None
    shared_ids = {id(m) for m in shared.modules()} if shared is not None else set()
    out = []
    for name, mod in modules.items():
        leaf, parent = name.rsplit(".", 1)[-1], name.rsplit(".", 2)[-2] if name.count(".") else ""
        if (id(mod) in shared_ids and leaf in SHARED_DOWN) or \
                ("attention" in kinds and leaf in ATTENTION_OUT and "att" in parent):
            out.append(name)
    return out


class LinearInputs:
    """The inputs of some Linears over the calibration passes: :meth:`recording` keeps every call's input rows (in
    their dtype) and row weights (``weight_fns``: the capture's, e.g. a gated shared expert's
    ``sigmoid(shared_expert_gate(x))``); :meth:`pairing` feeds, call by call, the rows ``[x~, x - x~]`` of a later
    pass's input ``x~`` and the recorded ``x`` (with the recorded weights) into one accumulator per Linear."""

    def __init__(self, modules: dict, weight_fns: dict) -> None:
        self.modules, self.weight_fns = dict(modules), dict(weight_fns)
        self.rows: dict = {n: [] for n in self.modules}

    def _hooks(self, make):
        @contextlib.contextmanager
        def ctx():
            handles = [m.register_forward_pre_hook(make(n)) for n, m in self.modules.items()]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
        return ctx()

    def recording(self):
        def make(name):
            def hook(module, args):
                fn = self.weight_fns.get(name)
                self.rows[name].append((args[0].detach().reshape(-1, args[0].shape[-1]), fn() if fn else None))
            return hook
        return self._hooks(make)

    def pairing(self, accs: dict):
        seen = {n: 0 for n in self.modules}

        def make(name):
            def hook(module, args):
                i = seen[name]
                if i >= len(self.rows[name]):
                    raise RuntimeError(f"gptaq: {name} was called more often than in the calibration pass")
                x, w = self.rows[name][i]
                seen[name] = i + 1
                xt = args[0].detach().reshape(-1, args[0].shape[-1])
                if xt.shape != x.shape:
                    raise RuntimeError(f"gptaq: {name} received other rows than in the calibration pass")
                if x.shape[0]:
                    accs[name].add(joint_rows(x, xt), torch.zeros(x.shape[0], dtype=torch.int32, device=x.device), w)
            return hook
        return self._hooks(make)


@torch.no_grad()
def solve_linears(capture, family, recipe, storage, probe, inputs: LinearInputs, run_pass, factory, device):
    """:func:`~moequant.pipeline.jobs.quantize_linears` with the Linears of ``inputs`` (:func:`deferred_linears`)
    solved last, asymmetrically: the others are solved and written back, ``run_pass()`` runs the calibration
    batches through the layer once more (its experts need not run) while ``inputs`` pairs each deferred Linear's
    inputs ``x~`` now with those of pass 1 ``x``; every deferred Linear with a Hessian gets ``H~`` and the
    corrected target, and they are solved. Results and records in the plain path's order."""
    disk = {family.disk_name(n): n for n in inputs.modules}
    jobs = linear_jobs(capture, family, recipe)
    later = [j for j in jobs if j.record in disk]
    first = [j for j in jobs if j.record not in disk]
    res1, rec1 = finish_jobs(first, storage, recipe, probe)
    todo = [j for j in later if j.h is not None and not j.force_rtn]
    if todo:
        accs = {disk[j.record]: factory(1, 2 * j.w.shape[1], device) for j in todo}
        with inputs.pairing(accs):
            run_pass()
        seen = [j for j in todo if float(accs[disk[j.record]].mass[0]) > 0]
        stats = [normalised_statistics(accs[disk[j.record]].hessians[0], float(accs[disk[j.record]].mass[0]))
                 for j in seen]
        _retarget(seen, stats, recipe.gptaq.alpha, recipe.solver_memory_gb)
    inputs.rows.clear()
    res2, rec2 = finish_jobs(later, storage, recipe, probe)
    res, by = {**res1, **res2}, {r.name: r for r in rec1 + rec2}
    return ({k: res[k] for j in jobs for k, _, _ in j.outputs if k in res},
            [by[j.record] for j in jobs if j.record in by])
