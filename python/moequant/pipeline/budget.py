"""Budgeted mixed precision, the run (:func:`run_budget`): measure every candidate scheme, allocate, quantize.

The pipeline is layer-sequential: layer L's Hessians exist only while L is processed, and they depend on how
layers 0..L-1 were quantized. The allocation trades bits *between* layers (the first and last layers, attention
against experts), so it is decided once, globally, from a measurement of every layer:

1. **pass 1** (measurement): the model is quantized layer by layer with the candidate closest to the budget (its
   outputs feed the next layer, as in a normal run), and before each solve a :class:`CandidateProbe` solves every
   matrix under every candidate with the run's own solver (batched on a GPU) and records the error
   ``tr(dW H dW^T)`` of the stored weight on the matrix's normalised Hessian; nothing is written;
2. each allocation unit's error per candidate is the sum over its matrices of that error times the matrix's
   weight (a routed expert: its routing mass, or token count; any other matrix: its calibration tokens), and its
   cost the exact bits of the pack-quantized tensors (:meth:`moequant.formats.IntFormat.storage_bits`);
   :func:`moequant.methods.budget.allocate` picks one candidate per unit (a multiple-choice knapsack, solved
   exactly);
3. **pass 2**: the chosen candidates become recipe overrides (one per unit pattern, before the user's own) and the
   model is quantized and exported by the ordinary pipeline.

A per-layer budget schedule would need no second pass but fixes each layer's share in advance: it cannot move bits
to where they matter, which is the point. The measured errors are those of pass 1's inputs; pass 2's layers see
slightly different inputs (those of the mixed allocation), a second-order effect. Matrices a user override names
keep their scheme and count as fixed bits. The allocation is saved next to the output (``<out>.budget.json``) so
that ``--resume`` skips pass 1, and in the report (``budget``).

(Over 400 lines: the probe, the problem, the measured errors and the two-pass driver are one procedure; the pure
parts, units and the allocator, are in :mod:`moequant.methods.budget`.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..calibration.sensitivity import loss_sensitivity
from ..formats import scheme_storage_bits
from ..io.files import atomic_write_json
from ..io.fingerprint import model_fingerprint
from ..methods.budget import Matrix, allocate, build_units, candidate_label
from ..recipe.recipe import Recipe
from ..recipe.scheme import Override
from .jobs import SolveJob, fallback_scheme, jobs_stats_values, run_jobs, stats_dict, stats_lists
from .layer import LayerObserver

__all__ = ["CandidateProbe", "ResidualEnergy", "BudgetProblem", "budget_problem", "run_budget", "budget_file",
           "sizing_recipe"]

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"\.experts\.(\d+)\.[^.]+$")
_LAYER = re.compile(r"^(.*?\.\d+)\.")


class CandidateProbe:
    """A :func:`~moequant.pipeline.jobs.finish_jobs` probe: solves each job under every candidate (``fields``
    applied to the job's scheme) with the run's solvers and records ``tr(dW H dW^T)`` of each result
    (:func:`~moequant.pipeline.jobs.matrix_stats`; 0 for a matrix without a Hessian, None where the candidate's
    group size does not fit). ``records``: job name -> ``{"members", "tokens", "errors"}``. ``pinned``: on-disk
    names of matrices a user override gives their scheme (not allocated, so not measured; their scheme may be a
    floating-point preset the integer candidates cannot be applied to)."""

    def __init__(self, candidates: list, pinned=()) -> None:
        self.candidates = [dict(c) for c in candidates]
        self.pinned = frozenset(pinned)
        self.records: dict = {}

    def __call__(self, jobs: list, storage: torch.dtype, recipe: Recipe) -> None:
        jobs = [j for j in jobs if not all(n in self.pinned for n, _, _ in j.outputs)]
        for job in jobs:
            self.records[job.record] = {"members": [n for n, _, _ in job.outputs], "tokens": int(job.tokens),
                                        "errors": [None] * len(self.candidates)}
        for k, fields in enumerate(self.candidates):
            trial = []
            for job in jobs:
                sc = job.record_scheme.replace(**fields)
                if sc.format.divides(int(job.w.shape[1])):
                    trial.append(SolveJob(job.record, job.w, job.h, fallback_scheme(sc) if job.force_rtn else sc, sc,
                                          [], job.tokens, job.fallback, job.force_rtn))
            run_jobs(trial, storage, recipe.solver_memory_gb)
            # read back to the host at once (one synchronisation per candidate, not one per matrix)
            values = stats_lists(jobs_stats_values([(t.w, t.h, t.qt) for t in trial], storage, True))
            for t, v in zip(trial, values):
                self.records[t.record]["errors"][k] = float(stats_dict(v).get("error", 0.0))
                t.qt = None


class ResidualEnergy(LayerObserver):
    """Pass 1's mean squared norm of the residual stream per calibration token: ``inputs[L]`` before layer L,
    ``outputs[L]`` after it (a MoE layer's outputs as the engine computed them; else the next layer's inputs)."""

    def __init__(self) -> None:
        self.inputs: dict = {}
        self.outputs: dict = {}

    @staticmethod
    def _energy(hidden: list) -> float:
        total = sum(float(h.double().pow(2).sum()) for h in hidden)
        rows = sum(h.numel() // h.shape[-1] for h in hidden)
        return total / max(rows, 1)

    def layer_inputs(self, index: int, prefix: str, hidden: list, kwargs: list) -> None:
        self.inputs[index] = self._energy(hidden)

    def layer_done(self, index: int, result) -> None:
        if result is not None and getattr(result, "outputs", None) is not None:
            self.outputs[index] = self._energy(result.outputs)

    def after(self, index: int) -> float:
        """The residual stream's energy after layer ``index`` (the last layer without outputs: its input's)."""
        for v in (self.outputs.get(index), self.inputs.get(index + 1), self.inputs.get(index)):
            if v is not None and v > 0:
                return v
        return 1.0


@dataclass
class BudgetProblem:
    """What the allocation works on: the units (:func:`moequant.methods.budget.build_units`) of the matrices the
    budget may change, each candidate's fields and exact cost per unit (bits; None where it does not fit), the bits
    of the pinned matrices (a user override names them), the quantized weights in all, the checkpoint's other bytes
    and the bits the units may take."""

    units: list
    candidates: list
    costs: list
    params: list
    layer_of: dict
    pinned: dict
    fixed_bits: int
    total_params: int
    other_bytes: int
    budget_bits: float

    def unit_of(self) -> dict:
        return {n: i for i, u in enumerate(self.units) for n in u.members}


def _layer_index(lazy, names) -> dict:
    prefixes = {lazy.layer_prefix(i): i for i in range(lazy.num_layers)}
    out = {}
    for n in names:
        m = _LAYER.match(n)
        i = prefixes.get(m.group(1)) if m else None
        if i is None:
            i = next((j for p, j in prefixes.items() if n.startswith(p + ".")), -1)
        out[n] = i
    return out


def budget_problem(lazy, recipe: Recipe, plan, scale_bits: int) -> BudgetProblem:
    """The :class:`BudgetProblem` of a run from its preflight ``plan`` (every quantized matrix and its shape).
    ValueError before any work when a unit is partly pinned, when no candidate fits a unit, or when the budget is
    below the cheapest allocation (a candidate that fits no unit is only warned about)."""
    cfg = recipe.budget
    layer_of = _layer_index(lazy, plan.quantized)
    pinned = {n: v for n, v in plan.quantized.items() if recipe.matching_override(n) is not None}
    every = build_units([Matrix(n, o, i, layer_of[n]) for n, (_, o, i) in plan.quantized.items()], cfg.experts)
    units = []
    for u in every:
        fixed = [n for n in u.members if n in pinned]
        if fixed and len(fixed) < len(u.members):
            free = next(n for n in u.members if n not in pinned)
            raise ValueError(f"overrides: {fixed[0]} has an override but {free} does not, and both belong to "
                             f"{u.key}, which a loader runs in one scheme; give the override to all of "
                             f"{', '.join(u.members[:4])}{' ...' if len(u.members) > 4 else ''} or to none")
        if not fixed:
            units.append(u)
    costs, params = [], []
    for u in units:
        row = []
        for fields in cfg.candidates:
            fmt = recipe.scheme.replace(**fields).format
            total = 0
            for n in u.members:
                _, o, i = plan.quantized[n]
                if not fmt.divides(i):
                    total = None
                    break
                total += fmt.storage_bits(o, i, scale_bits)
            row.append(total)
        costs.append(row)
        params.append(sum(plan.quantized[n][1] * plan.quantized[n][2] for n in u.members))
    for k, fields in enumerate(cfg.candidates):
        if all(row[k] is None for row in costs) and costs:
            logger.warning("budget.candidates[%d]: %s fits no module group of this model (its group size divides "
                           "no input dimension of one); it is not used", k, candidate_label(fields))
    fixed_bits = sum(scheme_storage_bits(sc.format, sc.activations, o, i, scale_bits)
                     for sc, o, i in pinned.values())
    total_params = sum(o * i for _, o, i in plan.quantized.values())
    other = _other_bytes(lazy, plan)
    if cfg.bits is not None:
        budget_bits = cfg.bits * total_params - fixed_bits
    else:
        budget_bits = cfg.size_gb * 1e9 * 8 - other * 8 - fixed_bits
    problem = BudgetProblem(units, [dict(c) for c in cfg.candidates], costs, params, layer_of, pinned, fixed_bits,
                            total_params, other, budget_bits)
    _check_feasible(problem, cfg)
    return problem


def _other_bytes(lazy, plan) -> int:
    """Checkpoint bytes besides the quantized matrices: every other tensor as it is, and the side files."""
    index = lazy.reader.index
    src = 0
    for name, (_, o, i) in plan.quantized.items():
        h = index.view.get(name + ".weight")
        src += h.nbytes if h is not None else o * i * 2
    side = sum(f.stat().st_size for f in lazy.dir.iterdir()
               if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")))
    return max(index.view_bytes - src, 0) + side


def _check_feasible(p: BudgetProblem, cfg) -> None:
    for u, row in zip(p.units, p.costs):
        if all(c is None for c in row):
            raise ValueError(f"budget.candidates: no candidate fits {u.key} (no group size divides its input "
                             f"dimension); add a candidate with group_size -1 (per-channel)")
    need = sum(min(c for c in row if c is not None) for row in p.costs)
    if need <= p.budget_bits:
        return
    least_bits = (need + p.fixed_bits) / p.total_params
    if cfg.bits is not None:
        raise ValueError(f"budget.bits: {cfg.bits:g} bits per weight is below the cheapest allocation, "
                         f"{least_bits:.4f} (every unit at its cheapest candidate, scales included); raise the "
                         f"budget or add a cheaper candidate")
    least_gb = ((need + p.fixed_bits) / 8 + p.other_bytes) / 1e9
    raise ValueError(f"budget.size_gb: {cfg.size_gb:g} GB is below the smallest checkpoint the candidates give, "
                     f"{least_gb:.4f} GB (every unit at its cheapest candidate); raise the budget or add a cheaper "
                     f"candidate")


def propagation_candidate(p: BudgetProblem) -> Optional[int]:
    """The candidate that fits every unit whose uniform cost is closest to the budget (pass 1 quantizes with it),
    or None when no candidate fits every unit (pass 1 then uses the base scheme)."""
    best = None
    for k in range(len(p.candidates)):
        col = [row[k] for row in p.costs]
        if any(c is None for c in col):
            continue
        gap = abs(sum(col) - p.budget_bits)
        if best is None or gap < best[0]:
            best = (gap, k)
    return None if best is None else best[1]


def unit_errors(p: BudgetProblem, probe: CandidateProbe, layers: list, expert_weight: str,
                scale: Optional[dict] = None, matrix_weights: Optional[dict] = None) -> list:
    """Per unit and candidate the weighted error (None where the candidate was not measured for a matrix of it):
    sum over its jobs of weight x ``tr(dW H dW^T)``; a routed expert's weight is its routing mass (or routed
    tokens), any other matrix's its calibration tokens; ``scale`` (layer -> factor) multiplies the weights of each
    layer's jobs; ``matrix_weights`` (on-disk name -> weight, ``sensitivity: matrix``) replaces them all (a job's:
    its first matrix's; a matrix without one weighs 0). ``layers``: pass 1's report records."""
    unit_of = p.unit_of()
    by_layer = {x.index: x for x in layers}
    errs = [[0.0] * len(p.candidates) for _ in p.units]
    seen = [False] * len(p.units)
    for rec in probe.records.values():
        name = rec["members"][0] if rec["members"] else None
        u = unit_of.get(name)
        if u is None:
            continue  # a pinned matrix
        seen[u] = True
        m = _EXPERT.search(name)
        weight = float(rec["tokens"])
        if matrix_weights is not None:
            weight = float(matrix_weights.get(name, 0.0))
        elif m and p.units[u].kind == "routed":
            layer = by_layer.get(p.layer_of[name])
            e = int(m.group(1))
            src = (layer.routing_mass if expert_weight == "mass" else layer.expert_tokens) if layer else []
            weight = float(src[e]) if e < len(src) else 0.0
        if scale is not None:
            weight *= scale.get(p.layer_of[name], 1.0)
        for k, err in enumerate(rec["errors"]):
            if errs[u][k] is not None:
                errs[u][k] = None if err is None else errs[u][k] + weight * err
    for u, ok in enumerate(seen):
        if not ok:
            raise RuntimeError(f"budget: pass 1 measured no matrix of {p.units[u].key}")
    return errs


def allocation_overrides(p: BudgetProblem, choice: tuple) -> list:
    """One override per pattern of each unit, with its chosen candidate's fields."""
    return [Override(pat, scheme=dict(p.candidates[k])) for u, k in zip(p.units, choice) for pat in u.patterns]


