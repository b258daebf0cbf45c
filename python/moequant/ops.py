"""Tensor-level operations of moequant, backed by the C++ core (CPU) and the CUDA kernels (GPU).

Every function takes torch tensors, converts them to the layout the extension wants (float32, contiguous,
int8 codes, int32 expert ids) and returns torch tensors. The plain-PyTorch twins in :mod:`moequant.ref`
define the exact semantics; each function here is tested against its twin (``tests/python/test_ops.py``)
under the policy in ``tests/python/tolerances.py``.

Format contract (compressed-tensors ``pack-quantized``, see docs/formats.md): codes ``q`` are signed
integers in ``[-2^(b-1), 2^(b-1)-1]``; ``dequantized = (q - zero_point) * scale`` per group of
``group_size`` input columns (``-1``: one group per row).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moequant import _C

__all__ = [
    "QuantizedTensor",
    "quantize_rtn",
    "dequantize",
    "pack_int32",
    "unpack_int32",
    "pack_zero_points",
    "unpack_zero_points",
    "HessianAccumulator",
    "gptq_quantize",
    "gptq_quantize_batched",
    "hadamard_transform",
    "make_spec",
    "refine_rounding",
]

_SCALE_DTYPES = {
    torch.float32: _C.ScaleDtype.float32,
    torch.bfloat16: _C.ScaleDtype.bfloat16,
    torch.float16: _C.ScaleDtype.float16,
}
_SEARCHES = {"minmax": _C.ScaleSearch.minmax, "mse": _C.ScaleSearch.mse}


@dataclasses.dataclass
class QuantizedTensor:
    """A quantized ``[out, in]`` weight.

    Attributes:
        codes: int8 ``[out, in]``, signed codes in ``[-2^(b-1), 2^(b-1)-1]``.
        scale: float32 ``[out, G]``; each value is exactly representable in ``scale_dtype``.
        zero_point: int8 ``[out, G]`` (all zeros when symmetric).
        dequantized: float32 ``[out, in]`` = ``(codes - zero_point) * scale`` per group.
        bits, group_size (effective, ``in`` for per-channel), symmetric, scale_dtype: the format.
        loss: the proxy loss ``tr((W - Q) H (W - Q)^T)`` when a Hessian was used, else None.
        info: solver details (damping used, escalations, dead columns) when applicable.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    dequantized: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype = torch.float32
    loss: Optional[float] = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def damp(self) -> Optional[float]:
        return self.info.get("damp")

    @property
    def escalations(self) -> int:
        return int(self.info.get("escalations", 0))

    @property
    def dead_columns(self) -> int:
        return int(self.info.get("dead_columns", 0))


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an integer in [2, 8], got {bits!r}")
    return bits


def _check_float_matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [out_features, in_features], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype (float32, bfloat16, float16), got {t.dtype}")
    return t


def _group_size(group_size: Optional[int], in_features: int) -> int:
    if group_size is None or group_size == -1:
        return -1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size: expected a positive divisor of in_features={in_features} or -1 "
                         f"(per-channel), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size: expected a divisor of in_features={in_features} (or -1 for per-channel), "
                         f"got {group_size}")
    return group_size


def make_spec(bits: int = 4, group_size: Optional[int] = 128, symmetric: bool = False, *,
              in_features: Optional[int] = None, scale_search: str = "minmax", mse_grid: int = 100,
              mse_min_shrink: float = 0.2, mse_norm: float = 2.4,
              scale_dtype: torch.dtype = torch.float32) -> "_C.QuantSpec":
    """Builds and validates the C++ ``QuantSpec``."""
    _check_bits(bits)
    if in_features is not None:
        group_size = _group_size(group_size, in_features)
    elif group_size is None:
        group_size = -1
    if scale_search not in _SEARCHES:
        raise ValueError(f"scale_search: expected one of {sorted(_SEARCHES)}, got {scale_search!r}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype: expected one of float32, bfloat16, float16, got {scale_dtype}")
    return _C.QuantSpec(bits=bits, group_size=group_size, symmetric=bool(symmetric),
                        scale_dtype=_SCALE_DTYPES[scale_dtype], search=_SEARCHES[scale_search],
                        mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm)


