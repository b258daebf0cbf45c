"""How a MoE layer's experts go through the device (the expert streaming engine's plan, pure arithmetic on the
layer's structure): :class:`GroupPlan`, :func:`experts_per_group` (the group size from a memory budget),
:func:`plan_layer` (what one expert and the rest of a layer cost) and :func:`check_layers_fit` (every layer, before
the run)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..models import MoEFamily, intermediate_size, num_experts
from ..recipe.recipe import Recipe

__all__ = ["GIB", "GroupPlan", "experts_per_group", "plan_layer", "check_layers_fit", "expert_dims", "local_ids"]

GIB = 2**30


@dataclass(frozen=True)
class GroupPlan:
    """How a MoE layer's experts go through the device: ``size`` experts at a time; ``resident``: all of the
    layer's expert weights stay on the device (else each group's are copied there); the estimate behind it
    (bytes)."""

    size: int
    resident: bool
    per_expert: int
    fixed: int
    budget: Optional[int]

    used: Optional[int] = None

    @property
    def slack(self) -> Optional[int]:
        """Bytes of the budget the plan leaves unused (None: unbounded): room for optional copies, such as the
        layer's inputs kept on the device across the engine's three passes."""
        if self.budget is None or self.used is None:
            return None
        return max(0, self.budget - self.used)

    def describe(self, total: int) -> str:
        groups = math.ceil(total / self.size)
        where = "on the device" if self.resident else "streamed from host memory"
        return f"{total} experts in {groups} group(s) of up to {self.size}, weights {where}"

    def describe_budget(self) -> str:
        budget = "unbounded" if self.budget is None else f"{self.budget / GIB:.2f} GiB"
        return (f"budget {budget}, {self.fixed / GIB:.2f} GiB fixed, {self.per_expert / GIB:.3f} GiB per streamed "
                f"expert")


def experts_per_group(num: int, expert_weight_bytes: int, expert_work_bytes: int, fixed_bytes: int,
                      budget_bytes: Optional[int], override: Optional[int] = None, what: str = "") -> GroupPlan:
    """Chooses the group size of a layer's experts (pure).

    Args:
        num: experts in the layer. expert_weight_bytes: one expert's weights on the device; expert_work_bytes: its
            Hessians and solver workspace. fixed_bytes: what the layer needs besides its experts (the other
            weights, the recorded calls, the outputs). budget_bytes: the device memory the layer may use (None:
            unbounded: one group). override: ``experts_per_group`` from the recipe (None: from the budget).
        what: the layer, for the error message.
    Raises ValueError naming ``device_memory_gb`` when not even one expert fits.
    """
    if override is not None:
        size = max(1, min(int(override), num))
        resident = budget_bytes is None or fixed_bytes + num * expert_weight_bytes + size * expert_work_bytes \
            <= budget_bytes
        used = fixed_bytes + size * expert_work_bytes + (num if resident else size) * expert_weight_bytes
        return GroupPlan(size, resident, expert_weight_bytes + expert_work_bytes, fixed_bytes, budget_bytes, used)
    if budget_bytes is None:
        return GroupPlan(num, True, expert_weight_bytes + expert_work_bytes, fixed_bytes, None)
    resident_room = budget_bytes - fixed_bytes - num * expert_weight_bytes
    if resident_room >= expert_work_bytes:
        size = _balanced(num, min(num, resident_room // expert_work_bytes))
        used = fixed_bytes + num * expert_weight_bytes + size * expert_work_bytes
        return GroupPlan(int(size), True, expert_weight_bytes + expert_work_bytes, fixed_bytes, budget_bytes, used)
    per = expert_weight_bytes + expert_work_bytes
    size = (budget_bytes - fixed_bytes) // per
    if size < 1:
        raise ValueError(
            f"device_memory_gb: {budget_bytes / GIB:.2f} GiB leaves room for no expert of {what or 'the layer'}: "
            f"one expert needs {per / GIB:.2f} GiB (weights {expert_weight_bytes / GIB:.2f}, Hessians "
            f"{expert_work_bytes / GIB:.2f}) after {fixed_bytes / GIB:.2f} GiB for the rest of the layer and its "
            f"calibration activations; raise device_memory_gb (--device-memory-gb), or lower "
            f"calibration.num_samples / seq_len")
    size = _balanced(num, int(min(size, num)))
    return GroupPlan(size, False, per, fixed_bytes, budget_bytes, fixed_bytes + size * per)


def _balanced(num: int, most: int) -> int:
    """The smallest group size that still takes ``num`` experts in as few groups as ``most`` does: the same number
    of groups, evened out (DeepSeek-V3's 256 experts at up to 28: 10 groups of up to 26 instead of nine of 28 and
    one of 4), so a group's memory, the layer's peak, is no larger than it needs to be."""
    return -(-num // -(-num // most))


def local_ids(idx: torch.Tensor, lut: torch.Tensor, pad: int) -> torch.Tensor:
    """Layer expert ids ``idx`` -> ids in a view of some experts (``lut``: layer id -> view id); ids outside the
    layer's range (pads) become ``pad``."""
    i = idx.long()
    valid = (i >= 0) & (i < lut.numel())
    return torch.where(valid, lut.to(i.device)[i.clamp(0, lut.numel() - 1)], torch.full_like(i, pad))


