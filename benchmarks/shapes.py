"""Checked-in table of real MoE expert shapes used by the benchmarks (public model configs).

Per model: hidden size, expert (moe intermediate) width, routed experts per layer, experts per token (top-k).
An expert's gate and up projections share the Hessian of the layer input ([hidden, hidden]), so GPTQ solves them as
one [2 * width, hidden] weight; down is [hidden, width] against the [width, width] Hessian of its input.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoeShape:
    name: str
    hidden: int
    width: int
    experts: int
    top_k: int
    group_size: int = 128  # the format's quantization group (must divide hidden and width)

    @property
    def gate_up(self):  # (rows, cols) of the fused gate+up GPTQ problem
        return (2 * self.width, self.hidden)

    @property
    def down(self):
        return (self.hidden, self.width)


SHAPES = {
    "deepseek-v3": MoeShape("deepseek-v3", hidden=7168, width=2048, experts=256, top_k=8),
    "qwen3-30b-a3b": MoeShape("qwen3-30b-a3b", hidden=2048, width=768, experts=128, top_k=8),
    "mixtral-8x7b": MoeShape("mixtral-8x7b", hidden=4096, width=14336, experts=8, top_k=2),
    "gpt-oss-120b": MoeShape("gpt-oss-120b", hidden=2880, width=2880, experts=128, top_k=4, group_size=32),
}

# Issue targets on one H100, ms per expert amortised over a batch, and the batched-PyTorch anchor
# (/work/shared/tools/ref_gptq_batched.py) measured on an H100 with torch 2.11.
GPTQ_TARGETS_MS = {
    ("deepseek-v3", "gate_up"): 25.0,
    ("deepseek-v3", "down"): 5.0,
    ("qwen3-30b-a3b", "gate_up"): 1.4,
    ("qwen3-30b-a3b", "down"): 0.5,
}
GPTQ_ANCHOR_MS = {
    ("deepseek-v3", "gate_up"): 98.6,
    ("deepseek-v3", "down"): 19.9,
    ("qwen3-30b-a3b", "gate_up"): 5.4,
    ("qwen3-30b-a3b", "down"): 1.9,
}

H100_FP32_TFLOPS = 66.9  # SXM, non-tensor-core fp32 peak (spec)
H100_HBM_GBPS = 3350.0
