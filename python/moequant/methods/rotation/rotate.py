"""Offline rotation of the residual stream (QuaRot's R1, as MoEQuant uses it: no online transforms).

With ``Q`` orthogonal ``[H, H]`` (``H`` the hidden size) the model computes the same function when

* every RMSNorm on the residual stream has its weight ``g`` folded into the modules reading it
  (``W <- W diag(g)``, the norm weight becomes 1), so that ``RMSNorm(x Q) = RMSNorm(x) Q``;
* the modules *reading* the residual (embeddings ``E``, attention q/k/v (MLA q_a/kv_a), the router, the shared
  expert gate/up and its sigmoid gate, every routed expert's gate/up, dense MLP gate/up, lm_head) are rotated on
  their input side ``W <- W Q`` (fused experts ``gate_up_proj [E, 2I, H]`` along H);
* the modules *writing* to the residual (o_proj / out_proj, down_proj of dense, shared and routed experts) are
  rotated on their output side ``W <- Q^T W`` and their bias ``b <- b Q`` (GPT-OSS ``down_proj_bias``).

Then every hidden state is ``h Q`` and the logits are unchanged (up to rounding); quantization afterwards happens
in the rotated basis, where a Hadamard ``Q`` spreads outlier channels over all channels. ``Q = H_n diag(s) /
sqrt(n)`` is a randomized Hadamard matrix (seeded ``+-1`` signs ``s``) applied with the core's transform
(:func:`moequant.ops.hadamard_transform`; n a power of two or 12/20/28/40 times one: 7168 = 28 * 256).

Pure functions over modules; which norm feeds which modules is data of the family
(:attr:`MoEFamily.residual_norms`, ``residual_writers``, ``rotation_internal``, ``final_norm``,
``norm_weight_offset``). The reference twin is :mod:`moequant.ref.rotation` (dense float64 ``Q``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ...models.base import STANDARD, MoEFamily, get_path, text_config

__all__ = ["Rotation", "HadamardRotation", "DenseRotation", "random_hadamard", "hadamard_size_supported",
           "RotationPlan", "rotation_plan", "rotate_layer_", "rotate_globals_", "rotate_model_", "norm_gain",
           "hidden_size_of"]

_SPECIAL = (1, 12, 20, 28, 40)
_MAX_N = 32768


class Rotation(Protocol):
    """``size`` and ``along(x, dim)`` = ``x @ Q`` along dimension ``dim`` of ``x`` (same dtype and device)."""

    size: int

    def along(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...


def hadamard_size_supported(n: int) -> bool:
    """Whether the core's transform has a Hadamard matrix of order ``n`` (2^k or 12/20/28/40 * 2^k, <= 32768)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > _MAX_N:
        return False
    return any(n % m == 0 and (n // m) & (n // m - 1) == 0 for m in _SPECIAL)


@dataclass(frozen=True)
class HadamardRotation:
    """``Q = H_n diag(s) / sqrt(n)`` applied with :func:`moequant.ops.hadamard_transform` (computed in float32,
    rounded once to the input dtype; float64 inputs are computed in float32 too: use :class:`DenseRotation`
    for float64 work)."""

    size: int
    signs: torch.Tensor = field(repr=False)  # float32 [n], +-1

    def along(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        from ... import ops

        if x.shape[dim] != self.size:
            raise ValueError(f"x: expected size {self.size} along dim {dim}, got shape {tuple(x.shape)}")
        y = ops.hadamard_transform(torch.movedim(x, dim, -1).to(torch.float32).contiguous())
        y = y * self.signs.to(y.device)  # no copy once the rotation lives on y's device (see ``to``)
        return torch.movedim(y, -1, dim).to(x.dtype)

    def to(self, device: torch.device | str) -> "HadamardRotation":
        """The same rotation with its signs on ``device`` (a per-layer loop then copies nothing per call)."""
        return HadamardRotation(self.size, self.signs.to(device))


@dataclass(frozen=True)
class DenseRotation:
    """An explicit orthogonal matrix ``Q [n, n]`` (e.g. :func:`moequant.ref.rotation.random_hadamard_ref`);
    computed in float64 for float64 inputs, else in float32."""

    matrix: torch.Tensor = field(repr=False)

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    def along(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.movedim(x, dim, -1).to(ct) @ self.matrix.to(device=x.device, dtype=ct)
        return torch.movedim(y, -1, dim).to(x.dtype)


def random_hadamard(size: int, seed: int = 0) -> HadamardRotation:
    """The seeded randomized Hadamard rotation of order ``size`` (same ``Q`` as the reference twin)."""
    if not hadamard_size_supported(size):
        raise ValueError(
            f"rotation: hidden_size: expected a power of two or 12, 20, 28 or 40 times a power of two (<= 32768, "
            f"e.g. 7168 = 28 * 256), got {size!r}; the residual rotation needs a Hadamard matrix of the hidden "
            f"size: set rotation.enabled to false for this model")
    g = torch.Generator().manual_seed(int(seed))
    signs = (2 * torch.randint(0, 2, (size,), generator=g) - 1).to(torch.float32)
    return HadamardRotation(size, signs)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class RotationPlan:
    """What :func:`rotate_layer_` does to one layer, by layer-relative tensor name.

    norms: norm paths whose weight is folded. inputs: ``(tensor, dim, norm)``: ``W <- (W * g) Q`` along ``dim``
    (``g`` the weight of ``norm``). outputs: ``(tensor, dim)``: ``W <- Q^T W`` (weights) / ``b Q`` (biases)."""

    norms: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        """Every tensor name the plan changes (norm weights included)."""
        return [f"{n}.weight" for n in self.norms] + [t for t, _, _ in self.inputs] + [t for t, _ in self.outputs]


def _unsupported(family: MoEFamily, what: str) -> ValueError:
    return ValueError(
        f"rotation: {family.name}: {what}; the residual rotation needs every module that reads or writes the "
        f"residual stream declared (MoEFamily.residual_norms / residual_writers / rotation_internal in "
        f"moequant/models/families.py): declare it there, or set rotation.enabled to false for this model")


def rotation_plan(layer: nn.Module, family: MoEFamily, hidden: int) -> RotationPlan:
    """Classifies the modules of a decoder layer (structure and shapes only; works on ``meta`` layers).

    Raises ValueError (with a remedy) for a Linear or norm it cannot place, or a shape that does not match."""
    plan, seen = RotationPlan(), set()
    experts = family.experts_of(layer)
    for norm_path, blocks in family.residual_norms:
        if get_path(layer, norm_path) is None:
            raise _unsupported(family, f"the layer has no residual norm {norm_path!r}")
        plan.norms.append(norm_path)
        for block in blocks:
            mod = get_path(layer, block)
            if mod is None:
                continue
            for name, sub in mod.named_modules(prefix=block):
                if any(name.startswith(s + ".") for s in seen):
                    continue  # inside a router / experts module already handled
                leaf = name.rsplit(".", 1)[-1]
                if experts is not None and sub is experts:
                    seen.add(name)
                    _plan_experts(plan, name, sub, family, hidden, norm_path)
                elif name == family.router:
                    seen.add(name)
                    _expect(family, name, sub.weight.shape[-1], hidden, "input")
                    plan.inputs.append((f"{name}.weight", -1, norm_path))
                elif isinstance(sub, nn.Linear) and leaf not in family.rotation_internal:
                    seen.add(name)
                    if leaf in family.residual_writers:
                        _expect(family, name, sub.weight.shape[0], hidden, "output")
                        plan.outputs.append((f"{name}.weight", 0))
                        if sub.bias is not None:
                            plan.outputs.append((f"{name}.bias", -1))
                    else:
                        _expect(family, name, sub.weight.shape[-1], hidden, "input")
                        plan.inputs.append((f"{name}.weight", -1, norm_path))
    placed = set(plan.norms) | seen
    for name, sub in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name or name in placed or any(name.startswith(p + ".") for p in placed):
            continue
        if leaf in family.rotation_internal:
            continue
        if isinstance(sub, nn.Linear) or any(hidden in p.shape for p in sub.parameters(recurse=False)):
            raise _unsupported(family, f"{type(sub).__name__} {name!r} is outside the declared blocks")
        if "norm" in type(sub).__name__.lower() or isinstance(sub, (nn.LayerNorm, nn.GroupNorm)):
            raise _unsupported(family, f"norm {name!r} ({type(sub).__name__}) is not a declared residual norm")
    return plan


def _expect(family: MoEFamily, name: str, got: int, hidden: int, side: str) -> None:
    if got != hidden:
        raise _unsupported(family, f"{name!r} has {got} {side} features, expected the hidden size {hidden} for a "
                                   f"module on the residual stream")


def _plan_experts(plan: RotationPlan, name: str, experts: nn.Module, family: MoEFamily, hidden: int,
                  norm: str) -> None:
    std = family.layout == STANDARD
    # standard: gate_up [E, 2I, H] (input dim 2), down [E, H, I] (output dim 1);
    # transposed: gate_up [E, H, 2I] (input dim 1), down [E, I, H] (output dim 2), down bias [E, H]
    gu_dim, dn_dim = (2, 1) if std else (1, 2)
    _expect(family, f"{name}.gate_up_proj", experts.gate_up_proj.shape[gu_dim], hidden, "input")
    _expect(family, f"{name}.down_proj", experts.down_proj.shape[dn_dim], hidden, "output")
    plan.inputs.append((f"{name}.gate_up_proj", gu_dim, norm))
    plan.outputs.append((f"{name}.down_proj", dn_dim))
    if isinstance(getattr(experts, "down_proj_bias", None), torch.Tensor):
        plan.outputs.append((f"{name}.down_proj_bias", -1))


# ------------------------------------------------------------------------------------------------ applying
def norm_gain(norm: nn.Module, family: MoEFamily, hidden: int, name: str = "norm") -> torch.Tensor:
    """The gain ``offset + weight`` (float32 [H]) of a residual RMSNorm, after checking numerically that
    ``norm(x) = x / rms(x) * gain`` (no mean subtraction, no bias). Raises ValueError with a remedy otherwise."""
    w = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (hidden,) or isinstance(bias, torch.Tensor):
        raise _unfoldable(family, name, norm, "expected an RMSNorm with a weight [hidden] and no bias")
    gain = w.detach().float() + family.norm_weight_offset
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, hidden, generator=g) * 3 + 2).to(device=w.device, dtype=w.dtype)  # mean != 0 on purpose
    with torch.no_grad():
        got = norm(x).float()
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)) * gain
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 3e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
        raise _unfoldable(family, name, norm, f"it does not compute x / rms(x) * ({family.norm_weight_offset:g} + "
                                              f"weight) (a LayerNorm, or another weight convention)")
    return gain


