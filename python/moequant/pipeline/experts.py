"""The expert-streaming engine of a MoE decoder layer: route once, then stream the routed experts through the
compute device in groups that fit a memory budget, instead of holding every expert's Hessians at once.

:meth:`MoELayerEngine.run` calibrates, quantizes and propagates one MoE layer:

1. **pass 1** (calibration): the layer runs on the calibration batches with the fused experts module's forward
   replaced by a recorder (:class:`ExpertsRecorder`): the Linears' Hessians are captured as usual (attention,
   shared expert), and each experts call's inputs ``(hidden_states, top_k_index, top_k_weights)`` are kept;
   the experts themselves do not run;
2. the Linears are quantized and written back (with the recipe's ``gptaq``, o_proj and the shared expert's
   down_proj last, on their inputs in one more forward of the partly quantized layer: :mod:`moequant.pipeline.gptaq`);
3. **pass 2**: the layer runs again, with its quantized Linears, recording the experts calls again: the routing
   and expert inputs the quantized layer produces (what the next layer will see);
4. the experts, **group by group** (:func:`~moequant.pipeline.groups.experts_per_group`): the group's Hessians are accumulated from pass 1's
   calls (consecutive calls concatenated into chunks of about :data:`HESSIAN_CHUNK_TOKENS` tokens,
   :class:`ChunkedCalls`), the group is solved and written back,
   and its quantized outputs on pass 2's calls are computed from the group's routed rows only and summed in float32
   (:func:`~moequant.calibration.routing.grouped_output_into`: grouped GEMMs as transformers' ``grouped_mm``
   computes them; where it does not apply, the experts module on a view of the group's experts with the other
   experts' slots padded). With a single group the experts module itself computes them. Experts without enough
   calibration tokens are solved after all groups when their fallback needs the layer's mean Hessian. With the
   recipe's ``gptaq``, a group's down_proj is solved after its gate/up, on its inputs through the quantized
   gate/up (:mod:`moequant.pipeline.gptaq`);
5. **pass 3**: the layer runs once more with the experts forward replaced by the replay of those outputs, which
   gives the layer's outputs: exactly what the quantized layer computes.

With one group (every expert fits; always on the CPU unless a budget is set) the checkpoint is bit-identical to
the whole-layer path; with several groups the Hessians, solves and written-back weights still are, and the
propagated outputs differ only by the rounding of summing the groups' outputs (fp32 accumulation of each group's
output in the layer's dtype). The attention runs three times instead of twice; the experts once per pass-2 call.

(Over 400 lines: the three passes, the group loop and its fallbacks are one procedure over shared state; the plan's
arithmetic is in :mod:`moequant.pipeline.groups`, the exchanges of several processes in
:mod:`moequant.pipeline.distributed`.)
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..calibration.capture import ExpertCapture, ExpertsCall, LayerCapture
from ..calibration.routing import grouped_output_into
from ..models import MoEFamily, num_experts
from ..recipe.recipe import Recipe
from . import gptaq
from .groups import GroupPlan, expert_dims, local_ids
from .host import HostCopies, HostResults, PartWrites
from .jobs import ExpertHessians, expert_jobs, finish_jobs, quantize_linears

__all__ = ["ExpertsRecorder", "expert_view", "MoELayerEngine", "MoELayerOutput", "group_hessians", "ChunkedCalls",
           "calls_per_chunk", "HESSIAN_CHUNK_TOKENS"]

logger = logging.getLogger(__name__)

# A group's Hessian capture takes consecutive experts calls of pass 1 concatenated, about this many tokens at a time
# (whole calls). Each call costs the capture a few dozen launches and host synchronisations whatever its size (the
# routing, the GLU products by runs of experts, the accumulators' sort), which left the phase host-bound at the
# default 16k-token calls of a 128 x 2048 calibration (GPU idle 71 % of it, run 64). Runs 67-69 (H100, Qwen3-30B-A3B,
# docs/benchmarks.md): calls of 32 samples x 2048 tokens took the phase from 0.22-0.31 s to 0.15-0.19 s a layer.
HESSIAN_CHUNK_TOKENS = 65536


def calls_per_chunk(tokens_per_call: int, chunk_tokens: int = HESSIAN_CHUNK_TOKENS, row_bytes: int = 0,
                    rows_per_call: float = 0.0, slack: Optional[int] = None) -> int:
    """How many calls of ``tokens_per_call`` tokens (the first calibration batch's) a chunk of :class:`ChunkedCalls`
    holds: ``chunk_tokens // tokens_per_call``, at least 1 -- and, with a budget's ``slack`` (bytes the group plan
    leaves unused), no more than the rows a chunk adds to one call's transients fit: a group sees about
    ``rows_per_call`` routed rows a call, each ``row_bytes`` in the capture (gathered input, its float32 copy in the
    accumulator's workspace, the float32 GLU output), which the plan does not itemize beyond one call's."""
    per = max(1, int(chunk_tokens) // max(1, int(tokens_per_call)))
    if slack is not None and per > 1:
        extra = rows_per_call * row_bytes  # what each call more in a chunk adds
        if extra > 0:
            per = max(1, min(per, 1 + int(slack // extra)))
    return per


class ChunkedCalls:
    """Feeds an :class:`~moequant.calibration.capture.ExpertCapture` with the experts calls of one layer, ``per``
    consecutive calls at a time concatenated into one ``add_call`` (rows in call order), the chunks fixed by each
    call's index in batch order (call ``i`` is in chunk ``i // per``). A call may come with only some of its tokens
    (a rank that receives the rows routed to its experts) or not at all: the chunk then holds the rows that came,
    in the same order, so every expert's rows and their grouping into accumulator updates are those of the
    one-process run -- the same Hessians bit for bit. :meth:`flush` after the last call."""

    def __init__(self, cap: ExpertCapture, per: int) -> None:
        if int(per) < 1:
            raise ValueError(f"per: expected calls per chunk >= 1, got {per!r}")
        self.cap, self.per = cap, int(per)
        self._chunk: Optional[int] = None
        self._rows: list = []

    def add(self, index: int, hs: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        """Call ``index`` (its place in batch order): ``hs`` ``[..., H]``, ``idx`` and ``w`` one row per token."""
        chunk = int(index) // self.per
        if chunk != self._chunk:
            self.flush()
            self._chunk = chunk
        x = hs.reshape(-1, hs.shape[-1])
        n = x.shape[0]
        self._rows.append((x, idx.reshape(n, -1), w.reshape(n, -1)))

    def flush(self) -> None:
        rows, self._rows = self._rows, []
        if len(rows) == 1:
            self.cap.add_call(*rows[0])
        elif rows:
            self.cap.add_call(*(torch.cat(parts) for parts in zip(*rows)))


class ExpertsRecorder:
    """Stands in for a fused experts module's forward while a layer runs: :meth:`recording` keeps every call's
    ``(hidden_states, top_k_index, top_k_weights)`` (in ``calls``) and returns zeros; :meth:`replaying` returns the
    given outputs, one per call, in order. The module itself is untouched (its instance ``forward`` is set and
    removed again), so the MoE block around it runs its own code."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts
        self.call = ExpertsCall(experts)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @contextlib.contextmanager
    def _forward(self, fn) -> Iterator[None]:
        if "forward" in vars(self.experts):
            raise RuntimeError("ExpertsRecorder: the experts module already has an instance forward")
        self.experts.forward = fn
        try:
            yield
        finally:
            del self.experts.forward

    def recording(self):
        """Records every call into :attr:`calls` (appended) and returns zeros of the hidden states' shape."""
        def record(*args, **kwargs):
            hs, idx, w = self.call.bind(args, kwargs)
            self.calls.append((hs, idx, w))
            return torch.zeros_like(hs)
        return self._forward(record)

    def replaying(self, outputs: list):
        """Returns ``outputs[i]`` for the i-th call; a call more, or a shape that differs, is an error."""
        it = iter(outputs)

        def replay(*args, **kwargs):
            hs, _, _ = self.call.bind(args, kwargs)
            out = next(it, None)
            if out is None or out.shape != hs.shape:
                raise RuntimeError("ExpertsRecorder: the layer called its experts differently than when recorded")
            return out
        return self._forward(replay)


def expert_view(experts: nn.Module, ids: torch.Tensor | slice, device) -> nn.Module:
    """A fused experts module holding only the experts ``ids`` (a slice: views of the layer's parameters when
    they are on ``device`` already; an index tensor or another device: copies) that computes like the original.
    Its ``num_experts`` is the view's, so index ``num_experts`` is the "no expert" pad; with the grouped_mm
    implementation the pad rows are masked (``_is_expert_parallel``)."""
    view = nn.Module.__new__(type(experts))
    view.__dict__.update(experts.__dict__)
    view._parameters, view._buffers, view._modules = {}, dict(experts._buffers), dict(experts._modules)
    for name, p in experts._parameters.items():
        t = p.data[ids] if isinstance(ids, slice) else p.data.index_select(0, ids.to(p.device))
        view._parameters[name] = nn.Parameter(t.to(device), requires_grad=False)
    n = int(view._parameters["gate_up_proj"].shape[0])
    for attr in ("num_experts", "num_local_experts"):
        if attr in view.__dict__:
            setattr(view, attr, n)
    view._is_expert_parallel = True
    return view


@dataclass
class MoELayerOutput:
    """What :meth:`MoELayerEngine.run` returns: the layer's results and records (as the whole-layer path's), the
    routed tokens and Hessian mass per expert, the layer's outputs on the calibration batches (CPU), the group
    plan, the seconds per phase and each expert's routing mass (the sum of its tokens' routing weights)."""

    results: dict
    records: list
    expert_tokens: list
    expert_mass: list
    outputs: list
    plan: GroupPlan
    num_experts: int
    phases: dict = field(default_factory=dict)
    routing_mass: list = field(default_factory=list)
    parts: int = 0  # the groups whose results went to the work directory's part files (``part_sink``)
    part_writes: Optional[PartWrites] = None  # those writes still in flight: wait for them before using the parts


class _Phases:
    def __init__(self, device: torch.device) -> None:
        self.device, self.t = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"moequant.{name}"):  # a marker when a profiler runs, else nothing
            yield
        if self.device.type == "cuda":  # this thread's stream only: the group results' copies on their side stream
            torch.cuda.current_stream(self.device).synchronize()  # go on (a device-wide wait charged them here)
        self.t[name] = round(self.t.get(name, 0.0) + time.perf_counter() - t0, 4)


