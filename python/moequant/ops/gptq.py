"""GPTQ on a Hessian: one matrix (C++ core, :func:`gptq_quantize`) or many same-shape experts at once (CUDA kernel,
:func:`gptq_quantize_batched`). Twin: :func:`moequant.ref.gptq_quantize_ref`."""
from __future__ import annotations

from typing import Optional

import torch

from moequant import _C

from .quant import QuantizedTensor, check_float_matrix, check_fp16_scales, from_core, make_spec, scale_dtype_for

__all__ = ["gptq_quantize", "gptq_quantize_batched"]


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
    check_float_matrix(w, "w")
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"h: expected a 2-D float32/float64 tensor [{w.shape[1]}, {w.shape[1]}], got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if not (isinstance(damp, (int, float)) and damp > 0 and damp == damp and damp != float("inf")):
        raise ValueError(f"damp: expected a finite number > 0 (a fraction of mean(diag h), e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an integer >= 1, got {block_size!r}")
    sd = scale_dtype_for(w, scale_dtype)
    spec = make_spec(bits, group_size, symmetric, in_features=w.shape[1], scale_search=scale_search,
                     mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm, scale_dtype=sd)
    device = w.device
    hh = h if h.dtype == torch.float64 else h.float()
    codes, scale, zero, deq, info = _C.gptq(w.detach().float().cpu().contiguous(), hh.detach().cpu().contiguous(),
                                            spec, bool(act_order), float(damp), int(block_size))
    raw = tuple(t.to(device) for t in (codes, scale, zero, deq))
    return from_core(raw, spec, sd, w.shape[1], loss=float(info["loss"]), info=dict(info))


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
    sd = scale_dtype_for(w, scale_dtype)
    spec = make_spec(bits, group_size, symmetric, in_features=cols, scale_search=scale_search,
                     mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm, scale_dtype=sd)
    hh = h if overwrite_h else h.contiguous()
    if overwrite_h and not h.is_contiguous():
        raise ValueError("h: overwrite_h=True needs a contiguous tensor")
    codes, scale, zero, deq, losses, esc = _C.gptq_batched(w.detach().float().contiguous(), hh.detach(), spec,
                                                            bool(act_order), float(damp), int(block_size),
                                                            bool(compute_loss), bool(overwrite_h))
    check_fp16_scales(scale, sd)
    loss_list = losses.tolist() if compute_loss else [None] * E
    esc_list = esc.tolist()
    out = []
    for e in range(E):
        info = {"escalations": int(esc_list[e]), "damp": float(damp) * 10.0 ** int(esc_list[e])}
        if compute_loss:
            info["loss"] = float(loss_list[e])
        out.append(from_core((codes[e], scale[e], zero[e], deq[e]), spec, sd, cols, loss=loss_list[e], info=info,
                         check_scales=False))
    return out

