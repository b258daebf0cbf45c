"""Deterministic test inputs shared by the test modules (no assertions here)."""
from __future__ import annotations

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


def split_rows(n: int, experts: int, empty: int | None = None) -> list[int]:
    """Row counts of n rows spread over ``experts`` experts as evenly as possible; expert ``empty`` (if given) gets
    none. For :func:`routed_batch`."""
    takers = [e for e in range(experts) if e != empty]
    base, extra = divmod(n, len(takers))
    counts = [0] * experts
    for i, e in enumerate(takers):
        counts[e] = base + (i < extra)
    return counts


def routed_batch(gen: torch.Generator, counts: list[int], dim: int, *, weighted: bool = True, order: str = "shuffled",
                 dtype: torch.dtype = torch.float32):
    """``(x [n, dim], expert_ids int64 [n], weights [n] or None)``: rows routed so that expert e gets exactly
    ``counts[e]`` rows, in random order (``order="shuffled"``) or grouped by expert (``"sorted"``). Features of very
    different scales (a factor exp(N(0, 1)) per column, as in activations), x rounded to ``dtype`` last; routing
    weights in [0, 2) with ~10% exactly 0 when ``weighted``, else None."""
    if order not in ("shuffled", "sorted"):
        raise ValueError(f"order: expected 'shuffled' or 'sorted', got {order!r}")
    ids = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts)])
    if order == "shuffled":
        ids = ids[torch.randperm(ids.numel(), generator=gen)]
    n = ids.numel()
    x = torch.randn(n, dim, generator=gen) * torch.exp(torch.randn(dim, generator=gen))
    w = None
    if weighted:
        w = torch.rand(n, generator=gen) * 2.0
        w[torch.rand(n, generator=gen) < 0.1] = 0.0
    return x.to(dtype), ids, w


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


def redraw_experts(model, scale: float = 1.0, bias_std: float = 0.5, seed: int = 1) -> None:
    """Re-draws the fused routed experts of every MoE layer of ``model`` in place with std ``scale / sqrt(fan_in)``
    (biases: ``bias_std``), so that activations stay O(1) in a random model (``torch.Generator`` seeded ``seed``)."""
    from moequant.models import detect_family
    from moequant.models.base import STANDARD

    fam = detect_family(model.config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fam.layers(model):
            ex = fam.experts_of(layer)
            if ex is None:
                continue
            for p in ex.parameters(recurse=False):
                fan_in = p.shape[-1] if fam.layout == STANDARD else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) * (scale / fan_in ** 0.5 if p.dim() == 3 else bias_std))
