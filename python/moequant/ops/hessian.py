"""Routing-weighted Hessian accumulation of many experts (:class:`HessianAccumulator`). Twin:
:func:`moequant.ref.accumulate_hessian_ref`."""
from __future__ import annotations

from typing import Optional

import torch

from moequant import _C

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """Routing-weighted Hessians of many experts: ``H[e] = sum_i c_i x_i x_i^T`` over rows routed to ``e``.

    State lives in this object (tensors on ``device``); the math runs in the C++ core (CPU, float32 or
    float64 accumulation) or the CUDA kernels (float32). Also tracks the token count, the routing-weight
    mass and the largest ``|x|`` (``absmax``, float32: NVFP4's static activation global scale) of each expert. Two accumulators of the same shape merge (e.g. after a multi-process reduce).

    ``precision`` (CUDA only) selects the update: ``"fp32"`` (default, fp32 SIMT SYRK, relative error ~1e-6),
    ``"tf32"`` (tensor cores, TF32 products with fp32 accumulation, ~1e-3 relative Frobenius error) or ``"bf16"``
    (rows rounded to bf16, fp32 accumulation, ~1e-2; the fastest). CPU accumulators accept only ``"fp32"``.

    On CUDA, ``add`` updates one triangle of each ``H[e]`` only; the copy onto the other triangle (a pass over all
    of H) runs once, when ``hessians`` is next read, instead of after every batch. Read ``hessians`` (not a saved
    reference to it) after adding; a tensor assigned to ``hessians`` is taken as complete and symmetric.
    """

    _PRECISIONS = {"fp32": 0, "tf32": 1, "bf16": 2}

    def __init__(self, num_experts: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", precision: str = "fp32"):
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: expected an integer >= 1, got {num_experts!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected an integer >= 1, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and dtype != torch.float32:
            raise ValueError("dtype: expected torch.float32 for CUDA accumulators (float64 accumulation runs on "
                             "the CPU), got torch.float64")
        if not isinstance(precision, str) or precision not in self._PRECISIONS:
            raise ValueError(f"precision: expected 'fp32', 'tf32' or 'bf16', got {precision!r}")
        if precision != "fp32" and device.type != "cuda":
            raise ValueError(f"precision: expected 'fp32' for {device.type} accumulators ('tf32' / 'bf16' run on "
                             f"CUDA tensor cores), got {precision!r}")
        self.precision = precision
        self.num_experts, self.dim, self.dtype, self.device = num_experts, dim, dtype, device
        self._hessians = torch.zeros(num_experts, dim, dim, dtype=dtype, device=device)
        self._unmirrored = False  # CUDA: only the row-major upper triangle is current (see ``hessians``)
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.mass = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.absmax = torch.zeros(num_experts, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        """Adds rows ``x`` ``[n, dim]`` routed to ``expert_ids`` ``[n]`` with weights ``[n]`` (None: 1).

        ``x`` may be any floating dtype; CUDA accumulators take bfloat16 / float16 rows without a conversion (the
        values are widened exactly, so the result equals that of ``x.float()``)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"x: expected a 2-D floating-point tensor [n, {self.dim}], got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} columns (the accumulator's dim), got shape {tuple(x.shape)}")
        if not isinstance(expert_ids, torch.Tensor) or expert_ids.is_floating_point() or expert_ids.dim() != 1:
            raise ValueError(f"expert_ids: expected a 1-D integer tensor of length {x.shape[0]}, got "
                             f"{getattr(expert_ids, 'dtype', type(expert_ids))}")
        ids = expert_ids.to(device=self.device)  # range checked by the core, before anything is updated
        w = None
        if weights is not None:
            if not isinstance(weights, torch.Tensor) or weights.dim() != 1:
                raise ValueError(f"weights: expected a 1-D float tensor of length {x.shape[0]} or None")
            w = weights.to(device=self.device, dtype=torch.float32).contiguous()
        on_cuda = self.device.type == "cuda"
        # CUDA reads bf16 / fp16 rows as they are (widened exactly on the device: the same result as float32 rows,
        # half the bytes); everything else is converted to float32 first.
        keep = on_cuda and x.dtype in (torch.bfloat16, torch.float16)
        x = x.to(device=self.device, dtype=x.dtype if keep else torch.float32)
        # the binding's rule for x (check_unit_stride_rows in bindings/module.cpp): unit-stride rows, else a copy
        if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
            x = x.contiguous()
        ids = ids.to(torch.int32).contiguous()
        _C.accumulate_hessian(self._hessians, self.counts, self.mass, x, ids, w, self._PRECISIONS[self.precision],
                              symmetrize=not on_cuda)
        self._unmirrored = self._unmirrored or on_cuda
        if x.shape[0]:  # the largest |x| of each expert's rows (exact in any dtype), whatever their weight; one
            lo, hi = torch.aminmax(x, dim=1)  # read of x, no |x| copy (a MoE layer's routed rows are large)
            self.absmax.scatter_reduce_(0, ids.long(), torch.maximum(-lo, hi).float(), "amax")

    @property
    def hessians(self) -> torch.Tensor:
        """``[num_experts, dim, dim]``, exactly symmetric (completes the deferred mirror of CUDA ``add`` calls)."""
        if self._unmirrored:
            _C.hessian_symmetrize(self._hessians)
            self._unmirrored = False
        return self._hessians

    @hessians.setter
    def hessians(self, value: torch.Tensor) -> None:
        self._hessians = value
        self._unmirrored = False

    def merge(self, other: "HessianAccumulator") -> None:
        """Adds another accumulator of the same shape into this one."""
        if not isinstance(other, HessianAccumulator):
            raise ValueError(f"other: expected a HessianAccumulator, got {type(other).__name__}")
        if (other.num_experts, other.dim) != (self.num_experts, self.dim):
            raise ValueError(f"other: expected num_experts={self.num_experts}, dim={self.dim}, got "
                             f"num_experts={other.num_experts}, dim={other.dim}")
        self.hessians += other.hessians.to(device=self.device, dtype=self.dtype)
        self.counts += other.counts.to(self.device)
        self.mass += other.mass.to(self.device)
        torch.maximum(self.absmax, other.absmax.to(self.device), out=self.absmax)

    def hessian(self, expert: int, normalize: bool = True, mass: Optional[float] = None) -> torch.Tensor:
        """``H[expert]``, divided by its weight mass when ``normalize`` (zeros for an expert with no rows).
        ``mass``: ``float(self.mass[expert])`` when the caller has read it already (no device synchronisation)."""
        h = self.hessians[expert]
        m = float(self.mass[expert]) if mass is None else float(mass)
        return h / m if normalize and m > 0 else h.clone()

