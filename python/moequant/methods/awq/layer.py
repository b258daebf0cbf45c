"""AWQ over one loaded decoder layer (orchestration; the math is :mod:`moequant.methods.awq.search`, stages 2-3
:mod:`moequant.methods.awq.pairs`, the shared state :class:`~moequant.methods.awq.context.AWQContext`).

:func:`apply_awq` runs before the layer's Hessian capture, so the smoothed and clipped weights then go through
the pipeline's normal GPTQ/RTN. It works on the layer's recorded inputs (the pipeline's ``hidden`` batches and
``kwargs``; whole batches up to ``awq.max_tokens`` tokens) in three stages, re-running the layer between them:

1. **norm groups**: for every norm that is a direct child of the layer (``input_layernorm``,
   ``post_attention_layernorm``), the modules that read its output are found by data flow (their input equals the
   norm's output) -- q/k/v (MLA: q_a/kv_a), or router + fused routed experts + shared expert (+ its gate). The
   loss is the output error of their deepest common parent (``self_attn``, the MoE block ``mlp``). The inverse
   scale goes into the norm; *every* consumer (router and gates included, which stay high precision) gets
   ``W diag(s)``, so routing is unchanged; with ``awq.exact_routing`` the scales of such a group are powers of
   two, which makes the fold exact in any dtype.
2. **Linear -> Linear**: ``v_proj -> o_proj`` (GQA: one scale per KV channel shared by the query heads of its
   group), ``up_proj -> down_proj`` of dense MLPs and shared experts, and each routed expert's up -> down (loss on
   that expert's down output over its routed tokens; experts below ``awq.min_tokens`` tokens are left alone;
   skipped for GLUs that are not ``act(gate) * up``, e.g. GPT-OSS's clamped SwiGLU).
3. **clipping** of every quantized matrix except q/k projections (routed experts on their own routed tokens).

After stages 1-2 the layer's output is checked against the unsmoothed layer; a mismatch (a structure the fold
does not understand) raises ValueError. Returns the changed high-precision tensors by checkpoint name (norm
weights, router/gate weights, biases, and any changed matrix that the recipe does not quantize), rounded to the
checkpoint dtype in place so the pipeline continues on exactly what is exported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ...models.base import TRANSPOSED, MoEFamily
from . import search as awq
from .context import AWQContext
from .pairs import clip_layer, export_experts, smooth_pairs

logger = logging.getLogger(__name__)

__all__ = ["AWQLayerResult", "apply_awq"]

@dataclass
class AWQLayerResult:
    tensors: dict = field(default_factory=dict)   # checkpoint tensor name -> changed high-precision tensor
    groups: list = field(default_factory=list)    # one dict per smoothed group (name, ratio, losses) or skip


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


# ------------------------------------------------------------------------------------------------ stage 1
def _norm_groups(ctx: AWQContext) -> list:
    """[(norm name, norm module, [(consumer name, module)])] found by data flow on the first selected batch."""
    norms = [(n, m) for n, m in ctx.layer.named_children()
             if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)
             and m.weight.dim() == 1]
    outs: dict = {}
    found: dict = {n: [] for n, _ in norms}

    def norm_hook(name):
        def fn(mod, args, out):
            outs[name] = (out[0] if isinstance(out, tuple) else out).detach()
        return fn

    def pre_hook(name):
        def fn(mod, args, kwargs):
            x = _first_tensor(args, kwargs)
            for nn_, o in outs.items():
                if x is not None and x.shape[-1] == o.shape[-1] and x.numel() == o.numel() \
                        and torch.equal(x.reshape(-1, x.shape[-1]), o.reshape(-1, o.shape[-1])):
                    found[nn_].append(name)
        return fn

    norm_ids = {id(m) for _, m in norms}
    hooks = [(m, "fwd", norm_hook(n)) for n, m in norms]
    hooks += [(m, "pre", pre_hook(n)) for n, m in ctx.layer.named_modules() if n and id(m) not in norm_ids]
    sel, ctx.sel = ctx.sel, ctx.sel[:1]
    try:
        ctx.run(hooks)
    finally:
        ctx.sel = sel
    groups = []
    for n, m in norms:
        names = found[n]
        leaves = [c for c in names if not any(o.startswith(c + ".") for o in names)]
        mods = [(c, ctx.layer.get_submodule(c)) for c in leaves]
        mods = [(c, mod) for c, mod in mods if any(True for _ in mod.parameters(recurse=False))]
        if mods:
            groups.append((n, m, mods))
    return groups


def _consumer_kind(ctx: AWQContext, name: str, mod: nn.Module, dim: int) -> str:
    if mod is ctx.experts:
        return "experts"
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == dim:
        return "linear"
    raise ValueError(f"awq: layer {ctx.index} module {name!r} ({type(mod).__name__}) reads a normalized stream but "
                     f"has no [out, {dim}] weight moequant can fold a scale into; set awq.enabled=false for this "
                     f"model (or extend moequant.methods.awq.layer)")


def _expert_rows(ctx: AWQContext):
    """Row selectors of gate and up in the ``[E, 2I, H]`` view of ``gate_up_proj``."""
    I = ctx.experts.gate_up_proj.shape[1 if ctx.fam.layout != TRANSPOSED else 2] // 2
    if ctx.fam.interleaved:
        return slice(0, None, 2), slice(1, None, 2)
    return slice(0, I), slice(I, None)


def _gate_up_view(ctx: AWQContext) -> torch.Tensor:
    gu = ctx.experts.gate_up_proj
    return gu.transpose(1, 2) if ctx.fam.layout == TRANSPOSED else gu


# Experts fake-quantized per call: bounds the temporaries to a gathered chunk x I x H block (checkpoint dtype) and
# a few fp32 chunk x I x H tensors (the scaled block, fake_quantize's work and result).
_FQ_EXPERT_CHUNK = 16


def _fq_chunks(ctx: AWQContext, proj: str, device) -> list:
    """The quantized experts of ``proj`` grouped by format and cut into chunks of ``_FQ_EXPERT_CHUNK``:
    [(format, index tensor on ``device``)], built once per layer."""
    if proj not in ctx.fq_chunks:
        by_format: dict = {}
        for e, sc in enumerate(ctx.expert_schemes_of(proj)):
            if sc is not None:
                by_format.setdefault(sc.format, []).append(e)
        ctx.fq_chunks[proj] = [(fmt, torch.tensor(experts[c0:c0 + _FQ_EXPERT_CHUNK], device=device))
                               for fmt, experts in by_format.items()
                               for c0 in range(0, len(experts), _FQ_EXPERT_CHUNK)]
    return ctx.fq_chunks[proj]


def _fq_experts(ctx: AWQContext, gu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1`` of every quantized expert gate/up row block of ``gu [E, 2I, H]``; experts with the
    same (bits, group size, symmetry) go through ``fake_quantize`` together, a chunk at a time (elementwise per
    group, so the same values as one call per expert)."""
    out = gu.clone()
    for proj, sl in zip(("gate", "up"), _expert_rows(ctx)):
        for fmt, idx in _fq_chunks(ctx, proj, gu.device):
            w = gu[idx, sl].float() * s
            out[idx, sl] = (awq.fake_quantize(w, fmt.bits, fmt.group_size, fmt.symmetric, ctx.storage) / s
                            ).to(gu.dtype)
    return out


