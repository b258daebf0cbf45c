"""AWQ stages 2-3 over one decoder layer: Linear -> Linear smoothing and clipping (see
:mod:`moequant.methods.awq.layer`); they share stage 1's :class:`~moequant.methods.awq.context.AWQContext`."""
from __future__ import annotations

import torch
from torch import nn

from ...calibration.capture import ExpertCapture
from ...calibration.routing import expert_glu
from ...models.base import glu_act_fn, split_expert
from . import search as awq
from .context import AWQContext

__all__ = ["smooth_pairs", "clip_layer", "export_experts"]

_NO_CLIP = ("q_", "k_", "query", "key")  # AutoAWQ does not clip q/k: their errors meet in the softmax


def _strided(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()]


def _input_hook(store: dict, name: str, limit=None):
    def fn(mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        x = x.reshape(-1, x.shape[-1]).detach().float()
        store.setdefault(name, []).append(_strided(x, limit) if limit else x)
    return fn


def _routed_rows(ctx: AWQContext, batches: list) -> list:
    """Per expert: its routed input rows ``[n_e, H]`` over the captured batches."""
    E = ctx.experts.gate_up_proj.shape[0]
    rows = [[] for _ in range(E)]
    for b in batches:
        off, x = b.offsets.tolist(), b.x.float()  # one conversion per batch (x keeps the activations' dtype)
        for e in range(E):
            if off[e + 1] > off[e]:
                rows[e].append(x[off[e]:off[e + 1]])
    H = batches[0].x.shape[1] if batches else 0
    return [torch.cat(r) if r else torch.zeros(0, H, device=ctx.device) for r in rows]


def _pair_search(ctx: AWQContext, x: torch.Tensor, w: torch.Tensor, sc, x_mean=None, w_mean=None, expand=None):
    """Scale search for ``y = x W^T`` with W quantized by ``sc``; ``expand`` maps the searched scales to W's
    columns (GQA). Returns the search result."""
    wf = w.float()
    ref = x @ wf.t()
    x_mean = awq.activation_salience(x, ctx.cfg.salience) if x_mean is None else x_mean
    if w_mean is None:
        w_mean = awq.weight_absmean([wf], [sc.group_size])
    expand = expand or (lambda s: s)

    def loss(s):
        se = expand(s)
        q = awq.fake_quantize(wf * se, sc.bits, sc.group_size, sc.symmetric, ctx.storage) / se
        return float((x @ q.t() - ref).pow(2).mean())

    return awq.search_scale(x_mean, w_mean if ctx.cfg.duo_scaling else None, loss, ctx.cfg.grid,
                            ctx.cfg.duo_scaling)


def _scale_rows(p: torch.Tensor, s: torch.Tensor, div: bool) -> None:
    shape = (-1,) + (1,) * (p.dim() - 1)
    v = awq.widen(p) / s.view(shape) if div else awq.widen(p) * s.view(shape)
    p.copy_(v.to(p.dtype))


@torch.no_grad()
def smooth_pairs(ctx: AWQContext, info: list) -> None:
    """v_proj -> o_proj, up_proj -> down_proj (dense MLP, shared expert) and every routed expert's up -> down."""
    attn, mlps = [], []
    for name, mod in ctx.layer.named_modules():
        v, o = getattr(mod, "v_proj", None), getattr(mod, "o_proj", None)
        if isinstance(v, nn.Linear) and isinstance(o, nn.Linear):
            attn.append((name, mod, v, o))
        u, d = getattr(mod, "up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(u, nn.Linear) and isinstance(d, nn.Linear) and u.out_features == d.in_features:
            mlps.append((name, u, d))
    store: dict = {}
    hooks = [(o, "pre", _input_hook(store, f"{n}.o_proj")) for n, _, _, o in attn]
    hooks += [(d, "pre", _input_hook(store, f"{n}.down_proj")) for n, _, d in mlps]
    batches: list = []
    routed = ctx.experts is not None and ctx.fam.glu is glu_act_fn
    if routed:
        with ExpertCapture(ctx.experts, ctx.fam, accumulate=False, compute_h=False, on_batch=batches.append):
            ctx.run(hooks)
    else:
        ctx.run(hooks)
        if ctx.experts is not None:
            info.append({"group": "experts up->down", "skipped": "the expert GLU is not act(gate) * up"})
    for name, mod, v, o in attn:
        _smooth_v_o(ctx, name, mod, v, o, torch.cat(store[f"{name}.o_proj"]), info)
    for name, u, d in mlps:
        rel = f"{name}.down_proj"
        sc = ctx.scheme(rel)
        if sc is None:
            info.append({"group": f"{name}.up->down", "skipped": "down_proj not quantized"})
            continue
        res = _pair_search(ctx, torch.cat(store[rel]), d.weight, sc)
        info.append({"group": f"{name}.up->down", "ratio": res.ratio, "loss": res.loss,
                     "identity_loss": res.identity_loss})
        if res.ratio is not None:
            s = res.scales.to(u.weight.device)
            _fold_rows(ctx, f"{name}.up_proj", u, s)
            _scale_rows(d.weight.t(), s, div=False)
    if routed:
        _smooth_experts(ctx, _routed_rows(ctx, batches), info)


def _fold_rows(ctx: AWQContext, rel: str, lin: nn.Linear, s: torch.Tensor) -> None:
    """Output channel c of ``lin`` divided by s[c] (weight rows and bias); high-precision results recorded."""
    _scale_rows(lin.weight, s, div=True)
    if ctx.scheme(rel) is None:
        ctx.keep(ctx.disk(rel) + ".weight", lin.weight.data)
    if lin.bias is not None:
        _scale_rows(lin.bias, s, div=True)
        ctx.keep(ctx.disk(rel) + ".bias", lin.bias.data)


def _smooth_v_o(ctx: AWQContext, name, mod, v, o, x, info) -> None:
    label = f"{name}.v->o"
    sc = ctx.scheme(f"{name}.o_proj")
    hd = getattr(mod, "head_dim", None)
    nv, no = v.out_features, o.in_features
    if sc is None:
        info.append({"group": label, "skipped": "o_proj not quantized"})
        return
    if no % nv or not isinstance(hd, int) or nv % hd:
        info.append({"group": label, "skipped": f"v_proj {nv} / o_proj {no} channels are not whole KV-head groups"})
        return
    rep, nkv = no // nv, nv // hd

    def expand(s):  # one scale per KV channel, shared by the `rep` query heads reading that KV head
        return s.view(nkv, 1, hd).expand(nkv, rep, hd).reshape(-1)

    x_mean = awq.activation_salience(x, ctx.cfg.salience).view(nkv, rep, hd).mean(1).reshape(-1)
    w_mean = awq.weight_absmean([o.weight], [sc.group_size]).view(nkv, rep, hd).mean(1).reshape(-1)
    res = _pair_search(ctx, x, o.weight, sc, x_mean, w_mean, expand)
    info.append({"group": label, "ratio": res.ratio, "loss": res.loss, "identity_loss": res.identity_loss,
                 "heads_per_kv": rep})
    if res.ratio is not None:
        s = res.scales.to(v.weight.device)
        _fold_rows(ctx, f"{name}.v_proj", v, s)
        _scale_rows(o.weight.t(), expand(s), div=False)


def _smooth_experts(ctx: AWQContext, rows: list, info: list) -> None:
    ex, fam = ctx.experts, ctx.fam
    done = skipped = 0
    down = ctx.expert_schemes_of("down")
    for e, x in enumerate(rows):
        sd = down[e]
        if sd is None or x.shape[0] < ctx.cfg.min_tokens:
            skipped += 1
            continue
        t = split_expert(ex, fam, e)
        res = _pair_search(ctx, expert_glu(ex, fam, t, x), t.down, sd)
        if res.ratio is None:
            continue
        s = res.scales.to(t.up.device)
        _scale_rows(t.up, s, div=True)
        if t.up_bias is not None:
            _scale_rows(t.up_bias, s, div=True)
        _scale_rows(t.down.t(), s, div=False)
        ctx.changed_experts.update({(e, "up"), (e, "down")})
        done += 1
    info.append({"group": "experts up->down", "smoothed": done, "below_min_tokens_or_unquantized": skipped})


def _clip(ctx: AWQContext, w: torch.Tensor, x: torch.Tensor, sc) -> None:
    w32 = w.float()
    mv = awq.search_clip(w32, x, sc.bits, sc.group_size, sc.symmetric, ctx.cfg.clip_grid, ctx.cfg.clip_max_shrink,
                         ctx.storage)
    w.copy_(awq.apply_clip(w32, mv).to(w.dtype))


@torch.no_grad()
def clip_layer(ctx: AWQContext, info: list) -> None:
    """Clipping search for every quantized matrix of the layer except q/k projections."""
    lins = {n: ctx.layer.get_submodule(n) for n in sorted(ctx.linears)
            if ctx.scheme(n) is not None and not n.rsplit(".", 1)[-1].startswith(_NO_CLIP)}
    per_batch = max(1, -(-ctx.cfg.clip_tokens // max(1, len(ctx.sel))))
    store: dict = {}
    hooks = [(m, "pre", _input_hook(store, n, per_batch)) for n, m in lins.items()]
    batches: list = []
    if ctx.experts is not None:
        with ExpertCapture(ctx.experts, ctx.fam, accumulate=False, compute_h=False, on_batch=batches.append):
            ctx.run(hooks)
    else:
        ctx.run(hooks)
    for n, m in lins.items():
        _clip(ctx, m.weight, _strided(torch.cat(store[n]), ctx.cfg.clip_tokens), ctx.scheme(n))
    clipped = 0
    if ctx.experts is not None:
        schemes = {proj: ctx.expert_schemes_of(proj) for proj in ("gate", "up", "down")}
        for e, x in enumerate(_routed_rows(ctx, batches)):
            if x.shape[0] < ctx.cfg.min_tokens:
                continue
            x = _strided(x, ctx.cfg.clip_tokens)
            t = split_expert(ctx.experts, ctx.fam, e)
            for proj, w in (("gate", t.gate), ("up", t.up)):
                sc = schemes[proj][e]
                if sc is not None:
                    _clip(ctx, w, x, sc)
            sd = schemes["down"][e]
            if sd is not None:
                _clip(ctx, t.down, expert_glu(ctx.experts, ctx.fam, t, x), sd)
            clipped += 1
    info.append({"group": "clip", "linears": len(lins), "experts": clipped})


def export_experts(ctx: AWQContext) -> None:
    """Changed routed-expert matrices that the recipe keeps in high precision go to the export as tensors."""
    fam = ctx.fam
    fused_changed = False
    for e, proj in sorted(ctx.changed_experts):
        if ctx.expert_schemes_of(proj)[e] is not None:
            continue
        if fam.disk_fused:
            fused_changed = True
            continue
        names = fam.disk_expert_names(ctx.prefix, e)
        ctx.keep(names[proj] + ".weight", getattr(split_expert(ctx.experts, fam, e), proj))
    if fused_changed:
        for leaf in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            p = getattr(ctx.experts, leaf, None)
            if isinstance(p, torch.Tensor):
                ctx.keep(ctx.disk(f"{fam.experts}.{leaf}"), p.data)
