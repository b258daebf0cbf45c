"""GPTQ on a Hessian: one matrix (C++ core, :func:`gptq_quantize`) or many same-shape experts at once (CUDA kernel,
:func:`gptq_quantize_batched`). Twin: :func:`moequant.ref.gptq_quantize_ref`.

Every weight format of :mod:`moequant.ops.formats` (FP8, NVFP4, MX, FP6, ints): :func:`gptq_quantize_format` (C++ core)
and :func:`gptq_quantize_format_batched` (the batched CUDA kernel, only when called with CUDA tensors), returning
:class:`moequant.ops.FormatQuantized`. Twin: :func:`moequant.ref.gptq_quantize_format_ref`."""
from __future__ import annotations

from typing import Optional

import torch

from moequant import _C

from .formats import FormatQuantized
from .quant import QuantizedTensor, check_float_matrix, check_fp16_scales, from_core, make_spec, scale_dtype_for

__all__ = ["gptq_quantize", "gptq_quantize_batched", "gptq_quantize_format", "gptq_quantize_format_batched"]


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


def _check_solver_args(damp, block_size) -> None:
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and damp > 0 and damp == damp
            and damp != float("inf")):
        raise ValueError(f"damp: expected a finite number > 0 (a fraction of mean(diag h), e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an integer >= 1, got {block_size!r}")


def _global_scales(global_scale, fmt, n: int, what: str) -> Optional[torch.Tensor]:
    """The caller's global scale(s) as a float32 tensor of n values (None stays None); checked against fmt."""
    if global_scale is None:
        return None
    if not fmt.global_scale:
        raise ValueError(f"global_scale: expected None for a format without a global scale, got {global_scale!r}")
    if isinstance(global_scale, bool) or not isinstance(global_scale, (int, float, torch.Tensor)):
        raise ValueError(f"global_scale: expected a number or a float tensor, got {type(global_scale).__name__}")
    g = torch.as_tensor(global_scale, dtype=torch.float32).detach().reshape(-1)
    if g.numel() != n:
        raise ValueError(f"global_scale: expected {what}, got {g.numel()}")
    return g


def _check_format(fmt) -> None:
    if not isinstance(fmt, _C.Format):
        raise ValueError(f"fmt: expected a moequant.ops.Format (e.g. Format.nvfp4()), got {type(fmt).__name__}")


def gptq_quantize_format(w: torch.Tensor, h: torch.Tensor, fmt, *, act_order: bool = False, damp: float = 0.01,
                         block_size: int = 128, global_scale=None) -> FormatQuantized:
    """GPTQ of ``w`` ``[out, in]`` (float32 / bfloat16 / float16, read as float32) in the weight format ``fmt``
    (:class:`moequant.ops.Format`: FP8 per tensor / channel / block, NVFP4, MXFP4 / MXFP6 / MXFP8, FP6, ints) on the
    Hessian ``h`` ``[in, in]`` (float32 or float64).

    The column loop rounds each column to the format's element grid with its tile's scale; the scales are static:
    exactly :func:`moequant.ops.format_quantize`'s of ``w`` with its dead columns (``diag h == 0``) zeroed, the NVFP4
    global scale from the whole matrix first -- or ``global_scale`` (a float or a one-element tensor), e.g. the gate's
    for its up projection when the two are solved separately (solving gate and up stacked as one ``[2I, H]`` matrix
    shares it by itself). Damping, escalation, dead columns and act-order are :func:`gptq_quantize`'s; the result does
    not depend on ``block_size``. Int formats that :func:`gptq_quantize` can express (per channel, groups dividing
    ``in``) are solved by it (min/max scales): same codes, scales and loss.

    Returns a :class:`moequant.ops.FormatQuantized` (codes, scales, scale codes, zero points, global scale, dequantized
    weight -- the layout of :func:`moequant.ops.format_quantize`) with ``.loss`` = ``tr((W - Q) h (W - Q)^T)`` and
    ``.info`` (loss, damp, damp_value, escalations, dead_columns). Runs on the CPU (the C++ core); CUDA inputs are
    copied to the CPU and the results moved back (:func:`gptq_quantize_format_batched` is the GPU solver). Equivalent
    to :func:`moequant.ref.gptq_quantize_format_ref` (bit for bit given the core's factor, ``_C.gptq_factor``).
    """
    check_float_matrix(w, "w")
    _check_format(fmt)
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"h: expected a 2-D float32/float64 tensor [{w.shape[1]}, {w.shape[1]}], got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    _check_solver_args(damp, block_size)
    g = _global_scales(global_scale, fmt, 1, "one value")
    if g is not None:
        g = g.cpu().contiguous()
    device = w.device
    hh = h if h.dtype == torch.float64 else h.float()
    codes, scales, scale_codes, zeros, gs, deq, info = _C.gptq_format(
        w.detach().float().cpu().contiguous(), hh.detach().cpu().contiguous(), fmt, g, bool(act_order), float(damp),
        int(block_size))
    t = [x.to(device) for x in (codes, scales, scale_codes, zeros, gs, deq)]
    return FormatQuantized(*t, format=fmt, loss=float(info["loss"]), info=dict(info))


