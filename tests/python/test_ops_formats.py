"""moequant.ops.formats: the torch-level wrappers of the format core agree with the reference twin
(moequant.ref.formats) and name their bad arguments."""
from __future__ import annotations

import pytest
import torch

from moequant import ops
from moequant.ref import formats as ref


SPECS = {
    "fp8_channel": ref.FormatSpec("fp8_e4m3", "channel"),
    "fp8_block": ref.FormatSpec("fp8_e4m3", "block", block=(128, 128)),
    "nvfp4": ref.FormatSpec.nvfp4(),
    "mxfp4": ref.FormatSpec.mx("fp4_e2m1"),
}


@pytest.mark.parametrize("preset", list(SPECS))
def test_quantize_dequantize_match_the_reference(preset, gen):
    w = torch.randn(40, 256, generator=gen) * torch.logspace(-2, 1, 40).unsqueeze(1)
    fmt = getattr(ops.Format, preset)()
    q = ops.format_quantize(w, fmt)
    r = ref.quantize_ref(w, SPECS[preset])
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales)
    back = ops.format_dequantize(q)
    assert torch.equal(back, q.dequantized)
    assert (back - w).norm() / w.norm() < 0.2  # a 4/8-bit float format stays close
    assert ops.format_dequantize(q, torch.bfloat16).dtype == torch.bfloat16


def test_source_decoders_match_plain_torch(gen):
    w = (torch.randn(200, 300, generator=gen) * 3).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=gen) + 0.5
    got = ops.decode_fp8_block_scaled(w, s, dtype=torch.float32)
    want = w.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert torch.equal(got, want)
    blocks = torch.randint(0, 256, (3, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(120, 135, (3, 4), dtype=torch.uint8, generator=gen)
    assert torch.equal(ops.decode_mxfp4_blocks(blocks, scales, torch.float32),
                       ref.decode_mxfp4_blocks_ref(blocks, scales).float())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="^w: expected a 2-D tensor"):
        ops.format_quantize(torch.zeros(4), ops.Format.nvfp4())
    q = ops.format_quantize(torch.randn(4, 32), ops.Format.mxfp4())
    with pytest.raises(ValueError, match="^dtype: expected torch.float32 or torch.bfloat16"):
        ops.format_dequantize(q, torch.float16)
