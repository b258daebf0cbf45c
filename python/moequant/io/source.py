"""Quantized source checkpoints that moequant reads directly, presented in bf16 (issue #13).

Two source formats, declared by config.json's ``quantization_config`` and checked against the safetensors headers:

* **FP8 block-scaled** (DeepSeek-V3 / R1, Kimi-K2, Qwen3 FP8 releases; transformers' ``FineGrainedFP8Config``):
  ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}``.
  Every ``X.weight`` stored as F8_E4M3 ``[out, in]`` has a companion ``X.weight_scale_inv`` F32
  ``[ceil(out/128), ceil(in/128)]``; the view has ``X.weight`` = ``decode_fp8_block_scaled`` in bf16 and no
  ``X.weight_scale_inv``. Tensors stored in bf16 / f32 (norms, embeddings, lm_head, routers, whatever the release
  kept) are read as they are.
* **MXFP4** (gpt-oss; transformers' ``Mxfp4Config``): ``{"quant_method": "mxfp4", ...}``. Every ``P_blocks`` U8
  ``[E, R, G, 16]`` has ``P_scales`` U8 (E8M0) ``[E, R, G]``; the view has ``P`` = ``decode_mxfp4_blocks`` ->
  ``[E, R, G*32]`` transposed to ``[E, G*32, R]`` in bf16 (transformers' ``convert_moe_packed_tensors``:
  ``mlp.experts.gate_up_proj`` ``[E, H, 2I]``, ``down_proj`` ``[E, I, H]``); biases and the rest are read as they are.

:func:`source_view` builds the view from the headers alone (:func:`moequant.io.safetensors.check_checkpoint` calls
it); :func:`decode` reads one view tensor's raw parts onto a device and decodes it there. Any other
``quantization_config`` (compressed-tensors, AWQ, GPTQ, an FP8 variant with other parameters) gets no view:
:func:`unsupported_reason` says why, for the preflight's error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch

__all__ = ["SourceFormat", "ViewTensor", "FP8_SCALE", "E8M0_SCALE", "config_quantization", "source_format",
           "unsupported_reason", "source_view", "decode", "SUPPORTED"]

FP8_SCALE, E8M0_SCALE = "FP8_SCALE_INV", "E8M0"  # scan kinds of the scale companions (io.safetensors.scan_weights)
SUPPORTED = ("FP8 block-scaled sources (quant_method fp8, fmt e4m3, activation_scheme dynamic, weight_block_size "
             "[R, C], fp32 scales) and gpt-oss MXFP4 sources (quant_method mxfp4)")


@dataclass(frozen=True)
class SourceFormat:
    """A quantized source checkpoint moequant decodes on load: ``method`` ``"fp8"`` (with ``block``, the weight
    block size) or ``"mxfp4"``."""

    method: str
    block: Optional[tuple[int, int]] = None

    def describe(self) -> str:
        if self.method == "fp8":
            return f"FP8 E4M3 with {self.block[0]}x{self.block[1]} block scales (weight_scale_inv)"
        return "MXFP4 (E2M1 blocks of 32 with E8M0 scales, gpt-oss)"

    def to_dict(self) -> dict:
        return {"quant_method": self.method, **({"weight_block_size": list(self.block)} if self.block else {})}


class ViewTensor(NamedTuple):
    """One tensor of a checkpoint as the runtime sees it: ``dtype`` / ``shape`` as presented (``"BF16"`` and the
    decoded shape for a decoded tensor), ``file`` of its data, ``parts`` (the raw tensors it is read from: itself for
    a plain tensor; weight and scale, or blocks and scales, for a decoded one) and ``codec`` (None, ``"fp8"``,
    ``"mxfp4"``). ``block``: the FP8 weight block size."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[str, ...]
    codec: Optional[str] = None
    block: Optional[tuple[int, int]] = None

    @property
    def nbytes(self) -> int:
        from .safetensors import SAFETENSORS_DTYPE_BITS

        return (math.prod(self.shape) * SAFETENSORS_DTYPE_BITS[self.dtype] + 7) // 8

    def describe(self) -> str:
        """How it is stored (for messages): ``"decoded from X.weight (F8_E4M3) + X.weight_scale_inv"``."""
        return f"decoded from {' + '.join(self.parts)}" if self.codec else "stored as it is"


