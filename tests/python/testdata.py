"""Deterministic test inputs shared by the test modules (no assertions here)."""
import torch


def weight(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of very different magnitudes plus the special rows: zeros, a constant, all-positive, all-negative."""
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 1, rows).unsqueeze(1)
    if rows >= 6:
        w[1] = 0.0
        w[2] = 0.375
        w[3] = w[3].abs()
        w[4] = -w[4].abs()
    return w


def tiny_qwen3_checkpoint(path, *, num_experts: int = 4, moe_intermediate_size: int = 64, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16):
    """A random Qwen3-MoE checkpoint (2 layers, hidden 64, top-2, tied embeddings) saved with the tokenizer the
    repository ships, so tests need nothing from ../shared; returns ``path``."""
    from pathlib import Path

    import transformers

    tokenizer = Path(__file__).resolve().parents[2] / "examples" / "tiny_moe" / "tokenizer"
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    cfg = transformers.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      moe_intermediate_size=moe_intermediate_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      num_experts=num_experts, num_experts_per_tok=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, norm_topk_prob=True)
    torch.manual_seed(seed)
    transformers.Qwen3MoeForCausalLM(cfg).to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return path
