"""Tiny random checkpoints of every supported family whose matrices the default recipe quantizes as they are
(every input dimension a multiple of 128, the default group size), saved in bf16 with the tokenizer the
repository ships. Random weights: for loading, shapes and plumbing, never for quality claims.

``family_checkpoint(name, root)`` builds (once per ``root``) and returns the directory.
"""
from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tiny_moe" / "tokenizer"
CALIB_TEXT = REPO / "examples" / "data" / "wikitext2_calib.txt"
HELDOUT_TEXT = REPO / "examples" / "data" / "wikitext2_heldout.txt"

_COMMON = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False)
# name: (config class, kwargs): 4 routed experts of width 128, top-2, every Linear input a multiple of 128
CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, intermediate_size=256, moe_intermediate_size=128,
                                          num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], head_dim=32)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=128,
                                          shared_expert_intermediate_size=128, num_experts=4,
                                          num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, intermediate_size=128, num_local_experts=4,
                                       num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, intermediate_size=128, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_hidden_layers=3, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
        num_key_value_heads=4)),
    "deepseek_v2": ("DeepseekV2Config", dict(
        num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=128,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, topk_method="greedy", num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", dict(num_hidden_layers=2, intermediate_size=128, num_local_experts=4,
                                      num_experts_per_tok=2, head_dim=32, sliding_window=16,
                                      layer_types=["sliding_attention", "full_attention"])),
    "qwen3_next": ("Qwen3NextConfig", dict(
        num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=128,
        num_experts=4, num_experts_per_tok=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"])),
    "phimoe": ("PhimoeConfig", dict(num_hidden_layers=2, intermediate_size=128, num_local_experts=4,
                                     num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(num_hidden_layers=2, intermediate_size=128, num_local_experts=4,
                                             num_experts_per_tok=2)),
}
NAMES = list(CONFIGS)


def family_checkpoint(name: str, root: Path, seed: int = 0) -> Path:
    """``root/name``: a tiny bf16 checkpoint of family ``name`` (see the module docstring), built once."""
    import transformers

    from testdata import redraw_experts

    path = Path(root) / name
    if (path / "config.json").is_file():
        return path
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    cls_name, kw = CONFIGS[name]
    cfg = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                          **{**_COMMON, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    redraw_experts(model, bias_std=0.1, seed=seed + 1)  # activations O(1)
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path
