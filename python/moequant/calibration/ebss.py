"""EBSS -- expert-balanced self-sampling of calibration data (MoEQuant, arXiv 2505.03804, §1.2 of the reference).

The model generates its own calibration sequences with a beam search whose score trades likelihood against the
balance of expert usage (lower is better)::

    score(S || v) = -(R_S + log P(v | S)) / (l + 1) + sigma(S) / tau        (paper Eq. 13, "deferred")

* ``R_S`` = sum of the log-probabilities of the beam's tokens after the first (Eq. 11), ``l`` its length.
* ``sigma(S) = (1/L) sum_l std_{e, ddof=1}(u_l)`` over the L MoE layers (Eqs. 3-4), where
  ``u_l[e] = c_l[e] / (l * k)`` is the fraction of the beam's routed (token, slot) pairs that went to expert e
  in layer l (``c_l[e]`` = top-k selections of e over the beam's tokens, k = experts per token); sum_e u_l = 1.
* Deferred: sigma is that of the *parent* S (the routing of the candidate v is not known before v is fed), so
  the best w children overall are among each parent's top-w tokens by log P(v|S): expanding w parents x top-w
  tokens and keeping the w lowest scores is exact for Eq. 14 (no pass over the whole vocabulary).
* ``balance=False`` drops the sigma term: a plain length-normalised log-probability beam search (the baseline).

Departures from the paper (which leaves them open, §1.1/§1.2.3 of the reference): the normalisation of u (here
fractions of routed slots; the paper's sigma values 0.005-0.09 imply fractions), the selection direction (lowest
score, as Eqs. 9-10 minimise), special tokens are never generated (no EOS stop: every sequence has exactly
``seq_len`` tokens) and the first token is drawn uniformly from the non-special vocabulary with a seeded
generator; the final sequence of each sample is the beam with the lowest ``-R/l + sigma/tau``.

Output (:func:`write_jsonl`): one ``{"input_ids": [...]}`` line per sample, read by :mod:`moequant.calibration.data` as
``calibration.jsonl_files``, and a sidecar ``<file>.meta.json`` with the settings and per-sample statistics. Both
are written atomically (temporary file, renamed into place; a failure removes both); :func:`run` (the CLI) refuses
an existing output instead of overwriting it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from .capture import ExpertCapture

logger = logging.getLogger(__name__)

__all__ = ["EbssConfig", "EbssResult", "expert_balance", "expert_usage", "generate", "write_jsonl", "run"]


@dataclasses.dataclass
class EbssConfig:
    """Settings of :func:`generate` (defaults: the paper's tau = 1.2, w = 4; 128 x 512 tokens)."""

    num_samples: int = 128
    seq_len: int = 512
    beam: int = 4
    tau: float = 1.2
    balance: bool = True
    seed: int = 0
    batch_size: int = 8  # samples generated together (batch_size * beam rows per forward)

    def __post_init__(self) -> None:
        for name in ("num_samples", "beam", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len: expected an integer >= 2, got {self.seq_len!r}")
        if not (isinstance(self.tau, (int, float)) and self.tau > 0):
            raise ValueError(f"tau: expected a number > 0, got {self.tau!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")


@dataclasses.dataclass
class EbssResult:
    """Generated sequences (lists of token ids) with their final sigma and mean negative log-likelihood."""

    sequences: list
    sigma: list
    nll: list
    config: EbssConfig
    seconds: float = 0.0


def expert_balance(counts: torch.Tensor) -> torch.Tensor:
    """sigma of routing counts ``[..., L, E]``: mean over layers of the ddof=1 std of per-layer usage fractions."""
    c = counts.double()
    u = c / c.sum(-1, keepdim=True).clamp_min(1.0)
    return u.std(-1, unbiased=True).mean(-1)


class _RoutingCounter:
    """Top-k routing counts per batch row of every MoE layer: ``counts [rows, L, E]`` (hooks on the experts)."""

    def __init__(self, model) -> None:
        from ..models import detect_family

        fam = detect_family(model.config)
        self.caps = []
        for layer in fam.layers(model):
            ex = fam.experts_of(layer)
            if ex is not None:
                i = len(self.caps)
                self.caps.append(ExpertCapture(ex, fam, accumulate=False, compute_h=False,
                                               on_batch=lambda b, i=i: self._add(i, b)))
        if not self.caps:
            raise ValueError(f"{type(model).__name__}: no MoE layer found; EBSS needs a mixture-of-experts model")
        self.num_layers, self.num_experts = len(self.caps), self.caps[0].num_experts
        self.counts: Optional[torch.Tensor] = None
        self.seq = 1  # tokens per row of the next forward (rows of hidden_states are [row, position])

    def _add(self, layer: int, batch) -> None:
        row = (batch.token_index // self.seq).cpu()
        ones = torch.ones(row.shape[0], dtype=torch.float64)
        self.counts[:, layer].index_put_((row, batch.expert_ids.long().cpu()), ones, accumulate=True)

    def __enter__(self):
        for c in self.caps:
            c.attach()
        return self

    def __exit__(self, *exc) -> None:
        for c in self.caps:
            c.remove()


@torch.no_grad()
def expert_usage(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Routing counts ``[N, L, E]`` of sequences ``[N, T]`` (one forward, no cache)."""
    dev = next(model.parameters()).device
    ctr = _RoutingCounter(model)
    ctr.counts = torch.zeros(input_ids.shape[0], ctr.num_layers, ctr.num_experts, dtype=torch.float64)
    ctr.seq = input_ids.shape[1]
    with ctr:
        model(input_ids=input_ids.to(dev), use_cache=False)
    return ctr.counts


def _allowed_tokens(model, tokenizer) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    ok = torch.ones(vocab, dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    for t in special:
        if 0 <= t < vocab:
            ok[t] = False
    return ok


@torch.no_grad()
def _generate_batch(model, ctr: _RoutingCounter, first: torch.Tensor, allowed: torch.Tensor,
                    cfg: EbssConfig) -> tuple[list, list, list]:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    n, w = first.shape[0], cfg.beam
    B = n * w
    seqs = first.repeat_interleave(w).reshape(B, 1)
    R = torch.zeros(B, dtype=torch.float64)
    ctr.counts = torch.zeros(B, ctr.num_layers, ctr.num_experts, dtype=torch.float64)
    ctr.seq = 1
    cache = DynamicCache()
    vocab_mask = torch.full((int(model.config.vocab_size),), float("-inf"))
    vocab_mask[:allowed.numel()][allowed] = 0.0
    vocab_mask = vocab_mask.to(dev)
    out = model(input_ids=seqs.to(dev), past_key_values=cache, use_cache=True)
    k = min(w, int(allowed.sum()))
    for step in range(cfg.seq_len - 1):
        logp = torch.log_softmax(out.logits[:, -1].float(), -1) + vocab_mask[: out.logits.shape[-1]]
        vals, idx = logp.topk(k, dim=-1)
        vals, idx = vals.double().cpu(), idx.cpu()
        l = seqs.shape[1]
        score = -(R[:, None] + vals) / (l + 1)
        if cfg.balance:
            score = score + (expert_balance(ctr.counts) / cfg.tau)[:, None]
        if step == 0:  # all beams of a sample hold the same first token: expand only beam 0
            score.view(n, w, k)[:, 1:] = float("inf")
        sel = torch.argsort(score.reshape(n, w * k), dim=1, stable=True)[:, :w]
        parent = (sel // k + torch.arange(n)[:, None] * w).reshape(B)
        token = idx.reshape(n, w * k).gather(1, sel).reshape(B)
        R = (R[:, None] + vals).reshape(n, w * k).gather(1, sel).reshape(B)
        seqs = torch.cat([seqs[parent], token[:, None]], 1)
        ctr.counts = ctr.counts[parent]
        cache.reorder_cache(parent.to(dev))
        out = model(input_ids=token[:, None].to(dev), past_key_values=cache, use_cache=True)
    L = seqs.shape[1]
    sigma = expert_balance(ctr.counts)
    final = -R / L + (sigma / cfg.tau if cfg.balance else 0.0)
    best = torch.argsort(final.view(n, w), dim=1, stable=True)[:, 0] + torch.arange(n) * w
    return ([seqs[b].tolist() for b in best.tolist()], [float(sigma[b]) for b in best.tolist()],
            [float(-R[b] / (L - 1)) for b in best.tolist()])


@torch.no_grad()
def generate(model, tokenizer=None, config: Optional[EbssConfig] = None, **kwargs) -> EbssResult:
    """Generates ``config.num_samples`` sequences of ``config.seq_len`` tokens from ``model`` (a loaded
    ``*ForCausalLM`` MoE with a supported family) by EBSS beam search; ``kwargs`` override config fields.
    ``tokenizer`` (optional) excludes its special tokens and bounds the vocabulary."""
    cfg = dataclasses.replace(config or EbssConfig(), **kwargs)
    t0 = time.time()
    was_training = model.training
    model.eval()
    allowed = _allowed_tokens(model, tokenizer)
    pool = allowed.nonzero().flatten()
    if pool.numel() == 0:
        raise ValueError("tokenizer: no non-special token left to sample the first token from")
    gen = torch.Generator().manual_seed(cfg.seed)
    firsts = pool[torch.randint(pool.numel(), (cfg.num_samples,), generator=gen)]
    ctr = _RoutingCounter(model)
    seqs, sigma, nll = [], [], []
    try:
        with ctr:
            for i in range(0, cfg.num_samples, cfg.batch_size):
                s, g, n = _generate_batch(model, ctr, firsts[i:i + cfg.batch_size], allowed, cfg)
                seqs += s
                sigma += g
                nll += n
                logger.info("EBSS: %d/%d samples", len(seqs), cfg.num_samples)
    finally:
        model.train(was_training)
    return EbssResult(sequences=seqs, sigma=sigma, nll=nll, config=cfg, seconds=round(time.time() - t0, 3))


def write_jsonl(result: EbssResult, path: str | os.PathLike, extra_meta: Optional[dict] = None, *,
                overwrite: bool = True) -> Path:
    """Writes ``{"input_ids": [...]}`` lines to ``path`` and the settings to ``<path>.meta.json``, each atomically
    (an exception or a kill never leaves a partial file; an exception leaves neither). ``overwrite=False`` raises
    FileExistsError if ``path`` exists (also if it appears while writing) and leaves it untouched."""
    from ..io.files import atomic_write

    p = Path(path)
    if not overwrite and (p.exists() or p.is_symlink()):
        raise FileExistsError(f"{p} already exists; choose another output path or delete it")

    def write_lines(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for s in result.sequences:
                f.write(json.dumps({"input_ids": [int(t) for t in s]}) + "\n")

    n = max(len(result.sigma), 1)
    meta = {"generator": "moequant.ebss", "score": "-(R+logP)/(l+1) + sigma/tau (sigma of the parent; lower wins)",
            "sigma": "mean over MoE layers of std(ddof=1) over experts of routed-slot fractions",
            **dataclasses.asdict(result.config), "seconds": result.seconds,
            "mean_sigma": sum(result.sigma) / n, "mean_nll": sum(result.nll) / n,
            "per_sample": [{"sigma": g, "nll": x} for g, x in zip(result.sigma, result.nll)], **(extra_meta or {})}
    meta_text = json.dumps(meta, indent=2) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, write_lines, overwrite=overwrite)
    try:
        atomic_write(p.with_name(p.name + ".meta.json"), lambda tmp: tmp.write_text(meta_text, encoding="utf-8"))
    except BaseException:
        p.unlink(missing_ok=True)  # all or nothing: no JSONL without its sidecar
        raise
    return p


def run(model_dir: str | os.PathLike, out: str | os.PathLike, *, device: Optional[str] = None,
        overwrite: bool = False, **kwargs) -> EbssResult:
    """Loads a local checkpoint (float32 on the CPU, its dtype on a GPU), generates and writes ``out``.

    An existing ``out`` raises FileExistsError before any work (``overwrite=True`` replaces it)."""
    import transformers

    from ..recipe.device import resolve_device

    out_path = Path(out)
    if not overwrite and (out_path.exists() or out_path.is_symlink()):
        raise FileExistsError(f"{out_path} already exists; choose another output path or delete it")
    dev = resolve_device(device)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.float32 if dev.type == "cpu" else "auto"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev)
    res = generate(model, tok, EbssConfig(**kwargs))
    write_jsonl(res, out, {"model": str(Path(model_dir).resolve())}, overwrite=overwrite)
    return res