def config_quantization(model_dir: str | Path) -> Optional[dict]:
    """config.json's ``quantization_config`` (top level, else its ``text_config``'s); None when there is none or
    config.json is absent or unreadable (the callers that need config.json report that themselves)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    q = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    return q if isinstance(q, Mapping) and q else None


def _fp8_problem(q: Mapping) -> Optional[str]:
    block = q.get("weight_block_size", [128, 128])
    checks = (
        (str(q.get("fmt", "e4m3")).lower() == "e4m3", f"fmt {q.get('fmt')!r} (expected e4m3)"),
        (str(q.get("activation_scheme", "dynamic")).lower() == "dynamic",
         f"activation_scheme {q.get('activation_scheme')!r} (expected dynamic: static activation scales are not read)"),
        (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block),
         f"weight_block_size {block!r} (expected two positive integers; per-tensor FP8 is not read)"),
        (q.get("scale_fmt", "float") == "float", f"scale_fmt {q.get('scale_fmt')!r} (expected float: fp32 scales)"),
        (q.get("expert_dtype", "fp8") == "fp8", f"expert_dtype {q.get('expert_dtype')!r} (expected fp8)"),
    )
    bad = [why for ok, why in checks if not ok]
    return "; ".join(bad) if bad else None


def source_format(quantization_config: Optional[Mapping]) -> Optional[SourceFormat]:
    """The :class:`SourceFormat` a ``quantization_config`` declares, or None (no quantization_config, or one that
    moequant does not decode: :func:`unsupported_reason`)."""
    q = quantization_config
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8" and _fp8_problem(q) is None:
        return SourceFormat("fp8", tuple(int(b) for b in q.get("weight_block_size", [128, 128])))
    if method == "mxfp4":
        return SourceFormat("mxfp4")
    return None


def unsupported_reason(quantization_config: Mapping) -> str:
    """Why moequant does not read a checkpoint with this ``quantization_config`` (for an error message)."""
    q = quantization_config
    method = q.get("quant_method")
    if str(method).lower() == "fp8":
        return f"quant_method fp8 with {_fp8_problem(q)}"
    fmt = f", format {q['format']!r}" if isinstance(q.get("format"), str) else ""
    return f"quant_method {method!r}{fmt}"


def _where(name: str, h) -> str:
    from .safetensors import layer_of

    return f"{name} ({layer_of(name)}, {h.file.name})"


def _fail(name: str, h, what: str) -> None:
    raise ValueError(f"{_where(name, h)}: {what}; the FP8/MXFP4 checkpoint is damaged or not laid out as its "
                     f"config.json's quantization_config says: re-download it, or use the checkpoint's bf16 release")


def source_view(tensors: Mapping[str, Any], fmt: Optional[SourceFormat]
                ) -> tuple[dict[str, ViewTensor], dict[str, str]]:
    """``(view, scan_kinds)`` of a checkpoint's raw headers (name -> :class:`~moequant.io.safetensors.TensorHeader`,
    in file order) under source format ``fmt`` (None: every tensor as it is). ``view``: the runtime-visible names in
    file order (a decoded tensor takes its weight's / blocks' place; the scale companions disappear); ``scan_kinds``:
    raw scale tensors -> the kind :func:`~moequant.io.safetensors.scan_weights` checks them as. Raises ValueError
    naming the tensor, its file, the expected and the actual header when the companions do not match."""
    view: dict[str, ViewTensor] = {}
    kinds: dict[str, str] = {}
    fp8, mx = fmt is not None and fmt.method == "fp8", fmt is not None and fmt.method == "mxfp4"
    for name, h in tensors.items():
        if fp8 and name.endswith(".weight_scale_inv"):
            w = tensors.get(name[: -len("_scale_inv")])
            if w is None or w.dtype != "F8_E4M3":
                _fail(name, h, f"a weight_scale_inv whose weight {name[: -len('_scale_inv')]!r} is "
                               f"{'missing' if w is None else w.dtype}, expected F8_E4M3")
            kinds[name] = FP8_SCALE
        elif mx and name.endswith("_scales"):
            if tensors.get(name[: -len("_scales")] + "_blocks") is None:
                _fail(name, h, f"MXFP4 scales without their blocks {name[: -len('_scales')] + '_blocks'!r}")
            kinds[name] = E8M0_SCALE
        elif fp8 and h.dtype == "F8_E4M3":
            view[name] = _fp8_entry(name, h, tensors, fmt.block)
        elif mx and name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            view[base] = _mxfp4_entry(name, h, tensors, base + "_scales")
        else:
            view[name] = ViewTensor(h.file, h.dtype, h.shape, (name,))
    return view, kinds


def _fp8_entry(name: str, h, tensors: Mapping, block: tuple[int, int]) -> ViewTensor:
    scale_name = name + "_scale_inv"
    s = tensors.get(scale_name)
    if s is None:
        _fail(name, h, f"F8_E4M3 {list(h.shape)} without its {scale_name!r} (F32 block scales)")
    if len(h.shape) != 2:
        _fail(name, h, f"F8_E4M3 with shape {list(h.shape)}, expected a 2-D [out, in] weight")
    want = tuple(-(-d // b) for d, b in zip(h.shape, block))
    if s.dtype != "F32" or s.shape != want:
        _fail(scale_name, s, f"{s.dtype} {list(s.shape)}, expected F32 {list(want)} (ceil of its weight "
                             f"{list(h.shape)} / weight_block_size {list(block)})")
    return ViewTensor(h.file, "BF16", h.shape, (name, scale_name), "fp8", block)


def _mxfp4_entry(name: str, h, tensors: Mapping, scale_name: str) -> ViewTensor:
    s = tensors.get(scale_name)
    if s is None:
        _fail(name, h, f"MXFP4 blocks without their scales {scale_name!r}")
    if h.dtype != "U8" or len(h.shape) != 4 or h.shape[-1] != 16:
        _fail(name, h, f"{h.dtype} {list(h.shape)}, expected U8 [experts, rows, groups, 16]")
    if s.dtype != "U8" or s.shape != h.shape[:-1]:
        _fail(scale_name, s, f"{s.dtype} {list(s.shape)}, expected U8 {list(h.shape[:-1])} (its blocks' shape "
                             f"without the last 16)")
    e, rows, groups, _ = h.shape
    return ViewTensor(h.file, "BF16", (e, groups * 32, rows), (name, scale_name), "mxfp4")


def decode(name: str, vt: ViewTensor, read_raw: Callable[[str], torch.Tensor],
           device: torch.device | str | None = None) -> torch.Tensor:
    """The bf16 tensor ``name`` of a decoded view entry ``vt``: its raw parts read by ``read_raw`` (CPU), moved to
    ``device`` (None: the CPU) and decoded there (CUDA tensors go through the kernels, CPU ones through the C++ core;
    the results agree bit for bit)."""
    from .. import ops

    raw = [read_raw(p) for p in vt.parts]
    if device is not None and torch.device(device).type != "cpu":
        raw = [t.to(device, non_blocking=False) for t in raw]
    try:
        if vt.codec == "fp8":
            return ops.decode_fp8_block_scaled(raw[0].contiguous(), raw[1].contiguous(), vt.block, torch.bfloat16)
        out = ops.decode_mxfp4_blocks(raw[0].contiguous(), raw[1].contiguous(), torch.bfloat16)
        return out.transpose(1, 2).contiguous()
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{name}: cannot decode it ({vt.describe()}): {str(exc).splitlines()[0]}; the checkpoint "
                         f"is damaged: re-download it") from exc