def expert_dims(experts: nn.Module, family: MoEFamily) -> tuple[int, int]:
    """(hidden size, expert width) of a fused experts module."""
    return int(experts.gate_up_proj.shape[-1 if family.layout == "standard" else 1]), intermediate_size(experts, family)


def plan_layer(layer: nn.Module, family: MoEFamily, recipe: Recipe, tokens: int, dtype: torch.dtype,
               budget_bytes: Optional[int], prefix: str = "") -> GroupPlan:
    """The :class:`GroupPlan` of a MoE layer (its structure alone: the meta-device layer works) for ``tokens``
    calibration tokens whose hidden states are ``dtype``: one expert costs its weights (when streamed), its two
    Hessians (and the all-token down Hessian of ``calibrate_all_experts``) twice (accumulated and normalized), and
    its solved matrices' float32 values and int8 codes (a group's results; kept as codes in host memory, the previous
    group's codes still on the device while they are copied); the layer's other weights, the two
    recorded passes of expert inputs, the fp32 output sums, the batched solver's ``solver_memory_gb`` and 2 GiB
    are fixed; the per-expert estimate carries a third more for what it does not itemize."""
    ex = family.experts_of(layer)
    num = num_experts(ex)
    hidden, inter = expert_dims(ex, family)
    weight = sum(p.numel() * p.element_size() for p in ex.parameters()) // num
    acc = 8 if recipe.hessian_dtype == "float64" else 4
    # The accumulated Hessians, their normalized copies (the group's solve jobs hold both), and the solver's results
    # while the group is solved: float32 dequantized values and int8 codes of the expert's three matrices.
    hess = 2 * (hidden * hidden + inter * inter * (2 if recipe.fallback.calibrate_all_experts else 1)) * acc
    # ... and the previous group's int8 codes, on the device until their copies to host memory are done
    hess += 3 * hidden * inter * (4 + 1 + 1)
    if recipe.gptaq.enabled and "routed" in recipe.gptaq.modules:
        # pipeline/gptaq.py: the [x~, x - x~] accumulator (2I wide) and its blocks, the float64 correction, the copy
        # of the original gate/up
        hess += 2 * (2 * inter) ** 2 * acc + 3 * inter * inter * 8 + 2 * hidden * inter * 8 + weight * 2 // 3
    # What the items above miss (the solver's stacked copies beyond solver_memory_gb, the routed rows a group
    # gathers, the allocator's rounding): measured on an H100, a DeepSeek-V3 layer with 38 experts per group needed
    # about 0.93 GiB per expert against 0.70 itemized, and its solve failed 8.8 GiB above the budget.
    hess = hess * 4 // 3
    rest = sum(p.numel() * p.element_size() for n, p in layer.named_parameters()
               if not n.startswith(family.experts + "."))
    elt = torch.empty((), dtype=dtype).element_size()
    fixed = rest + 2 * tokens * hidden * elt + tokens * hidden * 4 + int(recipe.solver_memory_gb * GIB) + 2 * GIB
    if recipe.gptaq.enabled:  # o_proj / shared down_proj: pass-1 inputs, joint accumulators (pipeline/gptaq.py)
        from .gptaq import deferred_linears

        mods = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for n in deferred_linears(layer, family, mods, recipe.gptaq.modules):
            cols = mods[n].in_features
            fixed += tokens * cols * elt + 2 * (2 * cols) ** 2 * acc + 3 * cols * cols * 8
    return experts_per_group(num, weight, hess, fixed, budget_bytes, recipe.experts_per_group, prefix)


def check_layers_fit(lazy, recipe: Recipe, tokens: int, budget_bytes: Optional[int]) -> list:
    """The :class:`GroupPlan` of every MoE layer of a lazily opened model, before the run: raises the
    ``device_memory_gb`` error of :func:`experts_per_group` for the first layer where not one expert fits."""
    plans = []
    for i in range(lazy.num_layers):
        layer = lazy.meta_layer(i)
        if lazy.family.experts_of(layer) is not None:
            plans.append(plan_layer(layer, lazy.family, recipe, tokens, lazy.dtype, budget_bytes, lazy.layer_prefix(i)))
    return plans
