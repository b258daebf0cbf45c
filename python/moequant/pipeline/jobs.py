"""Per-layer quantization jobs: which solver, which Hessian, which fallback (orchestration, no math).

The solvers are the registered methods (:mod:`moequant.methods`: a scheme's ``method`` names one); their math is in
:mod:`moequant.ops` (C++ core / CUDA kernels). This module maps a calibrated decoder layer (a
:class:`moequant.calibration.capture.LayerCapture` after the calibration forward) and a recipe to quantized
weights, writes the dequantized weights back into the layer (so the next layer is calibrated on the quantized
model), and returns the per-matrix results keyed by on-disk module name. :func:`solve_matrix` is the solve of one
matrix (solver, greedy rounding correction, the recipe's format). (About 400 lines: the jobs, their batched solve
and their statistics are one step; a split would pass the job objects between modules.)
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .. import ops
from ..formats import FloatFormat, nvfp4_global_scale
from ..methods.rounding import refine
from ..models import MoEFamily, split_expert
from ..recipe.recipe import Recipe
from ..recipe.scheme import QuantScheme
from .report import ModuleRecord

__all__ = ["solve_matrix", "ExpertHessians", "quantize_linears", "quantize_experts", "expert_jobs", "finish_jobs",
           "matrix_stats", "matrix_stats_values", "jobs_stats_values", "linear_jobs", "stats_dict", "stats_lists",
           "shared_global_scale",
           "SolveJob", "run_jobs", "fallback_scheme"]

logger = logging.getLogger(__name__)


def _solver(scheme: QuantScheme, h: Optional[torch.Tensor]):
    """The scheme's solver, or the registry's fallback (RTN) for a matrix without a Hessian whose method needs one."""
    solver = scheme.solver
    if h is None and solver.needs_hessian:
        registry = scheme.solver_registry()
        solver = registry.get(registry.fallback)
    return solver


def solve_matrix(w: torch.Tensor, h: Optional[torch.Tensor], scheme: QuantScheme, storage: torch.dtype,
                 global_scale: Optional[torch.Tensor] = None):
    """Quantizes ``w`` by ``scheme`` (its solver; RTN when there is no Hessian ``h`` and the solver needs one) with
    scales representable in ``storage`` (the checkpoint dtype), then applies the greedy rounding correction
    (``scheme.rounding_passes``, with a Hessian) and gives the result the recipe's format. ``global_scale``:
    NVFP4's, shared with the matrix's fused partners (:func:`shared_global_scale`)."""
    kw = {} if global_scale is None else {"global_scale": global_scale}
    return _finish_solve(_solver(scheme, h).solve(w, h, scheme, storage, **kw), w, h, scheme)


def _nvfp4(scheme: Optional[QuantScheme]) -> bool:
    return scheme is not None and isinstance(scheme.format, FloatFormat) and scheme.format.global_scale


def shared_global_scale(weights: list) -> torch.Tensor:
    """The NVFP4 global scale fused partners share (q / k / v, gate / up: vLLM runs them as one matrix with one
    global scale, llm-compressor's ``update_fused_layer_weight_global_scales``): that of their largest ``|w|``."""
    amax = torch.stack([w.detach().abs().amax().float() for w in weights]).amax()
    return nvfp4_global_scale(amax)


def _finish_solve(qt: ops.QuantizedTensor, w: torch.Tensor, h: Optional[torch.Tensor],
                  scheme: QuantScheme) -> ops.QuantizedTensor:
    """Optional greedy rounding correction; the result carries the recipe's format (per-channel stays -1 for the
    export, where the solver gives the group of in_features)."""
    qt = refine(qt, w, h, scheme)
    if scheme.per_channel:
        qt.format = scheme.format
    return qt


def _write_back(param: torch.Tensor, qt: ops.QuantizedTensor, storage: torch.dtype) -> None:
    """The layer keeps computing with exactly what a loader reconstructs: the dequantized weight in ``storage``."""
    param.copy_(qt.dequantized.to(storage).to(param.dtype))


class ExpertHessians:
    """Normalised expert Hessians of one accumulator with the recipe's fallback for starved experts.

    Policy ``"shrink"`` applies to every expert: ``H_e' = (n_e H_e + k T_e) / (n_e + k)`` with n_e the expert's
    weight mass (rows, or routing mass when routing-weighted), k = ``shrinkage_tokens`` and the target
    ``T_e = prior(e)`` (the layer's all-token Hessian of that input; None or no prior: the pooled Hessian of all
    routed rows of the layer, ``sum_e H_e_raw / sum_e n_e``).
    """

    def __init__(self, acc: ops.HessianAccumulator, min_tokens: int, policy: str, shrinkage_tokens: float = 64.0,
                 prior: Optional[Callable[[int], Optional[torch.Tensor]]] = None, *,
                 layer_mean: Optional[Callable[[], Optional[torch.Tensor]]] = None,
                 pooled: Optional[Callable[[], Optional[torch.Tensor]]] = None):
        """``acc`` may hold only some of the layer's experts (a group of the expert streaming engine): then
        ``layer_mean`` / ``pooled`` give the layer-wide mean Hessian of the well-calibrated experts and the pooled
        Hessian of all routed rows, which this accumulator alone cannot."""
        self.acc, self.min_tokens, self.policy = acc, min_tokens, policy
        self.k, self.prior = float(shrinkage_tokens), prior
        self.counts = [int(c) for c in acc.counts.tolist()]
        self.mass = [float(m) for m in acc.mass.tolist()]  # read once: no device synchronisation per expert
        self._mean: Optional[torch.Tensor] = None
        self._pooled: Optional[torch.Tensor] = None
        self._mean_fn, self._pooled_fn = layer_mean, pooled
        self._warned = False

    def shrinkage_target(self, e: int) -> Optional[torch.Tensor]:
        """The ``shrink`` policy's target for expert ``e`` (normalised): the prior (the layer's all-token Hessian)
        when there is one, else the pooled Hessian of the layer's routed rows; None where neither exists."""
        t = self.prior(e) if self.prior is not None else None
        if t is not None:
            return t.to(device=self.acc.device, dtype=self.acc.dtype)
        if self._pooled is None:
            if self._pooled_fn is not None:
                self._pooled = self._pooled_fn()
            else:
                m = float(self.acc.mass.sum())
                if m > 0:
                    self._pooled = self.acc.hessians.sum(0) / m
        return self._pooled

    def _shrunk(self, e: int) -> Optional[torch.Tensor]:
        """(raw H_e + k T_e) / (n_e + k), i.e. (n_e H_e + k T_e) / (n_e + k) with the normalised H_e."""
        t = self.shrinkage_target(e)
        if t is None:
            return None
        n = self.mass[e]
        return (self.acc.hessians[e] + self.k * t) / (n + self.k)

    def _layer_mean(self) -> Optional[torch.Tensor]:
        """Mean normalised Hessian of the well-calibrated experts (those with min_tokens), or else of every
        expert that saw any token; None when no expert saw a token."""
        if self._mean_fn is not None:
            return self._mean_fn()
        if self._mean is None:
            ok = [e for e in range(len(self.counts)) if self.calibrated(e)] or \
                 [e for e, c in enumerate(self.counts) if c > 0 and self.mass[e] > 0]
            if ok:
                self._mean = sum(self.acc.hessian(e, mass=self.mass[e]) for e in ok) / len(ok)
        return self._mean

    def calibrated(self, e: int) -> bool:
        """Expert ``e`` has its own Hessian: at least ``min_tokens`` rows and a non-zero weight mass. An expert
        that saw no token (or only zero routing weights) never counts as calibrated, whatever ``min_tokens`` says:
        its Hessian is all zeros, and GPTQ would set every column of it to zero (dead columns)."""
        return self.counts[e] >= max(self.min_tokens, 1) and self.mass[e] > 0

    def get(self, e: int) -> tuple[Optional[torch.Tensor], Optional[str], bool]:
        """(Hessian or None for RTN, fallback used or None, force RTN)."""
        if self.policy == "shrink":
            h = self._shrunk(e)
            if h is not None:
                return h, (None if self.calibrated(e) else "shrink"), False
            if self.calibrated(e):
                return self.acc.hessian(e, mass=self.mass[e]), None, False
        elif self.calibrated(e):
            return self.acc.hessian(e, mass=self.mass[e]), None, False
        return self.fallback()

    def fallback(self) -> tuple[Optional[torch.Tensor], Optional[str], bool]:
        """The policy's Hessian for an expert without its own (``get`` of a starved expert; ``"shrink"`` never
        gets here unless the layer has no target at all)."""
        if self.policy == "rtn":
            return None, "rtn", True
        if self.policy == "mean":
            mean = self._layer_mean()
            if mean is not None:
                return mean, "mean", False
            if not self._warned:
                logger.warning("no expert of this layer saw a calibration token: identity Hessian fallback")
                self._warned = True
        dim = self.acc.dim
        return torch.eye(dim, dtype=self.acc.dtype, device=self.acc.device), "identity", False


def fallback_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme with the registry's fallback solver (RTN): a matrix without a Hessian whose method needs one."""
    return scheme.replace(method=scheme.solver_registry().fallback)


@torch.no_grad()
def matrix_stats(w: torch.Tensor, h: Optional[torch.Tensor], qt: ops.QuantizedTensor, storage: torch.dtype,
                 errors: bool = True) -> dict:
    """Calibration statistics of one solved matrix (the :class:`ModuleRecord` fields): ``hessian_trace`` tr(H),
    ``effective_rank`` tr(H)^2 / ||H||_F^2 and, with ``errors``, ``error`` tr(dW H dW^T) of ``dW = w - `` the
    dequantized weight as stored (rounded to ``storage``), ``energy`` tr(W H W^T) and ``rel_error`` (their
    ratio). Computed on ``w``'s device (float32 on a GPU); empty without a Hessian ``h``."""
    return stats_dict(matrix_stats_values(w, h, qt, storage, errors))


_STATS = ("hessian_trace", "effective_rank", "error", "energy")


def matrix_stats_values(w: torch.Tensor, h: Optional[torch.Tensor], qt: ops.QuantizedTensor, storage: torch.dtype,
                        errors: bool = True) -> Optional[torch.Tensor]:
    """:func:`matrix_stats` as a tensor on ``w``'s device (no host synchronisation; :func:`stats_dict` reads it):
    ``[tr(H), effective rank]`` and, with ``errors``, ``[error, energy]``; None without a Hessian.

    On a GPU the two products ``dW H`` and ``W H`` are one tensor-core GEMM of ``[W; dW]`` and ``H`` in bfloat16
    with float32 accumulation (:func:`_batched_stats` with one matrix: ``torch.bmm(..., out_dtype=float32)``; the
    elementwise product and sums in float32): a report statistic does not need fp32 SIMT products, which cost as
    much as the GPTQ solve itself on DeepSeek-V3's 7168-wide Hessians. Elsewhere float32 (float64 for a float64
    Hessian on the CPU)."""
    if h is None:
        return None
    if w.device.type == "cuda":  # the batched products' one-matrix case (jobs_stats_values)
        return _batched_stats([(w, h, qt)], storage, errors)[0]
    dtype = torch.float32 if h.dtype != torch.float64 else torch.float64
    hh = h.to(w.device, dtype)
    tr = torch.diagonal(hh).sum()
    vals = [tr, tr * tr / (hh * hh).sum().clamp_min(torch.finfo(dtype).tiny)]
    if errors:
        wf = w.detach().to(dtype)
        d = wf - qt.dequantized.to(w.device).to(storage).to(dtype)
        vals += [((d @ hh) * d).sum(), ((wf @ hh) * wf).sum()]
    return torch.stack(vals)


# Transient device memory of one batched statistics product (jobs_stats_values): per matrix of r x c about
# 10 c^2 + 24 r c bytes (H in float32 and bfloat16, its square, W, dW, [W; dW] and their float32 product)
STATS_BATCH_BYTES = 2**30


def jobs_stats_values(items: list, storage: torch.dtype, errors: bool = True,
                      batch_bytes: int = STATS_BATCH_BYTES) -> list:
    """:func:`matrix_stats_values` of many ``(w, h, qt)``, in order. On a GPU, matrices of one shape (a layer's
    experts) go through batched products of at most ``batch_bytes`` of transients each -- a few dozen launches for a
    layer's experts instead of about twenty per matrix, which left a Qwen3-30B-A3B layer's statistics host-bound
    (4,900 launches, 30 ms of GPU work in 220 ms, benchmarks/trace_phases.py); the one-matrix path is a batch of
    one, so the values agree to float32 summation order. Elsewhere one matrix at a time."""
    out: list = [None] * len(items)
    groups: dict = {}
    for i, (w, h, qt) in enumerate(items):
        if h is None:
            continue
        if w.device.type != "cuda":
            out[i] = matrix_stats_values(w, h, qt, storage, errors)
        else:
            groups.setdefault((tuple(w.shape), tuple(h.shape), w.device), []).append(i)
    for (rows_cols, hshape, _), idx in groups.items():
        rows, cols = rows_cols
        per = 10 * hshape[0] * hshape[1] + 24 * rows * cols
        step = max(1, batch_bytes // max(per, 1))
        for a in range(0, len(idx), step):
            part = idx[a:a + step]
            vals = _batched_stats([items[i] for i in part], storage, errors)
            for i, v in zip(part, vals.unbind(0)):
                out[i] = v
    return out


def _batched_stats(items: list, storage: torch.dtype, errors: bool) -> torch.Tensor:
    """``[B, 2]`` or ``[B, 4]`` statistics of same-shape matrices on one GPU (:func:`jobs_stats_values`)."""
    dev = items[0][0].device
    hh = torch.stack([h.to(dev, torch.float32) for _, h, _ in items])
    tr = torch.diagonal(hh, dim1=-2, dim2=-1).sum(-1)
    vals = [tr, tr * tr / (hh * hh).sum((-2, -1)).clamp_min(torch.finfo(torch.float32).tiny)]
    if errors:
        wf = torch.stack([w.detach().float() for w, _, _ in items])
        d = wf - torch.stack([qt.dequantized.to(dev).to(storage) for _, _, qt in items]).float()
        rows = wf.shape[1]
        # [W; dW] rounded to bfloat16 once (W's float32 widening is exact, so W's bf16 is w's own)
        both = torch.cat([wf, d], dim=1).to(torch.bfloat16)
        prod = torch.bmm(both, hh.to(torch.bfloat16), out_dtype=torch.float32)
        vals += [(prod[:, rows:] * d).sum((-2, -1)), (prod[:, :rows] * wf).sum((-2, -1))]
    return torch.stack(vals, dim=1)


def stats_dict(values) -> dict:
    """The :class:`ModuleRecord` fields of :func:`matrix_stats_values`' values (a tensor or a list of floats)."""
    if values is None:
        return {}
    out = dict(zip(_STATS, values.tolist() if isinstance(values, torch.Tensor) else values))
    if "error" in out:
        out["rel_error"] = out["error"] / out["energy"] if out["energy"] > 0 else None
    return out


def stats_lists(values: list) -> list:
    """Each of ``values`` (tensors of :func:`matrix_stats_values` or None) as a list of floats, with one host
    synchronisation per device and length instead of one per matrix."""
    out: list = [None] * len(values)
    by: dict = {}
    for i, v in enumerate(values):
        if v is not None:
            by.setdefault((v.device, v.dtype, v.numel()), []).append(i)
    for idx in by.values():
        for i, row in zip(idx, torch.stack([values[i] for i in idx]).tolist()):
            out[i] = row
    return out


def _record(name: str, scheme: QuantScheme, tokens: int, qt: ops.QuantizedTensor, fallback: Optional[str],
            forced_rtn: bool, report_loss: bool, stats: Optional[dict] = None) -> ModuleRecord:
    used = fallback_scheme(scheme) if forced_rtn else scheme
    return ModuleRecord(name=name, scheme=used.describe(), method=used.method, tokens=tokens,
                        loss=qt.loss if report_loss else None,
                        fallback=fallback,
                        escalations=qt.escalations, dead_columns=qt.dead_columns, **(stats or {}))


@torch.no_grad()
def quantize_linears(capture, family: MoEFamily, recipe: Recipe, storage: torch.dtype,
                     probe: Optional[Callable] = None) -> tuple[dict, list]:
    """Quantizes the captured plain Linears of a layer in place (on a GPU, same-shape Linears such as k/v are
    solved in one batched call); returns ({disk_name: qt}, [ModuleRecord]). NVFP4 Linears that read one input
    (the capture shares their Hessian: q / k / v, a shared expert's gate / up, DeepSeek's q_a / kv_a) share one
    global scale (:func:`shared_global_scale`). ``probe``: as :func:`finish_jobs`'."""
    return finish_jobs(linear_jobs(capture, family, recipe), storage, recipe, probe)


def linear_jobs(capture, family: MoEFamily, recipe: Recipe) -> list:
    """The :class:`SolveJob` of every captured plain Linear the recipe quantizes (:func:`quantize_linears`)."""
    lc = capture.linears
    jobs, partners = [], {}
    for name, lin in lc.modules.items():
        disk = family.disk_name(name)
        scheme = recipe.resolve(disk)
        if scheme is None:
            continue
        acc = lc.accumulators[name]
        tokens = int(acc.counts[0])
        h = acc.hessian(0) if tokens > 0 and float(acc.mass[0]) > 0 else None  # no data: RTN, never a zero H
        force_rtn = h is None and scheme.solver.needs_hessian
        job = SolveJob(disk, lin.weight, h, fallback_scheme(scheme) if force_rtn else scheme, scheme,
                       [(disk, lin.weight, None)], tokens, None if h is not None else "rtn", force_rtn,
                       input_amax=float(acc.absmax[0]))
        jobs.append(job)
        if _nvfp4(scheme):
            partners.setdefault(id(acc), []).append(job)
    for group in partners.values():
        if len(group) > 1:
            g = shared_global_scale([j.w for j in group])
            for j in group:
                j.global_scale = g
    return jobs


class SolveJob:
    """One matrix to quantize: its weight, Hessian and scheme, and where its rows go (name -> row slice)."""

    def __init__(self, record: str, w: torch.Tensor, h: Optional[torch.Tensor], scheme: QuantScheme,
                 record_scheme: QuantScheme, outputs: list, tokens: int, fallback: Optional[str], force_rtn: bool,
                 input_amax: float = 0.0, global_scale: Optional[torch.Tensor] = None):
        self.record, self.w, self.h, self.scheme, self.record_scheme = record, w, h, scheme, record_scheme
        self.outputs, self.tokens, self.fallback, self.force_rtn = outputs, tokens, fallback, force_rtn
        self.input_amax, self.global_scale = input_amax, global_scale  # largest |input|; NVFP4's shared scale
        self.qt = None


def _batchable(job: SolveJob) -> bool:
    """The job's solver has a batched path that handles it (GPTQ with a Hessian, on CUDA, within its limits)."""
    return job.global_scale is None and _solver(job.scheme, job.h).batchable(job.w, job.h, job.scheme)


def _solve_batched(jobs: list, storage: torch.dtype, memory_gb: float) -> None:
    """Solves same-shape, same-scheme jobs with their solver's batched path, in chunks that fit ``memory_gb``."""
    rows, cols = jobs[0].w.shape
    s = jobs[0].scheme
    solver = _solver(s, jobs[0].h)
    chunk = max(1, int(memory_gb * 2**30 // solver.batch_bytes(rows, cols)))
    for i in range(0, len(jobs), chunk):
        part = jobs[i:i + chunk]
        w = torch.stack([j.w.float() for j in part])
        h = torch.stack([j.h.float() for j in part])
        out = solver.solve_batched(w, h, s, storage, False)  # the loss: finish_jobs' statistics
        for job, qt in zip(part, out):
            job.qt = _finish_solve(qt, job.w, job.h, job.scheme)
        del w, h


def run_jobs(jobs: list, storage: torch.dtype, memory_gb: float) -> None:
    """Solves every job: batched on the GPU where possible (grouped by shape and scheme), else one by one."""
    groups: dict = {}
    for job in jobs:
        if _batchable(job):
            key = (tuple(job.w.shape), tuple(sorted(job.scheme.to_dict().items())))
            groups.setdefault(key, []).append(job)
        else:
            job.qt = solve_matrix(job.w, job.h, job.scheme, storage, job.global_scale)
    for group in groups.values():
        _solve_batched(group, storage, memory_gb)


@torch.no_grad()
def quantize_experts(capture, family: MoEFamily, recipe: Recipe, layer_prefix: str,
                     storage: torch.dtype, probe: Optional[Callable] = None) -> tuple[dict, list]:
    """Quantizes every routed expert of a layer in place (gate and up share one Hessian and, when their
    schemes agree, one solve; on a GPU all experts of a projection are solved in one batched call);
    returns ({disk_name: qt}, [ModuleRecord])."""
    ec = capture.experts
    if ec is None:
        return {}, []
    fb = recipe.fallback
    all_in, down_all = getattr(ec, "all_input", None), getattr(ec, "down_all", None)
    h_all = all_in.hessian(0) if all_in is not None and float(all_in.mass[0]) > 0 else None
    hgu = ExpertHessians(ec.gate_up, fb.min_tokens, fb.policy, fb.shrinkage_tokens,
                         (lambda e: h_all) if h_all is not None else None)
    hdn = ExpertHessians(ec.down, fb.min_tokens, fb.policy, fb.shrinkage_tokens,
                         (lambda e: down_all.hessian(e) if float(down_all.mass[e]) > 0 else None)
                         if down_all is not None else None)
    experts = range(ec.num_experts)
    amax = list(zip(ec.gate_up.absmax.tolist(), ec.down.absmax.tolist()))
    jobs = expert_jobs(ec.experts, family, recipe, layer_prefix, list(experts), experts, hgu.get, hdn.get,
                       hgu.counts, amax.__getitem__)
    return finish_jobs(jobs, storage, recipe, probe)


def expert_jobs(experts, family: MoEFamily, recipe: Recipe, layer_prefix: str, ids: list, local, gate_up, down,
                tokens, amax=None) -> list:
    """The solve jobs of the routed experts ``local`` (indices into the fused ``experts`` module, which may be a
    view of some of the layer's experts; ``ids[j]`` is local expert j's index in the layer, for its on-disk
    names): gate and up share one Hessian and one job when their schemes agree (and an FP8 block does not straddle
    them), else NVFP4 gate and up share one global scale. ``gate_up(j)`` / ``down(j)`` give ``(Hessian or None,
    fallback used or None, force RTN)`` (:meth:`ExpertHessians.get`); ``tokens[j]`` the expert's calibration rows;
    ``amax(j)`` (optional) the largest ``|x|`` of its gate / up and down inputs. Jobs come in expert order,
    gate(+up) before down."""
    jobs: list = []
    for j in local:
        names = family.disk_expert_names(layer_prefix, ids[j])
        t = split_expert(experts, family, j)
        sg, su, sd = (recipe.resolve(names[k]) for k in ("gate", "up", "down"))
        n = int(tokens[j])
        a_gu, a_dn = amax(j) if amax is not None else (0.0, 0.0)
        h, fallback, force_rtn = gate_up(j)
        inter = t.gate.shape[0]
        if sg is not None and sg == su and sg.format.splits_rows(inter):
            jobs.append(SolveJob(names["gate"] + "+up", torch.cat([t.gate, t.up], 0), h,
                                 fallback_scheme(sg) if force_rtn else sg, sg,
                                 [(names["gate"], t.gate, slice(0, inter)), (names["up"], t.up, slice(inter, None))],
                                 n, fallback, force_rtn, a_gu))
        else:
            g = shared_global_scale([t.gate, t.up]) if _nvfp4(sg) and _nvfp4(su) else None
            for key, w, sc in (("gate", t.gate, sg), ("up", t.up, su)):
                if sc is not None:
                    jobs.append(SolveJob(names[key], w, h, fallback_scheme(sc) if force_rtn else sc, sc,
                                         [(names[key], w, None)], n, fallback, force_rtn, a_gu, g))
        if sd is not None:
            h, fallback, force_rtn = down(j)
            jobs.append(SolveJob(names["down"], t.down, h, fallback_scheme(sd) if force_rtn else sd, sd,
                                 [(names["down"], t.down, None)], n, fallback, force_rtn, a_dn))
    return jobs


def finish_jobs(jobs: list, storage: torch.dtype, recipe: Recipe,
                probe: Optional[Callable] = None) -> tuple[dict, list]:
    """Solves the jobs, writes the dequantized weights back; returns ({disk_name: qt}, [ModuleRecord]). The
    results keep codes, scales and zero points only: the solver's float32 dequantized weights (``values``, 4 bytes
    a weight, twice the bf16 layer) are dropped once written back (``dequantized`` recomputes them from the codes),
    so a finished layer's results, which the background commit holds while the next layer computes, are 1 byte a
    weight. ``probe(jobs, storage, recipe)``, when given, sees the jobs first, while the weights are still the
    originals (the budget's measurement pass, :class:`moequant.pipeline.budget.CandidateProbe`); it must not change
    them."""
    if probe is not None and jobs:
        probe(jobs, storage, recipe)
    # The reported loss is the statistics' error below, tr(dW H dW^T) of the weights as stored (the solvers' own
    # proxy loss is the same trace of their float32 dequantized weights: a second out x in^2 product per matrix)
    with torch.profiler.record_function("moequant.solve.run_jobs"):  # markers when a profiler runs
        run_jobs(jobs, storage, recipe.solver_memory_gb)
    results, records = {}, []
    # before the weights are overwritten; read back to the host at once (not one synchronisation per matrix)
    with torch.profiler.record_function("moequant.solve.stats"):
        stats = stats_lists(jobs_stats_values([(job.w, job.h, job.qt) for job in jobs], storage, recipe.report_loss))
    for job, st in zip(jobs, stats):
        st = stats_dict(st)
        if "error" in st:  # computed only with report_loss
            job.qt.loss = st["error"]
        act = job.record_scheme.activations
        if act is not None and act.static_global_scale:  # NVFP4 W4A4 (no token: the layer's, activations.py)
            job.qt.input_global_scale = nvfp4_global_scale(job.input_amax) if job.input_amax > 0 else None
        for name, param, rows in job.outputs:
            qt = job.qt if rows is None else job.qt.rows(rows)
            _write_back(param, qt, storage)
            qt.values = None
            results[name] = qt
        job.qt.values = None
        records.append(_record(job.record, job.record_scheme, job.tokens, job.qt, job.fallback, job.force_rtn,
                               recipe.report_loss, st))
    return results, records
