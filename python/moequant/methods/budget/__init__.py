"""Budgeted mixed precision: its recipe section (:class:`BudgetConfig`), the allocation units (which matrices share a
scheme, :mod:`~moequant.methods.budget.units`) and the allocator (:func:`allocate`, a multiple-choice knapsack,
:mod:`~moequant.methods.budget.allocate`). The two-pass run that measures every candidate and applies the allocation
is :mod:`moequant.pipeline.budget`. Twin: :func:`moequant.ref.allocate_ref`."""
from .allocate import Allocation, allocate, greedy, lower_bound, min_cost
from .config import DEFAULT_CANDIDATES, BudgetConfig, candidate_label, parse_budget
from .units import EXPERT_GRANULARITIES, FUSED_SIBLINGS, Matrix, Unit, build_units, unit_kind

__all__ = ["Allocation", "allocate", "greedy", "lower_bound", "min_cost", "BudgetConfig", "DEFAULT_CANDIDATES",
           "candidate_label", "parse_budget", "EXPERT_GRANULARITIES", "FUSED_SIBLINGS", "Matrix", "Unit",
           "build_units", "unit_kind"]