def _unfoldable(family: MoEFamily, name: str, norm: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"rotation: {family.name}: cannot fold the residual norm {name!r} ({type(norm).__name__}): {why}; the "
        f"rotation supports RMSNorm residual norms only (set MoEFamily.norm_weight_offset for a "
        f"(1 + weight) convention), or set rotation.enabled to false for this model")


@torch.no_grad()
def _transform_(p: torch.Tensor, dim: int, rotation: Rotation, gain: torch.Tensor | None) -> None:
    """``p <- (p * gain along dim) @ Q along dim`` in place, one slice of dimension 0 at a time for 3-D tensors
    (bounded extra memory), one rounding to ``p.dtype``."""
    dim = dim % p.dim()
    if p.dim() == 3 and dim != 0:
        for e in range(p.shape[0]):
            _transform_(p[e], dim - 1, rotation, gain)
        return
    ct = torch.float64 if p.dtype == torch.float64 else torch.float32
    t = p.to(ct)
    if gain is not None:
        shape = [1] * t.dim()
        shape[dim] = -1
        t = t * gain.to(device=t.device, dtype=ct).view(shape)
    p.copy_(rotation.along(t, dim))


def parameter_at(root: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer at dotted ``name`` below ``root`` (``"mlp.experts.gate_up_proj"``); AttributeError
    when a hop is missing."""
    t = get_path(root, name)
    if t is None:
        raise AttributeError(f"{type(root).__name__} has no parameter or buffer {name!r}")
    return t


@torch.no_grad()
def rotate_layer_(layer: nn.Module, family: MoEFamily, rotation: Rotation) -> list[str]:
    """Folds the residual norms of ``layer`` and rotates it in place; returns the layer-relative names of the
    tensors it changed (norm weights, routers, Linears, fused experts, output biases)."""
    plan = rotation_plan(layer, family, rotation.size)
    gains = {n: norm_gain(get_path(layer, n), family, rotation.size, n) for n in plan.norms}
    for tensor, dim, norm in plan.inputs:
        _transform_(parameter_at(layer, tensor), dim, rotation, gains[norm])
    for tensor, dim in plan.outputs:
        _transform_(parameter_at(layer, tensor), dim, rotation, None)
    for n in plan.norms:
        get_path(layer, n).weight.fill_(1.0 - family.norm_weight_offset)
    return plan.tensors


@torch.no_grad()
def rotate_globals_(model: nn.Module, family: MoEFamily, rotation: Rotation) -> dict[str, torch.Tensor]:
    """Rotates the embeddings (``E <- E Q``), folds the final norm into lm_head (``W <- W diag(g) Q``) and sets
    the final norm's weight to 1, in place. A tied lm_head is untied (the rotated head differs from the rotated
    embedding) and ``config.tie_word_embeddings`` set to False. Decoder layers are not touched.

    Returns ``{runtime tensor name: tensor}`` of the three changed tensors (embedding, final norm, lm_head)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    norm = get_path(model, family.final_norm)
    if emb is None or head is None or norm is None:
        raise _unsupported(family, f"the model lacks an input embedding, an output embedding or the final norm "
                                   f"{family.final_norm!r}")
    h = rotation.size
    if emb.weight.shape[-1] != h or head.weight.shape[-1] != h:
        raise _unsupported(family, f"embeddings {tuple(emb.weight.shape)} / lm_head {tuple(head.weight.shape)} "
                                   f"do not have the hidden size {h} as last dimension")
    gain = norm_gain(norm, family, h, family.final_norm)
    names = {id(m): n for n, m in model.named_modules()}
    tied = head.weight is emb.weight
    new_head = head.weight.detach().clone()
    _transform_(new_head, -1, rotation, gain)
    _transform_(emb.weight.data, -1, rotation, None)
    if tied:
        head.weight = nn.Parameter(new_head, requires_grad=False)
        for cfg in {id(c): c for c in (model.config, text_config(model.config))}.values():
            cfg.tie_word_embeddings = False
    else:
        head.weight.data.copy_(new_head)
    norm.weight.fill_(1.0 - family.norm_weight_offset)
    return {f"{names[id(emb)]}.weight": emb.weight, f"{names[id(head)]}.weight": head.weight,
            f"{names[id(norm)]}.weight": norm.weight}


def rotate_model_(model: nn.Module, family: MoEFamily, rotation: Rotation) -> nn.Module:
    """Rotates a fully loaded ``*ForCausalLM`` in place (globals and every decoder layer); returns it."""
    rotate_globals_(model, family, rotation)
    for _, _, layer in family.iter_layers(model):
        rotate_layer_(layer, family, rotation)
    return model


def hidden_size_of(config) -> int:
    """``hidden_size`` of a transformers config (text config for multimodal wrappers)."""
    h = getattr(text_config(config), "hidden_size", None)
    if not isinstance(h, int):
        raise ValueError("rotation: the model config has no integer hidden_size; the rotation cannot be sized")
    return h