def gptq_quantize_format_batched(w: torch.Tensor, h: torch.Tensor, fmt, *, act_order: bool = False,
                                 damp: float = 0.01, block_size: int = 128, global_scale=None,
                                 compute_loss: bool = True, overwrite_h: bool = False) -> list:
    """:func:`gptq_quantize_format` of E experts sharing one shape: ``w`` ``[E, out, in]``, ``h`` ``[E, in, in]`` -> E
    :class:`FormatQuantized`. ``global_scale``: None (each expert's own), or one value per expert (``[E]``).

    CUDA tensors: the batched GPU solver (``kernels/src/gptq_format.cu``; ``h`` float32, copied unless
    ``overwrite_h``; ``block_size <= 128``). Its scales, scale codes, zero points and global scales are the CPU's bit
    for bit; the codes are GPTQ's with the GPU's rounding (fp32 factorisation and SGEMMs), so not bit-identical to the
    CPU solver (tests/python/test_fp_gptq_cuda.py states the policy). The pipeline's GPTQ solver routes CUDA matrices
    here (``GPTQSolver.float_batched``); :func:`gptq_quantize_format` is the CPU core.
    ``compute_loss=False`` leaves ``.loss`` None. CPU tensors: loops over :func:`gptq_quantize_format`.
    """
    _check_format(fmt)
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
    _check_solver_args(damp, block_size)
    g = _global_scales(global_scale, fmt, E, f"one value per expert ({E})")
    if not w.is_cuda:
        return [gptq_quantize_format(w[e], h[e], fmt, act_order=act_order, damp=damp, block_size=block_size,
                                     global_scale=None if g is None else g[e:e + 1]) for e in range(E)]
    if h.dtype != torch.float32:
        raise ValueError(f"h: expected float32 on CUDA (the batched solver is fp32), got {h.dtype}")
    if overwrite_h and not h.is_contiguous():
        raise ValueError("h: overwrite_h=True needs a contiguous tensor")
    hh = h if overwrite_h else h.contiguous()
    gd = None if g is None else g.to(w.device).contiguous()
    codes, scales, scale_codes, zeros, gs, deq, losses, esc = _C.gptq_format_batched(
        w.detach().float().contiguous(), hh.detach(), fmt, gd, bool(act_order), float(damp), int(block_size),
        bool(compute_loss), bool(overwrite_h))
    loss_list = losses.tolist() if compute_loss else [None] * E
    esc_list = esc.tolist()
    out = []
    for e in range(E):
        info = {"escalations": int(esc_list[e]), "damp": float(damp) * 10.0 ** int(esc_list[e])}
        if compute_loss:
            info["loss"] = float(loss_list[e])
        out.append(FormatQuantized(codes[e], scales[e], scale_codes[e], zeros[e], gs[e:e + 1], deq[e], format=fmt,
                                   loss=loss_list[e], info=info))
    return out