def _mse(outs: list, ref: list) -> float:
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, ref))
    return num / max(1, sum(r.numel() for r in ref))


def _smooth_norm(ctx: AWQContext, norm_name: str, norm: nn.Module, consumers: list, info: list) -> None:
    dim = norm.weight.shape[0]
    kinds = [(c, m, _consumer_kind(ctx, c, m, dim)) for c, m in consumers]
    parent = ".".join(_common_prefix([c.split(".") for c, _ in consumers]))
    if not parent:
        info.append({"group": norm_name, "skipped": "its readers have no common parent module to measure"})
        return
    quant = [(c, m, k) for c, m, k in kinds if k == "experts" or ctx.scheme(c) is not None]
    if not quant:
        info.append({"group": norm_name, "skipped": "no reader is quantized"})
        return
    hp = [c for c, m, k in kinds if k == "linear" and ctx.scheme(c) is None]
    pmod = ctx.layer.get_submodule(parent)
    calls, xs = [], []
    hooks = [(pmod, "pre", lambda m, a, k: calls.append((a, k))),
             (norm, "fwd", lambda m, a, o: xs.append(o.detach()))]
    ctx.run(hooks)
    ref = [_out(pmod(*a, **k)) for a, k in calls]
    weights, gsz = [], []
    for c, m, k in quant:
        if k == "experts":
            sc = next((x for x in ctx.expert_schemes_of("gate") if x is not None), None)
            if sc is None:
                continue
            weights.append(_gate_up_view(ctx))
            gsz.append(sc.group_size)
        else:
            weights.append(m.weight)
            gsz.append(ctx.scheme(c).group_size)
    x_mean = awq.activation_salience(torch.cat([x.reshape(-1, dim) for x in xs]), ctx.cfg.salience)
    w_mean = awq.weight_absmean(weights, gsz) if weights else None

    def loss(s: torch.Tensor) -> float:
        saved = []
        try:
            for c, m, k in quant:
                if k == "experts":
                    new = _fq_experts(ctx, _gate_up_view(ctx), s.to(m.gate_up_proj.device))
                    p = m.gate_up_proj
                    saved.append((p, p.data))
                    p.data = new.transpose(1, 2) if ctx.fam.layout == TRANSPOSED else new
                else:
                    sc = ctx.scheme(c)
                    w = m.weight.float() * s
                    saved.append((m.weight, m.weight.data))
                    m.weight.data = (awq.fake_quantize(w, sc.bits, sc.group_size, sc.symmetric, ctx.storage)
                                     / s).to(m.weight.dtype)
            return _mse([_out(pmod(*a, **k)) for a, k in calls], ref)
        finally:
            for p, d in saved:
                p.data = d

    pow2 = ctx.cfg.exact_routing and bool(hp)
    res = awq.search_scale(x_mean, w_mean if ctx.cfg.duo_scaling else None, loss, ctx.cfg.grid,
                           ctx.cfg.duo_scaling, pow2)
    info.append({"group": norm_name, "readers": [c for c, _ in consumers], "ratio": res.ratio, "pow2": pow2,
                 "loss": res.loss, "identity_loss": res.identity_loss})
    if res.ratio is None:
        return
    s = res.scales.to(norm.weight.device)
    norm.weight.data = (awq.widen(norm.weight) / s).to(norm.weight.dtype)
    ctx.keep(ctx.disk(norm_name) + ".weight", norm.weight.data)
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        norm.bias.data = (awq.widen(norm.bias) / s).to(norm.bias.dtype)
        ctx.keep(ctx.disk(norm_name) + ".bias", norm.bias.data)
    for c, m, k in kinds:
        if k == "experts":
            gu = _gate_up_view(ctx)
            gu.copy_((awq.widen(gu) * s).to(gu.dtype))
            ctx.changed_experts.update((e, p) for e in range(gu.shape[0]) for p in ("gate", "up"))
        else:
            m.weight.data = (awq.widen(m.weight) * s).to(m.weight.dtype)
            if ctx.scheme(c) is None:
                ctx.keep(ctx.disk(c) + ".weight", m.weight.data)


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _common_prefix(parts: list) -> list:
    out = []
    for level in zip(*[p[:-1] for p in parts]):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return out


