"""One :class:`MoEFamily` entry per supported transformers-5 MoE family, and :func:`detect_family`.

Provenance of every field (transformers 5.23 sources, ``transformers/models/<family>/modeling_*.py`` and
``transformers/conversion_mapping.py``; checked to be stable public structure):

* Runtime: all entries keep routed experts in a ``@use_experts_implementation`` class with fused 3-D
  ``gate_up_proj`` / ``down_proj`` called as ``experts(hidden_states [T,H], top_k_index [T,k], top_k_weights [T,k])``.
  GPT-OSS names the last two ``router_indices`` / ``routing_weights``; capture binds them by signature.
* Checkpoint names: ``conversion_mapping.py`` maps ``qwen2_moe`` (and, via ``_MODEL_TO_CONVERSION_PATTERN``,
  qwen3_moe, qwen3_next, olmoe, deepseek_v2, deepseek_v3) from ``mlp.experts.*.{gate,up,down}_proj.weight``
  (MergeModulelist dim0 + Concatenate dim1); ``mixtral``: rename ``.block_sparse_moe.`` -> ``.mlp.`` and fuse
  ``experts.*.w1`` (gate) + ``w3`` (up) and ``w2`` (down); ``phimoe``: same as Mixtral plus ``.gate.weight`` ->
  ``.router.weight``; ``granitemoe``: ``block_sparse_moe.input_linear.weight`` -> ``experts.gate_up_proj`` and
  ``output_linear.weight`` -> ``experts.down_proj`` (fused on disk already), ``router.layer.weight`` ->
  ``router.weight``; ``gpt_oss`` has no entry (runtime names == checkpoint names, fused; the original
  release stores MXFP4 ``gate_up_proj_blocks/_scales``).
"""
from __future__ import annotations

import logging

from .base import TRANSPOSED, MoEFamily, glu_gpt_oss, text_config

logger = logging.getLogger(__name__)

QWEN3_MOE = MoEFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    notes="Dense layers via mlp_only_layers / decoder_sparse_step (mlp is Qwen3MoeMLP, no experts).",
)

QWEN2_MOE = MoEFamily(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    shared_expert="mlp.shared_expert",
    shared_expert_gate="mlp.shared_expert_gate",
    notes="shared expert scaled by sigmoid(shared_expert_gate(x)); shared_expert_gate is nn.Linear [1,H].",
)

MIXTRAL = MoEFamily(
    name="mixtral",
    model_types=("mixtral",),
    disk_experts="block_sparse_moe.experts",
    disk_proj_names=("w1", "w3", "w2"),
    disk_renames=((".mlp.", ".block_sparse_moe."),),
    notes="Checkpoint: block_sparse_moe.experts.E.w1 (gate) / w3 (up) / w2 (down), router block_sparse_moe.gate.",
)

OLMOE = MoEFamily(
    name="olmoe",
    model_types=("olmoe",),
    notes="Attention has q_norm/k_norm (RMSNorm, not quantized).",
)

DEEPSEEK_V3 = MoEFamily(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    shared_expert="mlp.shared_experts",
    notes="Layers < first_k_dense_replace are dense (mlp.{gate,up,down}_proj). MLA Linears q_a_proj/q_b_proj "
    "(or q_proj when q_lora_rank is None), kv_a_proj_with_mqa, kv_b_proj, o_proj. Router mlp.gate has "
    "e_score_correction_bias; top_k_weights already include routed_scaling_factor. Ungated shared experts.",
)

DEEPSEEK_V2 = MoEFamily(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    shared_expert="mlp.shared_experts",
    notes="As DeepSeek-V3 (MLA, first_k_dense_replace dense layers, ungated shared experts); softmax router.",
)

GPT_OSS = MoEFamily(
    name="gpt_oss",
    model_types=("gpt_oss",),
    router="mlp.router",
    layout=TRANSPOSED,
    interleaved=True,
    has_bias=True,
    glu=glu_gpt_oss,
    disk_fused=True,
    notes="GptOssExperts: gate_up_proj [E,H,2I] with gate = columns 0::2, up = 1::2 (interleaved, "
    "_apply_gate), biases gate_up_proj_bias [E,2I] / down_proj_bias [E,H]; clamped SwiGLU "
    "(up.clamp(+-limit)+1) * g*sigmoid(alpha*g), g = gate.clamp(max=limit). Checkpoint stores experts fused "
    "(mlp.experts.gate_up_proj[_bias], down_proj[_bias]; MXFP4 _blocks/_scales in the original release); "
    "per-expert export names follow llm-compressor's linearized GptOssExpert (mlp.experts.E.{gate,up,down}_proj, "
    "with biases). Attention has sinks (parameter, not Linear).",
)