def budget_record(p: BudgetProblem, cfg, errs: list, alloc, propagation: Optional[int], seconds: float) -> dict:
    """The report's ``budget`` section: the target, the achieved bits and checkpoint size, and per unit its
    candidates' costs and errors and the choice."""
    chosen = sum(p.costs[u][k] for u, k in enumerate(alloc.choice)) + p.fixed_bits
    units = []
    for u, (unit, k) in enumerate(zip(p.units, alloc.choice)):
        units.append({"key": unit.key, "label": unit.label, "kind": unit.kind, "layers": list(unit.layers),
                      "expert": unit.expert, "matrices": len(unit.members), "params": p.params[u],
                      "choice": k, "scheme": candidate_label(p.candidates[k]),
                      "bits": round(p.costs[u][k] / p.params[u], 6), "costs": p.costs[u], "errors": errs[u]})
    return {"target": {"bits": cfg.bits} if cfg.bits is not None else {"size_gb": cfg.size_gb},
            "experts": cfg.experts, "expert_weight": cfg.expert_weight, "sensitivity_kind": cfg.sensitivity,
            "candidates": [candidate_label(c) for c in p.candidates], "candidate_fields": p.candidates,
            "propagation": None if propagation is None else candidate_label(p.candidates[propagation]),
            "achieved_bits": round(chosen / p.total_params, 6), "quantized_params": p.total_params,
            "quantized_bytes": int(-(-chosen // 8)), "checkpoint_bytes": int(-(-chosen // 8) + p.other_bytes),
            "error": alloc.error, "lower_bound": alloc.bound, "exact": alloc.exact,
            "pinned": sorted(p.pinned), "measure_seconds": round(seconds, 3), "units": units}


def sizing_recipe(recipe: Recipe, solvers=None) -> Recipe:
    """The recipe the preflight checks before pass 1: every matrix the budget allocates per-channel (a format that
    fits any shape: its final scheme is not known yet), the user's overrides as they are."""
    data = recipe.to_dict()
    data["overrides"] = [{"pattern": "re:.*", "scheme": {"group_size": -1}}] + data["overrides"]
    return Recipe.from_dict(data, solvers)


def loader_warnings(recipe: Recipe, p: BudgetProblem) -> list[str]:
    """What the allocation may do to loaders, said before the run (:mod:`moequant.io.compat` names the loaders of
    the final allocation): transformers reads one expert scheme for all MoE layers and symmetric schemes only,
    vLLM 4- and 8-bit integers only."""
    formats = {recipe.scheme.replace(**c).format for k, c in enumerate(p.candidates)
               if any(row[k] is not None for row in p.costs)}
    out = []
    routed = any(u.kind == "routed" for u in p.units)
    if routed and recipe.budget.experts == "layer" and len(formats) > 1:
        out.append("the MoE layers' experts may get different schemes, which transformers 5.23 loads with wrong "
                   "weights (it dequantizes every layer's experts with one scheme); budget.experts: model keeps one "
                   "scheme for all of them, and moequant eval reads either")
    if any(not f.symmetric for f in formats):
        out.append("asymmetric candidates: transformers 5.23 does not load asymmetric modules")
    odd = sorted({f.bits for f in formats} - {4, 8})
    if odd:
        out.append(f"{'/'.join(map(str, odd))}-bit candidates: vLLM's integer weight-only kernels take 4 or 8 bits; "
                   "keep the candidates at 4 and 8 bits to serve the checkpoint with vLLM")
    return out


def budget_file(out: Path) -> Path:
    """Where a budgeted run keeps its allocation until the export: ``<out>.budget.json``."""
    return out.with_name(out.name + ".budget.json")


def _key(model_dir: Path, recipe: Recipe, ids: torch.Tensor, export_format: str) -> str:
    text = json.dumps({"model": model_fingerprint(model_dir)["files"], "recipe": recipe.to_dict(),
                       "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                       "export_format": export_format}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _pass2_recipe(recipe: Recipe, overrides: list, solvers) -> Recipe:
    data = recipe.to_dict()
    data["budget"] = {**data["budget"], "bits": None, "size_gb": None}
    data["overrides"] = [o.to_dict() for o in overrides] + data["overrides"]
    return Recipe.from_dict(data, solvers)


def run_budget(quantize, lazy, recipe: Recipe, plan, ids: torch.Tensor, *, model_dir: Path, out: Optional[Path],
               export_format: str, resume: bool, storage: torch.dtype, progress: bool, solvers,
               prefetch, device) -> tuple[Recipe, dict]:
    """Pass 1 and the allocation (module docstring): returns the recipe of pass 2 (the allocation as overrides,
    the budget off) and the report's ``budget`` section. ``quantize``: :func:`moequant.pipeline.quantize`, run
    for pass 1 without output, with the probe."""
    cfg = recipe.budget
    if export_format == "pack-quantized" and out is not None and cfg.experts in ("projection", "expert"):
        raise ValueError(f"budget.experts: {cfg.experts!r} gives a MoE layer's experts several schemes, which no "
                         f"loader reads from a pack-quantized checkpoint (vLLM runs a layer's experts as one kernel "
                         f"in one scheme); use 'layer' or 'model', or export with --format dequantized")
    scale_bits = torch.finfo(storage).bits
    p = budget_problem(lazy, recipe, plan, scale_bits)
    if out is not None and export_format == "pack-quantized":
        for line in loader_warnings(recipe, p):
            logger.warning("budget: %s", line)
    key = _key(model_dir, recipe, ids, export_format)
    saved = budget_file(out) if out is not None else None
    if resume and saved is not None and saved.is_file():
        data = json.loads(saved.read_text())
        if data.get("key") == key:
            logger.info("budget: the allocation of %s (pass 1 is not repeated)", saved)
            overrides = [Override.from_dict(o, solvers) for o in data["overrides"]]
            return _pass2_recipe(recipe, overrides, solvers), data["record"]
    t0 = time.time()
    sens = None
    if cfg.sensitivity in ("layer", "matrix"):  # on the unquantized model, before pass 1
        n = min(cfg.sensitivity_samples, int(ids.shape[0]))
        sens = loss_sensitivity(lazy, ids[:n], device, recipe.calibration.batch_size,
                                matrices=cfg.sensitivity == "matrix")
        logger.info("budget: loss sensitivity per layer %s", ", ".join(f"{v:.3g}" for v in sens.layers))
    prop = propagation_candidate(p)
    data = recipe.to_dict()
    data["budget"] = {**data["budget"], "bits": None, "size_gb": None}
    if prop is not None:
        data["overrides"] = [{"pattern": "re:.*", "scheme": dict(p.candidates[prop])}] + data["overrides"]
    pass1 = Recipe.from_dict(data, solvers)
    probe = CandidateProbe(p.candidates, p.pinned)
    energy = ResidualEnergy()
    logger.info("budget: pass 1 measures %d candidates on %d units (propagating %s)", len(p.candidates),
                len(p.units), "the base scheme" if prop is None else candidate_label(p.candidates[prop]))
    report1 = quantize(model_dir, pass1, ids, None, progress=progress, solvers=solvers, probe=probe,
                       prefetch=prefetch, scan=False, observers=[energy])
    residual = {x.index: energy.after(x.index) for x in report1.layers}
    scale = {i: 1.0 / v for i, v in residual.items()} if cfg.sensitivity == "residual" else \
        dict(enumerate(sens.layers)) if cfg.sensitivity == "layer" else None
    errs = unit_errors(p, probe, report1.layers, cfg.expert_weight, scale,
                       sens.matrices if cfg.sensitivity == "matrix" else None)
    options = [[None if c is None or e is None else (float(c), float(e)) for c, e in zip(cr, er)]
               for cr, er in zip(p.costs, errs)]
    alloc = allocate(options, p.budget_bits)
    record = budget_record(p, cfg, errs, alloc, prop, time.time() - t0)
    record["residual_energy"] = [round(residual[i], 6) for i in sorted(residual)]
    record["sensitivity"] = None if sens is None else sens.layers
    overrides = allocation_overrides(p, alloc.choice)
    if saved is not None:
        atomic_write_json(saved, {"key": key, "overrides": [o.to_dict() for o in overrides], "record": record})
    logger.info("budget: %.4f bits per weight (target %s), error %.6g (lower bound %.6g)", record["achieved_bits"],
                record["target"], alloc.error, alloc.bound)
    return _pass2_recipe(recipe, overrides, solvers), record