@torch.no_grad()
def apply_awq(layer: nn.Module, family: MoEFamily, recipe, prefix: str, hidden: list, kwargs: list, index: int,
              device, storage: torch.dtype) -> AWQLayerResult:
    """Smooths and clips one decoder layer in place (module docstring); returns the changed high-precision
    tensors by checkpoint name and a per-group log."""
    ctx = AWQContext(layer, family, recipe, prefix, hidden, kwargs, index, device, storage)
    if not ctx.sel:
        return AWQLayerResult()
    before = ctx.run([])
    info: list = []
    for norm_name, norm, consumers in _norm_groups(ctx):
        _smooth_norm(ctx, norm_name, norm, consumers, info)
    smooth_pairs(ctx, info)
    after = ctx.run([])
    err = max(float((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)) for a, b in zip(after, before))
    # the changed norm/router weights are rounded to the checkpoint dtype: allow a few of its ulps; a fold the
    # structure does not support errs by O(|s - 1|)
    tol = max(1e-3, 8 * torch.finfo(storage).eps, 8 * torch.finfo(before[0].dtype).eps)
    if err > tol:
        raise ValueError(f"awq: folding the scales changed layer {index}'s output (relative error {err:.2e} > "
                         f"{tol:g}); this layer's structure is not one moequant can smooth ({info}); set "
                         f"awq.enabled=false for this model")
    if ctx.cfg.clip_search:
        clip_layer(ctx, info)
    export_experts(ctx)
    for g in info:
        logger.info("awq layer %d: %s", index, g)
    return AWQLayerResult(tensors=ctx.tensors, groups=info)
