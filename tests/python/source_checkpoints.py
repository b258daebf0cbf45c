"""Tiny quantized *source* checkpoints laid out as the real releases are, made from the bf16 family checkpoints
(tests/python/family_checkpoints.py), each with the bf16 checkpoint holding exactly its decoded weights:

* FP8 block-scaled (DeepSeek-V3 / R1, Kimi-K2, Qwen3 FP8 releases): every Linear weight of the decoder layers
  (attention, dense MLP, shared and routed experts, per expert) stored as F8_E4M3 plus ``weight_scale_inv`` F32
  ``[ceil(out/128), ceil(in/128)]`` (DeepSeek's ``kv_a_proj_with_mqa`` [144, 128] and ``kv_b_proj`` [192, 128] have
  partial edge blocks, as the release's [576, 7168] with [5, 56]); routers, norms, embeddings and lm_head stay bf16,
  and so does Qwen3-MoE's layer-0 ``o_proj`` (a Linear a release lists in ``modules_to_not_convert``: the reader
  must read the headers); config.json gets DeepSeek-V3's ``quantization_config``.
  DeepSeek-V3 is written in two shards with an index, Qwen3-MoE as one file.
* MXFP4 (gpt-oss): ``mlp.experts.{gate_up,down}_proj`` replaced by ``*_blocks`` U8 ``[E, rows, G, 16]`` and
  ``*_scales`` U8 ``[E, rows, G]`` of the transposed weights (``[E, 2I, H]``, ``[E, H, I]``), biases and the rest
  bf16; config.json gets gpt-oss's ``quantization_config``.

The codes come from ``moequant.ops.format_quantize`` (FP8 128x128 blocks, MXFP4); the bf16 twins are decoded
*without* moequant's decoders: FP8 by the plain torch formula of DeepSeek's ``weight_dequant`` (fp32 product of the
code and its block's scale, rounded to bf16), MXFP4 by transformers' own ``convert_moe_packed_tensors``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints import checkpoint_tensors
from family_checkpoints import family_checkpoint
from moequant import ops
from moequant.ops import formats as opsf

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
MXFP4_CONFIG = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
SOURCES = {"deepseek_v3": "fp8", "qwen3_moe": "fp8", "gpt_oss": "mxfp4"}
KEEP_BF16 = ("model.layers.0.self_attn.o_proj.weight",)  # a bf16 Linear among the FP8 ones


def fp8_decode_plain(codes: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """DeepSeek's ``weight_dequant``: every element times its block's scale in fp32 (edge blocks partial), bf16."""
    r, c = codes.shape
    s = scale_inv.repeat_interleave(block[0], 0)[:r].repeat_interleave(block[1], 1)[:, :c]
    return (codes.float() * s).to(torch.bfloat16)


def _fp8_quantized(name: str, t: torch.Tensor) -> bool:
    module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    return ".layers." in name and "_proj" in module and t.dim() == 2 and name not in KEEP_BF16


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[E, rows, cols]`` -> (blocks U8 ``[E, rows, cols/32, 16]``, E8M0 scales U8 ``[E, rows, cols/32]``)."""
    e, rows, cols = w.shape
    q = ops.format_quantize(w.float().reshape(e * rows, cols), ops.Format.mxfp4(), dequantized=False)
    packed = opsf.pack_fp_codes(q.codes, opsf.ElementKind.fp4_e2m1)
    return packed.reshape(e, rows, cols // 32, 16), q.scale_codes.reshape(e, rows, cols // 32)


def _write(tensors: dict, d: Path, shards: int = 1) -> None:
    """``tensors`` as one ``model.safetensors`` or ``shards`` files with an index (split by name order)."""
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _side_files(src: Path, dst: Path, quantization_config: dict | None) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(f, dst / f.name)
    if quantization_config is not None:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(config, indent=2))


def source_checkpoint(family: str, root: Path) -> tuple[Path, Path]:
    """``(root/<family>-<fmt>, root/<family>-decoded)``: the quantized source checkpoint of ``family`` (see the
    module docstring) and the bf16 checkpoint of exactly its decoded weights; built once per ``root``."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    fmt = SOURCES[family]
    src, ref = Path(root) / f"{family}-{fmt}", Path(root) / f"{family}-decoded"
    if (ref / "config.json").is_file():
        return src, ref
    bf16 = family_checkpoint(family, Path(root) / "bf16")
    tensors = checkpoint_tensors(bf16)
    quantized, decoded = {}, {}
    for name, t in tensors.items():
        if fmt == "fp8" and _fp8_quantized(name, t):
            q = ops.format_quantize(t.float(), ops.Format.fp8_block(), dequantized=False)
            codes = q.codes.view(torch.float8_e4m3fn)
            quantized[name], quantized[name + "_scale_inv"] = codes, q.scales.contiguous()
            decoded[name] = fp8_decode_plain(codes, q.scales)
        elif fmt == "mxfp4" and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            blocks, scales = _mxfp4(t.transpose(1, 2))
            quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
            decoded[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        else:
            quantized[name] = decoded[name] = t
    _side_files(bf16, src, FP8_CONFIG if fmt == "fp8" else MXFP4_CONFIG)
    _write(quantized, src, shards=2 if family == "deepseek_v3" else 1)
    _side_files(bf16, ref, None)
    _write(decoded, ref)
    return src, ref