QWEN3_NEXT = MoEFamily(
    name="qwen3_next",
    model_types=("qwen3_next",),
    shared_expert="mlp.shared_expert",
    shared_expert_gate="mlp.shared_expert_gate",
    extra_high_precision=("linear_attn.in_proj_ba",),
    norm_weight_offset=1.0,
    notes="Hybrid: layer_types 'linear_attention' layers hold linear_attn (GatedDeltaNet: in_proj_qkvz, "
    "in_proj_ba, conv1d [Conv1d, kept], out_proj), 'full_attention' layers hold self_attn (q/k/v/o, q_proj "
    "doubled for the output gate). in_proj_ba (out = 2*num_v_heads: the beta/decay gates) kept high precision "
    "by default like the other gating projections. Checkpoint mtp.* layers are not in the HF model.",
)

PHIMOE = MoEFamily(
    name="phimoe",
    model_types=("phimoe",),
    router="mlp.router",
    disk_experts="block_sparse_moe.experts",
    disk_proj_names=("w1", "w3", "w2"),
    disk_renames=((".mlp.", ".block_sparse_moe."), (".router", ".gate")),
    notes="PhimoeTopKRouter subclasses nn.Linear (excluded by path). sparsemixer routing; jitter only in "
    "training. Checkpoint block_sparse_moe.gate + experts.E.w1/w3/w2 like Mixtral.",
)

GRANITEMOE = MoEFamily(
    name="granitemoe",
    model_types=("granitemoe",),
    moe_block="block_sparse_moe",
    experts="block_sparse_moe.experts",
    router="block_sparse_moe.router",
    disk_experts="block_sparse_moe.experts",
    disk_proj_names=("w1", "w3", "w2"),
    disk_fused=True,
    disk_renames=((".block_sparse_moe.router", ".block_sparse_moe.router.layer"),
                  (".block_sparse_moe.experts.gate_up_proj", ".block_sparse_moe.input_linear.weight"),
                  (".block_sparse_moe.experts.down_proj", ".block_sparse_moe.output_linear.weight")),
    residual_norms=(("input_layernorm", ("self_attn",)), ("post_attention_layernorm", ("block_sparse_moe",))),
    notes="Fused GraniteMoeExperts only in recent transformers 5 (older releases kept GraniteMoeParallelExperts "
    "input_linear/output_linear with an (inputs, expert_size) signature: MoEFamily.validate rejects those). "
    "Checkpoint stores block_sparse_moe.input_linear.weight [E,2I,H] / output_linear.weight [E,H,I] fused; "
    "per-expert export names follow vLLM's granitemoe loader, which splits them into experts.E.w1/w3/w2 "
    "(from memory of vLLM, unverified here). granitemoeshared/granitemoehybrid are not covered.",
)

FAMILIES: tuple[MoEFamily, ...] = (
    QWEN3_MOE, QWEN2_MOE, MIXTRAL, OLMOE, DEEPSEEK_V3, DEEPSEEK_V2, GPT_OSS, QWEN3_NEXT, PHIMOE, GRANITEMOE,
)
_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def detect_family(config) -> MoEFamily:
    """The :class:`MoEFamily` for a transformers config (or a model, or a ``model_type`` string).

    Multimodal wrappers are resolved through ``config.text_config``. Raises ValueError naming the supported
    families for anything else."""
    if hasattr(config, "config") and not isinstance(config, str):
        config = config.config
    seen = []
    text = text_config(config)
    for cfg in (config,) if text is config else (config, text):
        mt = cfg if isinstance(cfg, str) else getattr(cfg, "model_type", None)
        if mt is None:
            continue
        seen.append(mt)
        if mt in _BY_MODEL_TYPE:
            fam = _BY_MODEL_TYPE[mt]
            logger.debug("model_type %r -> family %s", mt, fam.name)
            return fam
    raise ValueError(
        f"unsupported MoE model_type {seen or None!r}; supported families: "
        f"{', '.join(f.name for f in FAMILIES)} (model_types: {', '.join(supported_model_types())}). "
        "To add one, declare a MoEFamily entry (layers/experts/router paths, layout, GLU, checkpoint names) "
        "in moequant/models/families.py, or pass a MoEFamily explicitly.")