def _default_scale_dtype(w: torch.Tensor, scale_dtype: Optional[torch.dtype]) -> torch.dtype:
    if scale_dtype is not None:
        return scale_dtype
    return w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _check_fp16_scales(scale: torch.Tensor, scale_dtype: torch.dtype) -> None:
    """float16 scales saturate to inf above 65504 (rounded by the core like a loader would): name the first group
    and the remedy instead of returning a quantization whose dequantized weights are NaN. One reduction (and, on
    CUDA, one synchronisation) only for float16 scales."""
    if scale_dtype != torch.float16 or bool(torch.isfinite(scale).all()):
        return
    where = tuple((~torch.isfinite(scale)).nonzero()[0].tolist())
    raise ValueError(f"scale_dtype: float16 cannot hold the scale of group {where} (index of the scale tensor "
                     f"{tuple(scale.shape)}): it exceeds 65504, the largest float16, because the group's weights "
                     f"span too wide a range; quantize with scale_dtype=torch.bfloat16 or torch.float32")


def _wrap(raw, spec, scale_dtype, in_features, loss=None, info=None, check_scales=True) -> QuantizedTensor:
    codes, scale, zero, deq = raw
    if check_scales:  # batched results are checked once for all experts by the caller
        _check_fp16_scales(scale, scale_dtype)
    return QuantizedTensor(codes=codes, scale=scale, zero_point=zero.to(torch.int8), dequantized=deq,
                           bits=spec.bits, group_size=spec.group_size if spec.group_size > 0 else in_features,
                           symmetric=spec.symmetric, scale_dtype=scale_dtype, loss=loss, info=info or {})


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: Optional[int] = 128, symmetric: bool = False, *,
                 scale_search: str = "minmax", mse_grid: int = 100, mse_min_shrink: float = 0.2,
                 mse_norm: float = 2.4, scale_dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
    """Round-to-nearest quantization of ``w`` ``[out, in]`` with per-group parameters.

    ``scale_dtype`` (default: ``w.dtype`` for bf16/fp16 weights, else float32) is the checkpoint dtype of the
    scales; they are rounded to it so the dequantized weight equals what a loader reconstructs. Runs on
    ``w``'s device. Bit-exact with :func:`moequant.ref.quantize_rtn_ref`.
    """
    _check_float_matrix(w, "w")
    sd = _default_scale_dtype(w, scale_dtype)
    spec = make_spec(bits, group_size, symmetric, in_features=w.shape[1], scale_search=scale_search,
                     mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm, scale_dtype=sd)
    return _wrap(_C.quantize_rtn(w.float().contiguous(), spec), spec, sd, w.shape[1])


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
               group_size: Optional[int], bits: int = 8) -> torch.Tensor:
    """``(codes - zero_point) * scale`` per group, as float32 ``[out, in]``."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D integer tensor, got {getattr(codes, 'shape', type(codes))}")
    gs = _group_size(group_size, codes.shape[1])
    spec = make_spec(bits, gs, zero_point is None)
    zp = None if zero_point is None else zero_point.to(torch.int32).contiguous()
    return _C.dequantize(codes.to(torch.int8).contiguous(), scale.float().contiguous(), zp, spec)


def _as_codes(q: torch.Tensor, name: str) -> torch.Tensor:
    if type(q) is torch.Tensor and q.dtype is torch.int8 and q.dim() == 2:
        return q.contiguous()  # the common call (int8 codes), ahead of the checks it satisfies
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of integer codes, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype (int8 codes), got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(q.shape)}")
    if q.dtype != torch.int8:
        lo, hi = (int(q.min()), int(q.max())) if q.numel() else (0, 0)
        if lo < -128 or hi > 127:
            raise ValueError(f"{name}: expected codes in [-128, 127], got values in [{lo}, {hi}]")
        q = q.to(torch.int8)
    return q.contiguous()


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs signed codes ``[rows, cols]`` into compressed-tensors int32 words ``[rows, ceil(cols*bits/32)]``.

    Element ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of the row's bit stream (offset by
    ``2^(bits-1)``, least significant first). Example: ``pack_int32(tensor([[-8,...,-1]]), 4) == [[0x76543210]]``.
    """
    return _C.pack_rows(_as_codes(q, "q"), _check_bits(bits))


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 ``[rows, in_features]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        raise ValueError(f"packed: expected an int32 tensor, got {getattr(packed, 'dtype', type(packed))}")
    return _C.unpack_rows(packed.contiguous(), _check_bits(bits), int(in_features))


