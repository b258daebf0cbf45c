"""Routed tokens of one experts call, grouped by expert (:class:`RoutedBatch`, :func:`route_tokens`), and the
per-expert math on them (:func:`expert_glu`, :func:`expert_intermediate`, :func:`expert_output`): pure functions
on tensors, used by the capture hooks (:mod:`moequant.calibration.capture`), AWQ and ``moequant eval``'s
activation simulation (:func:`experts_forward`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.base import TRANSPOSED, MoEFamily, gate_up_slices, intermediate_size, split_expert

__all__ = ["RoutedBatch", "route_tokens", "expert_glu", "expert_intermediate", "grouped_output_into", "expert_output",
           "experts_forward"]


@dataclass
class RoutedBatch:
    """Routed (token, slot) pairs of one experts call, grouped by expert with one stable sort.

    N = number of routed pairs after dropping pads (index outside ``[0, E)``, e.g. the value E) and masked tokens.

    Attributes:
        x: ``[N, H]`` expert inputs in the dtype of ``hidden_states`` (bf16 for a bf16 layer: the CUDA Hessian
            kernels read it as it is); rows of expert e are ``offsets[e]:offsets[e+1]``.
        expert_ids: ``[N]`` int32, non-decreasing.
        weights: ``[N]`` float32 routing weight the module multiplies that row's output by.
        token_index: ``[N]`` int64 row of the flattened ``hidden_states`` each routed row came from.
        offsets: ``[E+1]`` int64 prefix sums of per-expert counts (on the input's device).
        h: ``[N, I]`` float32 down_proj inputs ``glu(gate, up)`` (None until computed).
        num_tokens: T, rows of the flattened ``hidden_states``.
    """

    x: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    token_index: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int
    h: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> torch.Tensor:
        """``[E]`` int64 routed rows per expert."""
        return self.offsets.diff()


def route_tokens(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 num_experts: int, token_mask: torch.Tensor | None = None) -> RoutedBatch:
    """Group the routed rows of one experts call by expert (one stable argsort; no per-token loop).

    Args:
        hidden_states: ``[T, H]`` (any leading dims are flattened).
        top_k_index: ``[T, k]`` expert ids; values outside ``[0, E)`` are "no expert" pads and dropped.
        top_k_weights: ``[T, k]`` routing weights, or ``[T, E]`` dense scores (gathered at ``top_k_index``).
        num_experts: E.
        token_mask: optional bool ``[T]`` (any shape with T elements); False rows are dropped (padding).
    """
    H = hidden_states.shape[-1]
    hs = hidden_states.reshape(-1, H)
    T = hs.shape[0]
    idx = top_k_index.reshape(T, -1).long()
    k = idx.shape[1]
    w = top_k_weights.reshape(T, -1)
    if w.shape[1] != k:  # dense [T, E] scores (older GPT-OSS router): weight of the chosen slots
        w = w.gather(1, idx.clamp(0, w.shape[1] - 1))
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    if token_mask is not None:
        valid &= token_mask.reshape(-1).to(device=idx.device, dtype=torch.bool).repeat_interleave(k)
    # the kept (token, slot) pairs' flat positions: on a GPU the one host synchronisation (three boolean-mask
    # selections and bincount's maximum were four per call)
    sel = valid.nonzero().squeeze(1)
    ids = flat.index_select(0, sel)
    order = torch.argsort(ids, stable=True)
    ids, sel = ids[order], sel[order]
    tok = sel // k  # pair i belongs to token i // k
    counts = torch.zeros(num_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, ids, torch.ones_like(ids))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return RoutedBatch(
        x=hs[tok], expert_ids=ids.to(torch.int32), weights=w.reshape(-1).index_select(0, sel).float(),
        token_index=tok, offsets=offsets, num_tokens=T)


def _expert_ranges(batch: RoutedBatch) -> list[tuple[int, int, int]]:
    off = batch.offsets.tolist()
    return [(e, off[e], off[e + 1]) for e in range(batch.num_experts) if off[e + 1] > off[e]]


def expert_glu(experts: nn.Module, family: MoEFamily, t, x: torch.Tensor) -> torch.Tensor:
    """``glu(x gate^T + b_gate, x up^T + b_up)`` in fp32 for rows ``x`` of one expert ``t`` (``split_expert``)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and t.gate.dtype == x.dtype == t.up.dtype:
        # the same products (a 16-bit float times a 16-bit float is exact in fp32), summed in fp32 by the tensor
        # cores: without two fp32 copies of the expert's weights per call and in a tenth of the fp32 GEMM's time
        gate = torch.mm(x, t.gate.t(), out_dtype=torch.float32)
        up = torch.mm(x, t.up.t(), out_dtype=torch.float32)
    else:
        x = x.float()
        gate, up = x @ t.gate.float().t(), x @ t.up.float().t()
    if t.gate_bias is not None:
        gate, up = gate + t.gate_bias.float(), up + t.up_bias.float()
    return family.glu(experts, gate, up)


# The padded [experts, rows, 2I] float32 products of one batched GEMM of expert_intermediate (its transient memory,
# with the padded bf16 inputs and the gathered rows about 2.5x this). 128 MiB cut a Qwen3-30B-A3B call (16k tokens,
# 128 experts) into ~18 runs of a dozen launches each, and each bmm of a new shape cost ~0.4 ms of host time: the
# Hessian phase was host-bound (GPU idle 71 % of it, run 64's trace). 512 MiB: 2-3 runs a call there, one for a
# DeepSeek-V3 group of 28 experts (~0.3 GB), whose Hessian phase is well below the layer's peak (the solve's).
BATCHED_BYTES = 512 * 2**20


@torch.no_grad()
def expert_intermediate(experts: nn.Module, family: MoEFamily, batch: RoutedBatch, batched: bool | None = None,
                        chunk_bytes: int = BATCHED_BYTES) -> torch.Tensor:
    """``h [N, I]`` float32: the down_proj input of every routed row, ``glu(gate, up)`` from the fused weights with
    float32 accumulation and output, exactly as the module does (biases included).

    ``batched`` (None: on a GPU with 16-bit rows and weights): the gate/up products of runs of consecutive experts
    in one batched GEMM each (:func:`_intermediate_batched`: the experts' rows padded to the run's largest count,
    at most ``chunk_bytes`` of float32 products per GEMM), instead of two GEMMs and a GLU per expert: a
    Qwen3-30B-A3B layer's 16 calibration calls x 128 experts were ~20,000 kernel launches, host-bound (238 ms of
    CPU time for 85 ms of GEMMs on an H100). The products are the same (a 16-bit float times a 16-bit float is
    exact in float32); only the summation order may differ. Else per expert (a loop over experts, not tokens).
    (Not by grouped GEMMs: torch's ``grouped_mm`` refuses a float32 output for bf16 inputs, and its bf16 outputs
    would round gate / up before the GLU.)
    """
    h = torch.zeros(batch.x.shape[0], intermediate_size(experts, family), dtype=torch.float32,
                    device=batch.x.device)
    if batched is None:
        x, gu = batch.x, experts.gate_up_proj
        batched = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and gu.dtype == x.dtype \
            and experts.down_proj.dtype == x.dtype
    if batched:
        _intermediate_batched(experts, family, batch, h, chunk_bytes)
        return h
    for e, a, b in _expert_ranges(batch):
        h[a:b] = expert_glu(experts, family, split_expert(experts, family, e), batch.x[a:b])
    return h


def _expert_runs(off: list, row_bytes: int, chunk_bytes: int):
    """``(first, stop, rows)``: runs of consecutive experts (``off``: the routed-row offsets) whose padded products
    (``(stop - first) x rows x row_bytes``, ``rows`` the run's largest count) fit ``chunk_bytes``; experts without
    rows at a run's start are skipped; an expert alone over the limit is a run of its own."""
    e, num = 0, len(off) - 1
    while e < num:
        while e < num and off[e + 1] == off[e]:
            e += 1
        if e == num:
            return
        first, rows = e, 0
        while e < num:
            m = max(rows, off[e + 1] - off[e])
            if e > first and (e + 1 - first) * m * row_bytes > chunk_bytes:
                break
            rows, e = m, e + 1
        yield first, e, rows


def _intermediate_batched(experts: nn.Module, family: MoEFamily, batch: RoutedBatch, h: torch.Tensor,
                          chunk_bytes: int) -> None:
    """:func:`expert_intermediate`'s batched path, into ``h``: per run of experts (:func:`_expert_runs`), the rows
    scattered into a padded ``[experts, rows, H]`` block, one ``bmm`` with the run's ``[H, 2I]`` weights
    (views of the fused tensor: no copy) and float32 output, the real rows gathered back, bias and GLU on them."""
    gu = experts.gate_up_proj
    w = gu if family.layout == TRANSPOSED else gu.transpose(1, 2)  # [E, H, 2I]
    two_i = int(w.shape[2])
    sel_g, sel_u = gate_up_slices(family, two_i // 2)
    bias = experts.gate_up_proj_bias if family.has_bias else None
    x = batch.x
    half = x.dtype != torch.float32
    off = batch.offsets.tolist()
    for first, stop, rows in _expert_runs(off, two_i * 4, chunk_bytes):
        a, b = off[first], off[stop]
        ids = batch.expert_ids[a:b].long()
        # each row's place in the run's padded block: (its expert - first) * rows + its place in its expert's rows
        flat = torch.arange(a, b, device=x.device) - batch.offsets[ids] + (ids - first) * rows
        # the padding rows are left unset: each product row reads only its own block row, and they are not read back
        block = x.new_empty(((stop - first) * rows, x.shape[1])).index_copy_(0, flat, x[a:b])
        block = block.view(stop - first, rows, x.shape[1])
        prod = torch.bmm(block, w[first:stop], out_dtype=torch.float32) if half else torch.bmm(block, w[first:stop])
        prod = prod.view(-1, two_i).index_select(0, flat)  # [rows of the run, 2I]: row gathers, not 2-D indexing
        if bias is not None:
            prod = prod + bias[ids].float()
        h[a:b] = family.glu(experts, prod[:, sel_g], prod[:, sel_u])


# Routed rows per grouped GEMM: bounds the [rows, 2I] product (0.25 GB in bf16 for DeepSeek-V3's 2I = 4096)
GROUPED_ROWS = 32768


@torch.no_grad()
def grouped_output_into(experts: nn.Module, family: MoEFamily, hidden_states: torch.Tensor,
                        top_k_index: torch.Tensor, top_k_weights: torch.Tensor, acc: torch.Tensor,
                        chunk_rows: int = GROUPED_ROWS) -> bool:
    """Adds the output of a fused experts module on one call (``hidden_states [T, H]``, ``top_k_index``,
    ``top_k_weights``; ids outside ``[0, E)`` are pads) into ``acc`` (``[T, H]`` float32) from the routed rows
    only, by grouped GEMMs as transformers' ``grouped_mm`` experts forward computes them (gate/up and down products
    in bf16 with fp32 accumulation, the GLU in bf16, times the routing weight), summed per token in float32. For
    the expert streaming engine's groups, whose experts see a fraction of a call's rows: the module's own forward
    sorts, gathers and masks every (token, slot) pair of the call for each group. Returns False (``acc``
    untouched) where it does not apply: rows or weights not bfloat16 (the CPU pipeline computes in float32), no
    ``grouped_mm``, a dimension that is not a multiple of 8 (the kernel's 16-byte alignment), experts without a
    gate or with a post-expert norm: then call the module. Each chunk of ``chunk_rows`` routed rows is one grouped
    GEMM per projection, the experts' row ranges clipped to the chunk on the device (no host synchronisation, no
    launch per expert)."""
    gu, dn = experts.gate_up_proj, experts.down_proj
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    f = getattr(torch.nn.functional, "grouped_mm", None) if x.dtype == gu.dtype == dn.dtype == torch.bfloat16 \
        else None  # grouped_mm: torch >= 2.10
    if f is None or not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        return False
    t = family.layout == TRANSPOSED
    b_gu = gu if t else gu.transpose(-2, -1)  # [E, H, 2I]
    b_dn = dn if t else dn.transpose(-2, -1)  # [E, I, H]
    if any(d % 8 for d in (*b_gu.shape[1:], *b_dn.shape[1:])) or b_gu.shape[1] != x.shape[1]:
        return False
    batch = route_tokens(x, top_k_index, top_k_weights, int(gu.shape[0]))
    n, inter = batch.x.shape[0], b_gu.shape[2] // 2
    sel_g, sel_u = gate_up_slices(family, inter)
    ends = batch.offsets[1:]
    bias = family.has_bias
    for a in range(0, n, chunk_rows):
        b = min(a + chunk_rows, n)
        offs = (ends.clamp(a, b) - a).to(torch.int32)
        ids = batch.expert_ids[a:b].long()
        up = f(batch.x[a:b], b_gu, offs=offs)  # bf16 [rows, 2I], fp32 accumulation
        if bias:
            up = up + experts.gate_up_proj_bias[ids]
        h = family.glu(experts, up[:, sel_g], up[:, sel_u])
        y = f(h.to(torch.bfloat16), b_dn, offs=offs)  # bf16 [rows, H]
        if bias:
            y = y + experts.down_proj_bias[ids]
        acc.index_add_(0, batch.token_index[a:b], y.float() * batch.weights[a:b, None])
    return True


@torch.no_grad()
def expert_output(experts: nn.Module, family: MoEFamily, batch: RoutedBatch) -> torch.Tensor:
    """Recompute the experts module output ``[T, H]`` float32 from a captured batch (``batch.h`` required):
    ``out[t] += c * (h @ down.T + down_bias)`` over routed rows. For tests and sanity checks."""
    if batch.h is None:
        raise ValueError("batch.h is None: capture with compute_h=True")
    H = batch.x.shape[1]
    out = torch.zeros(batch.num_tokens, H, dtype=torch.float32, device=batch.x.device)
    for e, a, b in _expert_ranges(batch):
        t = split_expert(experts, family, e)
        y = batch.h[a:b] @ t.down.float().t()
        if t.down_bias is not None:
            y = y + t.down_bias.float()
        out.index_add_(0, batch.token_index[a:b], y * batch.weights[a:b, None])
    return out


InputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def experts_forward(experts: nn.Module, family: MoEFamily, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, gate_up_input: InputFn | None = None,
                    down_input: InputFn | None = None) -> torch.Tensor:
    """The output of a fused experts module (same shape and dtype as ``hidden_states``), computed per expert in
    float32 from its weights (biases included) with the experts' inputs passed through ``gate_up_input(ids, x)``
    (every routed row ``[N, H]``, grouped by expert, and its expert id ``[N]`` int32, non-decreasing) and
    ``down_input(ids, h)`` (``glu(gate, up)`` of every routed row, ``[N, I]``) first: e.g. the fake quantization a
    runtime applies to them, one call per experts call. Without the two functions it is the module's own output (up
    to the rounding of the float32 computation)."""
    num = int(experts.gate_up_proj.shape[0])
    batch = route_tokens(hidden_states, top_k_index, top_k_weights, num)
    out = torch.zeros(batch.num_tokens, hidden_states.shape[-1], dtype=torch.float32, device=hidden_states.device)
    ranges = _expert_ranges(batch)
    x = gate_up_input(batch.expert_ids, batch.x) if gate_up_input is not None else batch.x
    h = torch.empty(x.shape[0], intermediate_size(experts, family), dtype=torch.float32, device=x.device)
    views = {e: split_expert(experts, family, e) for e, _, _ in ranges}
    for e, a, b in ranges:
        h[a:b] = expert_glu(experts, family, views[e], x[a:b])
    h = down_input(batch.expert_ids, h) if down_input is not None else h
    for e, a, b in ranges:
        t = views[e]
        y = h[a:b] @ t.down.float().t()
        if t.down_bias is not None:
            y = y + t.down_bias.float()
        out.index_add_(0, batch.token_index[a:b], y * batch.weights[a:b, None])
    return out.reshape(hidden_states.shape).to(hidden_states.dtype)
