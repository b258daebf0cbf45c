"""Perplexity evaluation with the project's reference protocol (shared/tools/ref_baseline.py).

Protocol: the whole text file is tokenized once; non-overlapping windows of ``seq_len`` tokens start at
``i = 0, seq_len, 2*seq_len, ...`` while ``i < len(ids) - seq_len`` (so the tail -- and a last full window that
ends exactly at the end of the text -- is dropped); each window contributes the summed cross-entropy of its
``seq_len - 1`` next-token predictions, computed from fp32 logits; perplexity = exp(total_nll / total_count).
Batching windows does not change the result (each window is an independent sequence, no padding).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["load_token_ids", "perplexity", "window_starts"]

logger = logging.getLogger(__name__)


def load_token_ids(tokenizer_or_path: Any, text_file: str | os.PathLike, seq_len: int | None = 512) -> torch.Tensor:
    """Tokenizes a whole text file: returns int64 ``[n_tokens]``.

    Args:
        tokenizer_or_path: a Hugging Face tokenizer (callable returning ``{"input_ids": [...]}``) or a path/name
            for ``transformers.AutoTokenizer.from_pretrained``.
        text_file: UTF-8 text file.
        seq_len: if given, at least ``seq_len + 1`` tokens are required (one evaluation window); None skips
            the check.
    """
    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text {path} not found; pass an existing UTF-8 text file")
    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_or_path))
    else:
        tokenizer = tokenizer_or_path
    from ..calibration.data import read_utf8  # not UTF-8: ValueError naming the file and the byte offset

    ids = torch.tensor(tokenizer(read_utf8(path, "evaluation text"))["input_ids"], dtype=torch.long)
    if seq_len is not None and ids.numel() < seq_len + 1:
        raise ValueError(
            f"{path} yields {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1} needed for one evaluation "
            "window; use a longer text or a smaller seq_len"
        )
    return ids


def window_starts(n_tokens: int, seq_len: int) -> range:
    """Start offsets of the evaluation windows (exactly ``range(0, n_tokens - seq_len, seq_len)``)."""
    return range(0, n_tokens - seq_len, seq_len)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _progress(total: int, enabled: bool):
    """A tqdm bar when available, else None (callers fall back to logging)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="perplexity", unit="window")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of a causal LM over ``token_ids`` (int ``[n]``) with the reference protocol.

    Args:
        model: callable as ``model(input_ids=[B, seq_len]) -> .logits [B, seq_len, vocab]`` (any dtype).
        token_ids: the tokenized text, 1-D.
        seq_len: window length (the reference uses 512).
        batch_size: windows per forward pass.
        device: where to run the windows (default: the device of the model's first parameter).
        progress: show a tqdm bar (or log every ~10% when tqdm is missing).
    Returns:
        ``exp(total_nll / total_count)`` with ``total_count = n_windows * (seq_len - 1)``.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids: expected a 1-D tensor, got shape {tuple(token_ids.shape)}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len >= 2 and batch_size >= 1 expected, got seq_len={seq_len}, batch_size={batch_size}")
    starts = list(window_starts(token_ids.numel(), seq_len))
    if not starts:
        raise ValueError(
            f"token_ids has {token_ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a longer text or a smaller seq_len"
        )
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    ids = token_ids.to(torch.long)
    total_nll, total_count = 0.0, 0
    bar = _progress(len(starts), progress)
    t0, next_log = time.monotonic(), 0.1
    try:
        for b in range(0, len(starts), batch_size):
            batch = torch.stack([ids[i : i + seq_len] for i in starts[b : b + batch_size]]).to(device)
            logits = model(input_ids=batch).logits
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll.item())
            total_count += batch.shape[0] * (seq_len - 1)
            done = min(b + batch_size, len(starts))
            if bar is not None:
                bar.update(batch.shape[0])
            elif progress and done / len(starts) >= next_log:
                logger.info("perplexity: %d/%d windows (%.0f s)", done, len(starts), time.monotonic() - t0)
                next_log += 0.1
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    ppl = math.exp(total_nll / total_count)
    logger.info("perplexity %.4f over %d windows of %d tokens (%.1f s)", ppl, len(starts), seq_len,
                time.monotonic() - t0)  # fmt: skip
    return ppl