def pack_zero_points(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs zero points ``[out, G]`` along the output dimension: int32 ``[ceil(out*bits/32), G]``."""
    zp = _as_codes(zero_point, "zero_point")
    bits = _check_bits(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi):
        raise ValueError(f"zero_point: expected values in [{lo}, {hi}] for {bits} bits, got values in "
                         f"[{int(zp.min())}, {int(zp.max())}]")
    return _C.pack_rows(zp.t().contiguous(), bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_points`: int8 ``[out_features, G]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed: expected a 2-D int32 tensor, got {getattr(packed, 'dtype', type(packed))}")
    bits = _check_bits(bits)
    words = (int(out_features) * bits + 31) // 32
    if int(out_features) < 0 or packed.shape[0] != words:
        raise ValueError(f"out_features: expected a value whose packing at {bits} bits takes {packed.shape[0]} "
                         f"int32 rows (packed has that many), got {out_features} which takes {words}")
    return _C.unpack_rows(packed.t().contiguous(), bits, int(out_features)).t().contiguous()


class HessianAccumulator:
    """Routing-weighted Hessians of many experts: ``H[e] = sum_i c_i x_i x_i^T`` over rows routed to ``e``.

    State lives in this object (tensors on ``device``); the math runs in the C++ core (CPU, float32 or
    float64 accumulation) or the CUDA kernels (float32). Also tracks the token count and the routing-weight
    mass of each expert. Two accumulators of the same shape merge (e.g. after a multi-process reduce).

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
        _C.accumulate_hessian(self._hessians, self.counts, self.mass, x,
                              ids.to(torch.int32).contiguous(), w, self._PRECISIONS[self.precision],
                              symmetrize=not on_cuda)
        self._unmirrored = self._unmirrored or on_cuda

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

    def hessian(self, expert: int, normalize: bool = True) -> torch.Tensor:
        """``H[expert]``, divided by its weight mass when ``normalize`` (zeros for an expert with no rows)."""
        h = self.hessians[expert]
        m = float(self.mass[expert])
        return h / m if normalize and m > 0 else h.clone()


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: Optional[int] = 128,
                  symmetric: bool = False, act_order: bool = False, damp: float = 0.01, block_size: int = 128, *,
                  scale_search: str = "minmax", mse_grid: int = 100, mse_min_shrink: float = 0.2,
                  mse_norm: float = 2.4, scale_dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
    """GPTQ of ``w`` ``[out, in]`` on the Hessian ``h`` ``[in, in]`` (float32 or float64).

    Lazy block updates of ``block_size`` columns, damping ``damp * mean(diag h)`` escalated (and reported in
    ``.info``) when the Cholesky factorisation fails, dead columns (zero diagonal) zeroed, optional act-order
    with static groups (no g_idx). Returns codes, scales, zero points, the dequantized weight and the proxy
    loss ``tr((W - Q) h (W - Q)^T)``. Deterministic. Solved by the C++ core on the CPU (CUDA inputs are
    copied to the CPU and the results moved back). Equivalent to :func:`moequant.ref.gptq_quantize_ref`.
    """
    _check_float_matrix(w, "w")
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"h: expected a 2-D float32/float64 tensor [{w.shape[1]}, {w.shape[1]}], got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if not (isinstance(damp, (int, float)) and damp > 0 and damp == damp and damp != float("inf")):
        raise ValueError(f"damp: expected a finite number > 0 (a fraction of mean(diag h), e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an integer >= 1, got {block_size!r}")
    sd = _default_scale_dtype(w, scale_dtype)
    spec = make_spec(bits, group_size, symmetric, in_features=w.shape[1], scale_search=scale_search,
                     mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm, scale_dtype=sd)
    device = w.device
    hh = h if h.dtype == torch.float64 else h.float()
    codes, scale, zero, deq, info = _C.gptq(w.detach().float().cpu().contiguous(), hh.detach().cpu().contiguous(),
                                            spec, bool(act_order), float(damp), int(block_size))
    raw = tuple(t.to(device) for t in (codes, scale, zero, deq))
    return _wrap(raw, spec, sd, w.shape[1], loss=float(info["loss"]), info=dict(info))


def gptq_quantize_batched(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: Optional[int] = 128,
                          symmetric: bool = False, act_order: bool = False, damp: float = 0.01,
                          block_size: int = 128, *, scale_search: str = "minmax", mse_grid: int = 100,
                          mse_min_shrink: float = 0.2, mse_norm: float = 2.4,
                          scale_dtype: Optional[torch.dtype] = None, compute_loss: bool = True,
                          overwrite_h: bool = False) -> list:
    """GPTQ of E experts sharing one shape: ``w`` ``[E, out, in]``, ``h`` ``[E, in, in]`` -> E QuantizedTensors.

    CUDA tensors: one batched solve on the GPU (``kernels/src/gptq_batched.cu``): the semantics of
    :func:`gptq_quantize` per expert (dead columns, per-expert damping escalation, act-order static groups, lazy
    blocks), fp32 with a different rounding order, so results are not bit-identical to the CPU solver (the proxy
    loss agrees to well within 1%). CUDA limits: ``block_size <= 128``; ``scale_search="mse"`` needs
    ``act_order=True``. ``h`` must be float32 on CUDA; it is copied unless ``overwrite_h`` (then it is used as
    scratch and destroyed). ``compute_loss=False`` skips the loss (one ``out x in^2`` SYRK per expert) and leaves
    ``.loss`` None. CPU tensors: loops over :func:`gptq_quantize`.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.is_floating_point():
        raise ValueError(f"w: expected a 3-D floating-point tensor [experts, out_features, in_features], got "
                         f"{getattr(w, 'dtype', type(w))} {tuple(getattr(w, 'shape', ()))}")
    E, _, cols = w.shape
    if not isinstance(h, torch.Tensor) or h.dim() != 3 or not h.is_floating_point() or tuple(h.shape) != (E, cols,
                                                                                                           cols):
        raise ValueError(f"h: expected a float tensor of shape [{E}, {cols}, {cols}], got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if h.device != w.device:
        raise ValueError(f"h: expected a tensor on w's device {w.device}, got {h.device}")
    if not w.is_cuda:
        return [gptq_quantize(w[e], h[e], bits, group_size, symmetric, act_order, damp, block_size,
                              scale_search=scale_search, mse_grid=mse_grid, mse_min_shrink=mse_min_shrink,
                              mse_norm=mse_norm, scale_dtype=scale_dtype) for e in range(E)]
    if not (isinstance(damp, (int, float)) and damp > 0 and damp == damp and damp != float("inf")):
        raise ValueError(f"damp: expected a finite number > 0 (a fraction of mean(diag h), e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an integer >= 1, got {block_size!r}")
    if h.dtype != torch.float32:
        raise ValueError(f"h: expected float32 on CUDA (the batched solver is fp32), got {h.dtype}")
    sd = _default_scale_dtype(w, scale_dtype)
    spec = make_spec(bits, group_size, symmetric, in_features=cols, scale_search=scale_search,
                     mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm, scale_dtype=sd)
    hh = h if overwrite_h else h.contiguous()
    if overwrite_h and not h.is_contiguous():
        raise ValueError("h: overwrite_h=True needs a contiguous tensor")
    codes, scale, zero, deq, losses, esc = _C.gptq_batched(w.detach().float().contiguous(), hh.detach(), spec,
                                                            bool(act_order), float(damp), int(block_size),
                                                            bool(compute_loss), bool(overwrite_h))
    _check_fp16_scales(scale, sd)
    loss_list = losses.tolist() if compute_loss else [None] * E
    esc_list = esc.tolist()
    out = []
    for e in range(E):
        info = {"escalations": int(esc_list[e]), "damp": float(damp) * 10.0 ** int(esc_list[e])}
        if compute_loss:
            info["loss"] = float(loss_list[e])
        out.append(_wrap((codes[e], scale[e], zero[e], deq[e]), spec, sd, cols, loss=loss_list[e], info=info,
                         check_scales=False))
    return out


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dimension: ``x @ (H_m kron H_{2^k}) / sqrt(n)``.

    ``n = x.shape[-1]`` must be a power of two or 12, 20, 28 or 40 times one, ``n <= 32768`` (7168 = 28 * 256).
    float32 / bfloat16 / float16 (computed in fp32, rounded once), same dtype and device as ``x`` (CPU core or
    CUDA kernel). Equals :func:`moequant.ref.hadamard_ref` to fp32 rounding.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    return _C.hadamard(x.contiguous())


def refine_rounding(qt: QuantizedTensor, w: torch.Tensor, h: torch.Tensor, passes: int = 1,
                    outlier_quantile: float = 0.99) -> QuantizedTensor:
    """Greedy rounding correction of ``qt`` (from :func:`quantize_rtn` or :func:`gptq_quantize` of ``w``).

    With the group parameters of ``qt`` fixed, flips single codes by +-1 (within range), best first, while the
    proxy loss ``(w_r - q_r) h (w_r - q_r)^T`` of each row drops; the ``floor((1 - outlier_quantile) * group)``
    largest ``|w|`` of each group keep their codes; ``passes`` bounds the flips per row to ``passes`` times its
    free columns. The loss never increases (a row that would not improve keeps its codes). Returns a new
    QuantizedTensor (same scales / zero points) whose ``loss`` is the loss after and whose ``info`` gains
    ``rounding`` = {loss_before, loss_after, flips, excluded, rows_reverted}. C++ core (``moequant/rounding.h``)
    on the CPU; results are moved back to ``qt``'s device. Deterministic.
    """
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"qt: expected a QuantizedTensor, got {type(qt).__name__}")
    _check_float_matrix(w, "w")
    if tuple(w.shape) != tuple(qt.codes.shape):
        raise ValueError(f"w: expected the shape of qt.codes {tuple(qt.codes.shape)}, got {tuple(w.shape)}")
    cols = w.shape[1]
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point() or tuple(h.shape) != (cols, cols):
        raise ValueError(f"h: expected a float32/float64 tensor [{cols}, {cols}], got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        raise ValueError(f"passes: expected an integer >= 0, got {passes!r}")
    if not (isinstance(outlier_quantile, (int, float)) and 0 < outlier_quantile <= 1):
        raise ValueError(f"outlier_quantile: expected a number in (0, 1], got {outlier_quantile!r}")
    spec = make_spec(qt.bits, qt.group_size, qt.symmetric, in_features=cols)
    hh = h.detach().cpu().contiguous()
    hh = hh if hh.dtype == torch.float64 else hh.float()
    zp = None if qt.symmetric else qt.zero_point.to(torch.int32).cpu().contiguous()
    codes, deq, info = _C.greedy_rounding(w.detach().float().cpu().contiguous(), hh,
                                          qt.codes.to(torch.int8).cpu().contiguous(),
                                          qt.scale.float().cpu().contiguous(), zp, spec, int(passes),
                                          float(outlier_quantile))
    device = qt.codes.device
    return dataclasses.replace(qt, codes=codes.to(device), dequantized=deq.to(device),
                               loss=float(info["loss_after"]), info={**qt.info, "rounding": dict(info)})