class MoELayerEngine:
    """Runs the steps of the module docstring on one loaded MoE layer.

    Args:
        layer: the decoder layer, its non-expert modules on ``device`` (the experts on ``device`` or the CPU).
        family, prefix, recipe, storage: the model's family, the layer's name, the validated recipe, the checkpoint
            dtype. device: the compute device. factory: the Hessian accumulator factory.
        plan: the :class:`~moequant.pipeline.groups.GroupPlan` (:func:`~moequant.pipeline.groups.plan_layer`). num_batches, run_batch: the calibration batches and
            ``run_batch(b) -> the layer's output on batch b`` (on the device). outputs: where pass 3 puts the
            layer's outputs, batch by batch (``append``: a list, the default, or a states sink of
            :mod:`moequant.pipeline.states`); returned as :attr:`MoELayerOutput.outputs`. output_hooks: a context
            manager (e.g. :class:`moequant.calibration.kv_cache.KVCacheHooks`) entered around pass 3, the forwards
            of the quantized layer that give its outputs.
        probe: given to every :func:`~moequant.pipeline.jobs.finish_jobs` (the budget's measurement pass).
        dist: the :class:`~moequant.pipeline.distributed.DistContext` of a multi-process run (``run_batch`` then
            runs this rank's batches; :mod:`moequant.pipeline.distributed` does the exchanges), else None.
        part_sink: with several groups, ``part_sink(part, results)`` takes each group's results in host memory
            (:class:`~moequant.pipeline.host.HostResults`: the work directory's part files), which are then not in
            :attr:`MoELayerOutput.results`; :attr:`MoELayerOutput.parts` counts them. None: all are returned.
    """

    def __init__(self, layer: nn.Module, family: MoEFamily, prefix: str, recipe: Recipe, storage: torch.dtype,
                 device: torch.device, factory, plan: "GroupPlan", num_batches: int, run_batch,
                 outputs=None, probe=None, dist=None, output_hooks=None, part_sink=None) -> None:
        self.probe = probe
        self.part_sink = part_sink
        self.parts = 0
        self.part_writes: Optional[PartWrites] = None
        self.layer, self.family, self.prefix, self.recipe = layer, family, prefix, recipe
        self.storage, self.device, self.factory = storage, torch.device(device), factory
        self.plan, self.num_batches, self.run_batch = plan, num_batches, run_batch
        self.outputs = HostCopies() if outputs is None else outputs
        self.output_hooks = output_hooks
        self.experts = family.experts_of(layer)
        self.num = num_experts(self.experts)
        self.phases = _Phases(self.device)
        self.dist = dist  # a DistContext (moequant.pipeline.distributed) in a multi-process run, else None

    # ------------------------------------------------------------------ passes
    def _pass(self, ctx, keep: bool):
        """Runs the calibration batches under ``ctx``; with ``keep`` each output goes to :attr:`outputs` (device
        tensors as pinned host copies, made while the next batches compute; a disk-backed store writes them)."""
        with ctx:
            for b in range(self.num_batches):
                y = self.run_batch(b)
                if keep:
                    self.outputs.append(y)
        if not keep:
            return None
        return self.outputs.done() if isinstance(self.outputs, HostCopies) else self.outputs

    @torch.no_grad()
    def run(self) -> MoELayerOutput:
        recipe, fam, ph = self.recipe, self.family, self.phases
        rec1 = ExpertsRecorder(self.experts)
        weighted = recipe.routing_weighted
        dist = self.dist
        if dist is not None:
            from .distributed import recording_factory, solve_linears
        cap = LayerCapture(self.layer, fam, layer_prefix=self.prefix, weighting="routing" if weighted else "none",
                           shared_weighting="gate" if weighted else "none",
                           accumulator_factory=self.factory if dist is None else recording_factory, experts=False)
        later = gptaq.deferred_linears(self.layer, fam, cap.linears.modules, recipe.gptaq.modules) \
            if recipe.gptaq.enabled and dist is None else []
        inputs = gptaq.LinearInputs({n: cap.linears.modules[n] for n in later}, cap.linears.weight_fns)
        with ph("pass1_forward"):
            with cap.attach(), inputs.recording():
                self._pass(rec1.recording(), keep=False)
        with ph("linear_solve"):
            if later:  # o_proj / the shared down_proj after the Linears feeding them, on their new inputs
                res_l, rec_l = gptaq.solve_linears(
                    cap, fam, recipe, self.storage, self.probe, inputs,
                    lambda: self._pass(ExpertsRecorder(self.experts).recording(), keep=False),
                    self.factory, self.device)
            elif dist is None:
                res_l, rec_l = quantize_linears(cap, fam, recipe, self.storage, self.probe)
            else:  # every rank's inputs in batch order, solved on rank 0, the weights to every rank
                res_l, rec_l = solve_linears(dist, cap, fam, recipe, self.storage, self.factory, self.layer,
                                             frozenset(id(p) for p in self.experts.parameters()), self.probe)
        del cap, inputs
        rec2 = ExpertsRecorder(self.experts)
        with ph("pass2_forward"):
            self._pass(rec2.recording(), keep=False)
        plan = self.plan
        logger.debug("%s: %s", self.prefix, plan.describe(self.num))
        if dist is None:
            res_e, rec_e, tokens, mass, expert_out = self._experts(plan, rec1.calls, rec2.calls)
            routing = self._routing_mass(rec1.calls)
        else:  # the routing mass of every rank's calls, in batch order
            from .distributed import distributed_experts
            res_e, rec_e, tokens, mass, expert_out, routing = distributed_experts(self, plan, rec1.calls,
                                                                                  rec2.calls, dist)
        del rec1, rec2
        rec3 = ExpertsRecorder(self.experts)
        with ph("pass3_forward"), (self.output_hooks or contextlib.nullcontext()):
            outputs = self._pass(rec3.replaying(expert_out), keep=True)
        return MoELayerOutput({**res_l, **res_e}, rec_l + rec_e, tokens, mass, outputs, plan, self.num,
                              dict(ph.t), routing, self.parts, self.part_writes)

    def _routing_mass(self, calls: list) -> list:
        """Per expert, the sum of the routing weights of the calibration tokens routed to it (pass 1's calls)."""
        mass = torch.zeros(self.num, dtype=torch.float64)
        for _, idx, w in calls:
            i, v = idx.reshape(-1).long().cpu(), w.reshape(-1).double().cpu()
            ok = (i >= 0) & (i < self.num)
            mass.index_add_(0, i[ok], v[ok])
        return [round(float(m), 6) for m in mass]

    # ------------------------------------------------------------------ experts
    def _dims(self) -> tuple[int, int]:
        return expert_dims(self.experts, self.family)

    def _groups(self, size: int) -> list[slice]:
        return [slice(a, min(a + size, self.num)) for a in range(0, self.num, size)]

    def _lut(self, ids: list[int], pad: int, only: Optional[list[int]] = None) -> torch.Tensor:
        """Layer expert id -> id in a view holding ``ids`` (``pad``, the view's "no expert", for the others and, with
        ``only``, for the experts of ``ids`` not in it), on the compute device: copied once per group, not at every
        call (a pageable host-to-device copy waits for the stream)."""
        lut = torch.full((self.num,), pad, dtype=torch.long)
        keep = set(ids if only is None else only)
        pos = [(e, j) for j, e in enumerate(ids) if e in keep]
        if pos:
            lut[torch.tensor([e for e, _ in pos])] = torch.tensor([j for _, j in pos])
        return lut.to(self.device)

    def _experts(self, plan: GroupPlan, calls1: list, calls2: list):
        recipe, fam, ph = self.recipe, self.family, self.phases
        fb = recipe.fallback
        weighting = "routing" if recipe.routing_weighted else "none"
        shrink = fb.policy == "shrink"
        defer = fb.policy == "mean"  # a starved expert's Hessian is then the mean of the layer's other experts
        groups = self._groups(plan.size)
        single = len(groups) == 1 and plan.resident
        per = self.chunk_calls(calls1)  # the Hessian capture's calls per chunk, the same for every group
        prior = pooled = None
        if shrink:
            with ph("expert_hessians"):
                prior = self._all_token_hessian(calls1)
                if not single:
                    pooled = self._pooled(calls1, groups, weighting, per)
        tokens, mass = [0] * self.num, [0.0] * self.num
        amax = [(0.0, 0.0)] * self.num  # per expert, the largest |x| of its gate / up and down inputs
        results, records = {}, {}
        means = (_RunningMean(), _RunningMean())  # gate/up, down: the "mean" fallback's layer means
        deferred: list[int] = []
        out_acc = None if single else [torch.zeros(c[0].shape, dtype=torch.float32, device=c[0].device)
                                       for c in calls2]
        last = None
        # the groups' codes go to host memory on a worker thread while the next group computes
        # (with a part sink, each group's results go to the work directory as soon as they are in host memory)
        with HostResults(self.device, None if single else self.part_sink) as keeper:
            for g in groups:
                ids = list(range(g.start, g.stop))
                view = expert_view(self.experts, g, self.device)
                lut = self._lut(ids, len(ids))
                with ph("expert_hessians"):
                    cap = ExpertCapture(view, fam, weighting=weighting, accumulator_factory=self.factory,
                                        all_token_down=shrink and fb.calibrate_all_experts)
                    self._feed(cap, calls1, lut, len(ids), per)
                    hgu, hdn = group_hessians(cap, fb, prior, pooled, means)
                    for j, (e, a_gu, a_dn) in enumerate(zip(ids, cap.gate_up.absmax.tolist(),
                                                            cap.down.absmax.tolist())):
                        tokens[e], mass[e], amax[e] = hgu.counts[j], round(hgu.mass[j], 6), (a_gu, a_dn)
                        if defer:
                            for running, acc, hess in zip(means, (cap.gate_up, cap.down), (hgu, hdn)):
                                running.add(acc, j, hess)  # in expert order, like the whole-layer path's sum
                now = [j for j in range(len(ids)) if not defer or hgu.calibrated(j)]
                deferred += [ids[j] for j in range(len(ids)) if defer and not hgu.calibrated(j)]
                with ph("expert_solve"):
                    if recipe.gptaq.enabled and "routed" in recipe.gptaq.modules:  # down after gate/up, new inputs
                        res, recs = gptaq.solve_group(view, fam, recipe, self.prefix, ids, now, hgu, hdn,
                                                      lambda j: amax[ids[j]], calls1, lut, self.factory, self.device,
                                                      self.storage, self.probe)
                    else:
                        jobs = expert_jobs(view, fam, recipe, self.prefix, ids, now, hgu.get, hdn.get, hgu.counts,
                                           lambda j: amax[ids[j]])
                        res, recs = finish_jobs(jobs, self.storage, recipe, probe=self.probe)
                        del jobs
                with ph("expert_keep"):
                    self._keep(res, recs, results, records, view, g, keeper)
                del res  # its dequantized values: the device keeps the group's codes until they are copied
                last = (hgu, hdn)
                del cap
                if not single:
                    with ph("expert_outputs"):
                        self._outputs(view, ids, [ids[j] for j in now], calls2, out_acc)
                del view
            if deferred:  # starved experts: their fallback needs the layer's mean Hessians, final only now
                ids = sorted(deferred)
                sel = torch.tensor(ids, dtype=torch.long)
                view = expert_view(self.experts, sel, self.device)
                with ph("expert_solve"):
                    res, recs = self.solve_deferred(view, ids, last, tokens, amax)
                with ph("expert_keep"):
                    self._keep(res, recs, results, records, view, sel, keeper)
                if not single:
                    with ph("expert_outputs"):
                        self._outputs(view, ids, ids, calls2, out_acc)
            with ph("expert_keep"):  # the copies; the part writes go on, and the layer's commit waits for them
                host, self.part_writes = keeper.finish()
                results.update(host)
            self.parts = keeper.parts
            with ph("expert_outputs"):
                if single:  # every expert in one group, written back in place: the experts module itself
                    expert_out = [self.experts(hs, idx, w) for hs, idx, w in calls2]
                else:
                    expert_out = [a.to(c[0].dtype) for a, c in zip(out_acc, calls2)]
            return results, [r for e in sorted(records) for r in records[e]], tokens, mass, expert_out

    def solve_deferred(self, view: nn.Module, ids: list, last: tuple, tokens: list, amax: list):
        """Solves the starved experts ``ids`` (``view`` holds them) with the ``mean`` fallback's final layer means
        (``last``: the last group's gate/up and down :class:`ExpertHessians`); returns ``finish_jobs``' results."""
        hgu, hdn = last
        jobs = expert_jobs(view, self.family, self.recipe, self.prefix, ids, range(len(ids)),
                           lambda j: hgu.fallback(), lambda j: hdn.fallback(), [tokens[e] for e in ids],
                           lambda j: amax[ids[j]])
        return finish_jobs(jobs, self.storage, self.recipe, probe=self.probe)

    def _keep(self, res: dict, recs: list, results: dict, records: dict, view: nn.Module, where,
              keeper: HostResults) -> None:
        """Collects a group's results and records (by expert, for the whole-layer order) and copies the view's
        dequantized weights back into the layer where the view holds copies."""
        if isinstance(where, slice) and where == slice(0, self.num) and self.plan.resident:
            results.update(res)  # the one group: the whole-layer path's results as they are
        else:  # of many groups, only the codes are kept, in host memory (copied while the next group computes)
            keeper.add(res)
        for r in recs:
            e = int(r.name.split("+")[0].rsplit(".", 2)[-2])
            records.setdefault(e, []).append(r)
        for name, p in self.experts._parameters.items():
            v = view._parameters[name].data
            if isinstance(where, slice):
                if v.data_ptr() != p.data[where].data_ptr():
                    p.data[where].copy_(v.to(p.device))
            else:
                p.data.index_copy_(0, where.to(p.device), v.to(p.device))

    def _outputs(self, view: nn.Module, ids: list[int], solved: list[int], calls2: list, out_acc: list) -> None:
        """Adds the quantized outputs of the experts ``solved`` (layer ids; ``ids``: the experts the view holds)
        on pass 2's calls; every other slot is a pad."""
        pad = len(ids)
        lut = self._lut(ids, pad, solved)
        for acc, (hs, idx, w) in zip(out_acc, calls2):
            local = local_ids(idx, lut, pad)
            # the group's routed rows only (grouped GEMMs on a GPU), else the module on the whole call
            if not grouped_output_into(view, self.family, hs, local, w, acc.view(-1, acc.shape[-1])):
                acc += view(hs, local, w).float()

    def chunk_calls(self, calls1: list) -> int:
        """:func:`calls_per_chunk` of the first call (``calls1``: every call of the layer in batch order, or rank 0's
        in a distributed run, whose first is batch 0), within the plan's slack: a group of ``plan.size`` experts
        sees about that share of the call's ``tokens x top_k`` routed rows."""
        if not calls1:
            return 1
        hs, idx, _ = calls1[0]
        tokens = hs.numel() // hs.shape[-1]
        hidden, inter = self._dims()
        share = min(1.0, self.plan.size / max(1, self.num))
        rows = tokens * (idx.numel() // max(1, tokens)) * share
        return calls_per_chunk(tokens, row_bytes=6 * hidden + 4 * inter, rows_per_call=rows, slack=self.plan.slack)

    def _feed(self, cap: ExpertCapture, calls1: list, lut: torch.Tensor, n: int, per: int) -> None:
        """Pass 1's calls (all of them, in batch order) into a group's capture, ``per`` a chunk
        (:meth:`chunk_calls`, :class:`ChunkedCalls`)."""
        chunks = ChunkedCalls(cap, per)
        for i, (hs, idx, w) in enumerate(calls1):
            chunks.add(i, hs, local_ids(idx, lut, n), w)
        chunks.flush()

    def _all_token_hessian(self, calls1: list) -> Optional[torch.Tensor]:
        """``shrink``: the Hessian of the MoE block's input over all tokens, the gate/up shrinkage target."""
        hidden, _ = self._dims()
        acc = self.factory(1, hidden, self.device)
        for hs, _, _ in calls1:
            x = hs.reshape(-1, hs.shape[-1])
            acc.add(x, torch.zeros(x.shape[0], dtype=torch.int32, device=x.device))
        return acc.hessian(0) if float(acc.mass[0]) > 0 else None

    def _pooled(self, calls1: list, groups: list, weighting: str, per: int) -> list:
        """``shrink`` over several groups: the pooled Hessians (gate/up, down) of all routed rows of the layer, the
        target where no all-token one exists, by a first sweep over the groups (accumulation only)."""
        sums, m = [None, None], 0.0
        for g in groups:
            view = expert_view(self.experts, g, self.device)
            cap = ExpertCapture(view, self.family, weighting=weighting, accumulator_factory=self.factory)
            n = g.stop - g.start
            lut = self._lut(list(range(g.start, g.stop)), n)
            self._feed(cap, calls1, lut, n, per)
            for k, a in enumerate((cap.gate_up, cap.down)):
                s = a.hessians.sum(0)
                sums[k] = s if sums[k] is None else sums[k] + s
            m += float(cap.gate_up.mass.sum())
        return [s / m for s in sums] if m > 0 else [None, None]


def group_hessians(cap: ExpertCapture, fb, prior: Optional[torch.Tensor], pooled: Optional[list],
                   means: tuple) -> tuple[ExpertHessians, ExpertHessians]:
    """The gate/up and down :class:`ExpertHessians` of one group's capture ``cap`` under the recipe's fallback
    ``fb``: ``prior`` the layer's all-token Hessian (``shrink``), ``pooled`` the pooled [gate/up, down] Hessians of
    several groups (``shrink``), ``means`` the two :class:`_RunningMean` of the ``mean`` fallback."""
    down_all = cap.down_all
    hgu = ExpertHessians(cap.gate_up, fb.min_tokens, fb.policy, fb.shrinkage_tokens,
                         (lambda e: prior) if prior is not None else None,
                         pooled=(lambda: pooled[0]) if pooled is not None else None,
                         layer_mean=means[0].value)
    hdn = ExpertHessians(cap.down, fb.min_tokens, fb.policy, fb.shrinkage_tokens,
                         (lambda e: down_all.hessian(e) if float(down_all.mass[e]) > 0 else None)
                         if down_all is not None else None,
                         pooled=(lambda: pooled[1]) if pooled is not None else None,
                         layer_mean=means[1].value)
    return hgu, hdn


class _RunningMean:
    """The mean normalised Hessian of a layer's well-calibrated experts (else of those that saw any token), summed
    group by group in expert order, as :class:`~moequant.pipeline.jobs.ExpertHessians` computes it for one
    accumulator."""

    def __init__(self) -> None:
        self.ok, self.n_ok, self.any, self.n_any = None, 0, None, 0

    def add(self, acc, j: int, hessians: ExpertHessians) -> None:
        if hessians.calibrated(j):
            h = acc.hessian(j, mass=hessians.mass[j])
            self.ok, self.n_ok = (h if self.ok is None else self.ok + h), self.n_ok + 1
        elif hessians.counts[j] > 0 and hessians.mass[j] > 0:
            h = acc.hessian(j, mass=hessians.mass[j])
            self.any, self.n_any = (h if self.any is None else self.any + h), self.n_any + 1

    def value(self) -> Optional[torch.Tensor]:
        if self.n_ok:
            return self.ok / self.n_ok
        return self.any / self.n_any if self.n_any else None
