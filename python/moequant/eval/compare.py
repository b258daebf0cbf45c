"""What quantization did to a model, measured on text: :func:`compare` (``moequant compare BASE QUANT --text FILE``).

Both models stream through the device one decoder layer at a time (:class:`~moequant.models.LazyModel`; a
quantized checkpoint through :class:`~moequant.io.exported.ExportedCheckpoint`, which dequantizes any
compressed-tensors ``pack-quantized`` checkpoint, moequant's or llm-compressor's), in lockstep, each on its own
hidden states: the base stream ``h`` (the original model) and the quantized stream ``hq`` (the quantized model,
exactly as it would run when deployed). Windows follow the perplexity protocol of :mod:`moequant.eval.ppl`
(non-overlapping ``seq_len`` windows, ``seq_len - 1`` predictions each); ``tokens`` counts those predictions.

Measured (definitions; :class:`CompareResult`, :class:`LayerDiff`):

* per token, from fp32 log-probabilities of both models (computed in chunks of windows): ``KL(P_base || P_quant)``
  (nats; mean, median, p90, p99, max and a histogram), top-1 agreement (the two argmax tokens are equal) and the
  perplexity of each model (equal to :func:`~moequant.eval.perplexity` of each);
* per layer ``i``: ``hidden_drift`` ``||hq_{i+1} - h_{i+1}|| / ||h_{i+1}||`` (how far the quantized stream has moved
  after the layer: all errors so far) and the layer's own error on the quantized stream's inputs ``x = hq_i``:
  ``layer_error`` ``||Q_i(x) - B_i(x)|| / ||B_i(x)||`` (the layer output, residual included) and ``update_error``
  ``||Q_i(x) - B_i(x)|| / ||B_i(x) - x||`` (relative to what the layer adds to the residual stream), Frobenius
  norms over the first ``error_windows`` windows (rounded up to whole batches; the base layer runs once more on
  them);
* per MoE layer, routing drift between the base model on ``h`` and the quantized model on ``hq`` (the routers are
  not quantized: drift comes from the hidden states): ``topk_changed`` the fraction of tokens whose top-k expert set
  differs, ``top1_flip`` the fraction whose highest-weight expert differs, ``overlap`` the mean fraction of the k
  experts kept, and each expert's load (its share of the routed slots) in both models.

A quantized checkpoint whose residual stream is in another basis (an offline rotation: its embeddings differ from
the base's) has no comparable hidden states: its hidden-state metrics are None (``same_basis`` False).
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.head import final_hidden
from .compare_result import CompareResult, LayerDiff

__all__ = ["compare", "CompareResult", "LayerDiff", "open_model", "COMPARE_FILE"]

logger = logging.getLogger(__name__)

COMPARE_FILE = "moequant_compare.json"
_HEAD_ELEMENTS = 1 << 26  # logits per chunk of the head (fp32: 256 MiB per model)


def open_model(model_dir: str | os.PathLike, dtype: torch.dtype, experts_implementation: Optional[str] = None):
    """A :class:`~moequant.models.LazyModel` of an original checkpoint or of a compressed-tensors one in a format
    moequant writes (dequantized on load by :class:`~moequant.io.exported.ExportedCheckpoint`: the weights alone, the
    activation quantization of W8A8 / W4A4 schemes is not simulated); ValueError for other quantization formats."""
    from ..formats import config_groups
    from ..io.exported import ExportedCheckpoint
    from ..models.lazy import LazyModel

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no config.json; pass a Hugging Face model directory")
    qcfg = json.loads((d / "config.json").read_text()).get("quantization_config")
    if not qcfg:
        return LazyModel(d, dtype=dtype, experts_implementation=experts_implementation)
    why = None
    if qcfg.get("quant_method") != "compressed-tensors":
        why = f"quantization {qcfg.get('quant_method')!r} format {qcfg.get('format')!r}"
    else:
        try:
            config_groups(qcfg)
        except ValueError as exc:
            why = str(exc)
    if why is not None:
        raise ValueError(f"{d}: {why} is not read; compare reads unquantized checkpoints and the compressed-tensors "
                         f"formats moequant writes (pack-quantized, int-quantized, float-quantized, "
                         f"nvfp4-pack-quantized, mxfp4-pack-quantized; llm-compressor's W4A16 / W8A16 too)")
    return LazyModel(d, dtype=dtype, experts_implementation=experts_implementation, reader=ExportedCheckpoint(d))


def _check_same_model(base, quant) -> None:
    from ..models import text_config

    a, b = text_config(base.config), text_config(quant.config)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "num_experts", "num_local_experts",
            "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size")
    for k in keys:
        if getattr(a, k, None) != getattr(b, k, None):
            raise ValueError(f"{base.dir} and {quant.dir} are not the same model ({k}: {getattr(a, k, None)} vs "
                             f"{getattr(b, k, None)}); pass the original checkpoint QUANT was quantized from")


@torch.no_grad()
def _logits(lazy, input_ids: torch.Tensor, hidden: torch.Tensor, device) -> torch.Tensor:
    """The model's logits for final hidden states ``hidden`` ``[B, S, H]``: its own forward (embeddings, final norm,
    lm_head, any logit scaling) with the decoder layers replaced by ``hidden``."""
    with final_hidden(lazy, hidden):
        lazy.model.to(device)
        return lazy.model(input_ids=input_ids.to(device), use_cache=False).logits


class _Routing:
    """Forward pre-hook on a fused experts module keeping ``(top_k_index [T, k], top-1 expert [T])`` of its calls
    (the arguments :class:`~moequant.calibration.capture.ExpertsCall` binds)."""

    def __init__(self, experts: nn.Module):
        from ..calibration.capture import ExpertsCall

        self.call, self.calls, self.enabled = ExpertsCall(experts), [], True
        self.handle = experts.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.enabled:
            return
        hs, idx, w = self.call.bind(args, kwargs)
        idx = idx.reshape(-1, idx.shape[-1]).long()
        w = w.reshape(idx.shape[0], -1)
        if w.shape[1] != idx.shape[1]:  # dense [T, E] scores: the weights of the chosen slots
            w = w.gather(1, idx.clamp(0, w.shape[1] - 1))
        self.calls.append((idx, idx.gather(1, w.argmax(1, keepdim=True)).squeeze(1)))

    def take(self):
        out = self.calls
        self.calls = []
        return torch.cat([c[0] for c in out]), torch.cat([c[1] for c in out])


class _Drift:
    """Routing drift of one MoE layer, summed over batches on the device."""

    def __init__(self, num_experts: int, device):
        self.e = num_experts
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.changed, self.flips, self.overlap, self.tokens = z(), z(), z(), 0
        self.load = [torch.zeros(num_experts, dtype=torch.float64, device=device) for _ in range(2)]

    def add(self, base: tuple, quant: tuple) -> None:
        (ib, tb), (iq, tq) = base, quant
        self.tokens += ib.shape[0]
        self.changed += (ib.sort(1).values != iq.sort(1).values).any(1).sum()
        self.flips += (tb != tq).sum()
        self.overlap += (ib[:, :, None] == iq[:, None, :]).any(2).sum() / ib.shape[1]
        for acc, i in zip(self.load, (ib, iq)):
            i = i[(i >= 0) & (i < self.e)]
            acc += torch.bincount(i, minlength=self.e)[: self.e]

    def result(self) -> dict:
        n = max(self.tokens, 1)
        loads = [(c / c.sum().clamp_min(1)).tolist() for c in self.load]
        return dict(topk_changed=float(self.changed) / n, top1_flip=float(self.flips) / n,
                    overlap=float(self.overlap) / n, load_base=loads[0], load_quant=loads[1])


class _Norms:
    """Sums of squared Frobenius norms (float64 on the device)."""

    def __init__(self, device, *names):
        self.s = {n: torch.zeros((), dtype=torch.float64, device=device) for n in names}

    def add(self, name: str, t: torch.Tensor) -> None:
        self.s[name] += t.double().pow(2).sum()

    def ratio(self, num: str, den: str) -> Optional[float]:
        d = float(self.s[den])
        return (float(self.s[num]) / d) ** 0.5 if d > 0 else None


def _forward(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    y = layer(h, **kw)
    return y[0] if isinstance(y, tuple) else y


class _LayerLoader:
    """Layer ``i`` of both models on the device; layer ``i + 1`` is read into host memory meanwhile."""

    def __init__(self, models: tuple, device):
        self.models, self.device = models, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moequant-compare")
        self.next = None

    def _read(self, i: int):
        return [m.load_layer(i, "cpu") for m in self.models]

    def get(self, i: int) -> list:
        layers = self.next.result() if self.next is not None else self._read(i)
        n = self.models[0].num_layers
        self.next = self.pool.submit(self._read, i + 1) if i + 1 < n else None
        return [m.place_layer(layer, self.device) for m, layer in zip(self.models, layers)]

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="compare", unit="layer", dynamic_ncols=True)


@torch.no_grad()
def compare(base: str | os.PathLike, quant: str | os.PathLike, text: str | os.PathLike | None = None, *,
            token_ids: Optional[torch.Tensor] = None, seq_len: int = 512, max_windows: Optional[int] = None,
            batch_size: int = 8, error_windows: Optional[int] = 8, device: torch.device | str | None = None,
            progress: bool = True) -> CompareResult:
    """Compares a quantized checkpoint ``quant`` with its original ``base`` on held-out text (module docstring).

    Args:
        base, quant: checkpoint directories (``quant``: moequant's pack-quantized or dequantized output, an
            llm-compressor pack-quantized checkpoint, or any checkpoint of the same model).
        text: a UTF-8 text file, tokenized with ``base``'s tokenizer; or ``token_ids`` (int ``[n]``) instead.
        seq_len, max_windows, batch_size: windows of the perplexity protocol (at most ``max_windows``), per batch.
        error_windows: windows the per-layer output error is measured on (None: all; 0: not measured).
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: cuda when available). Layers compute in float32 on the CPU,
            in the checkpoint's dtype on a GPU.
    Returns: :class:`CompareResult` (``.save(path)``, ``.summary()``).
    """
    from ..calibration.data import load_tokenizer
    from ..models.lazy import config_dtype, record_layer_inputs
    from .ppl import load_token_ids, window_starts

    t0 = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if seq_len < 2 or batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"seq_len >= 2, batch_size >= 1 and max_windows >= 1 expected, got seq_len={seq_len}, "
                         f"batch_size={batch_size}, max_windows={max_windows}")
    for d in (base, quant):
        if not (Path(d) / "config.json").is_file():
            raise FileNotFoundError(f"{d}: no config.json; pass a local Hugging Face model directory")
    if token_ids is None:
        if text is None:
            raise ValueError("compare: pass text (a UTF-8 file) or token_ids")
        token_ids = load_token_ids(load_tokenizer(base), text, seq_len=seq_len)
    import transformers

    dtype = torch.float32 if device.type == "cpu" else config_dtype(transformers.AutoConfig.from_pretrained(base))
    impl = "eager" if device.type == "cpu" else None  # eager experts are fastest on CPUs (as moequant eval)
    models = (open_model(base, dtype, impl), open_model(quant, dtype, impl))
    _check_same_model(*models)
    starts = list(window_starts(token_ids.numel(), seq_len))[:max_windows]
    if not starts:
        raise ValueError(f"{token_ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; use a longer text or "
                         f"a smaller --seq-len")
    windows = torch.stack([token_ids[s: s + seq_len] for s in starts]).long()
    batches = list(windows.split(batch_size))
    err_batches = len(batches) if error_windows is None else -(-min(error_windows, len(starts)) // batch_size)
    emb = [m.model.get_input_embeddings().weight for m in models]
    same_basis = emb[0].shape == emb[1].shape and torch.equal(emb[0], emb[1].to(emb[0].dtype))
    if not same_basis:
        logger.warning("%s: its embeddings differ from %s's (a rotated residual stream?): hidden-state errors are "
                       "not comparable and are left out", quant, base)
    inputs = [[record_layer_inputs(m, b, device) for b in batches] for m in models]
    hidden = [[r.hidden_states for r in rec] for rec in inputs]
    kwargs = [[r.kwargs_per_layer for r in rec] for rec in inputs]
    del inputs
    fam, n = models[0].family, models[0].num_layers
    loader, bar, layers_out = _LayerLoader(models, device), _progress(n + 1, progress), []
    try:
        for i in range(n):
            lb, lq = loader.get(i)
            ex = (fam.experts_of(lb), fam.experts_of(lq))
            hooks = [_Routing(e) for e in ex] if ex[0] is not None else None
            drift = _Drift(int(ex[0].gate_up_proj.shape[0]), device) if hooks else None
            norms = _Norms(device, "drift", "ref", "err", "out", "upd")
            try:
                for b in range(len(batches)):
                    hb, hq = hidden[0][b], hidden[1][b]
                    yb = _forward(lb, hb, kwargs[0][b][i])
                    yq = _forward(lq, hq, kwargs[1][b][i])
                    if hooks:
                        drift.add(hooks[0].take(), hooks[1].take())
                    if same_basis:
                        norms.add("drift", yq - yb)
                        norms.add("ref", yb)
                        if b < err_batches:  # the original layer on the quantized stream: not routing drift
                            for h in hooks or ():
                                h.enabled = False
                            yr = _forward(lb, hq, kwargs[1][b][i])
                            for h in hooks or ():
                                h.enabled = True
                            norms.add("err", yq - yr)
                            norms.add("out", yr)
                            norms.add("upd", yr - hq)
                    hidden[0][b], hidden[1][b] = yb, yq
            finally:
                for h in hooks or ():
                    h.handle.remove()
            measured = same_basis and err_batches > 0
            layers_out.append(LayerDiff(
                index=i, prefix=models[0].layer_prefix(i), moe=hooks is not None,
                hidden_drift=norms.ratio("drift", "ref") if same_basis else None,
                layer_error=norms.ratio("err", "out") if measured else None,
                update_error=norms.ratio("err", "upd") if measured else None,
                **(drift.result() if drift is not None else {})))
            del lb, lq
            if bar is not None:
                bar.update(1)
        head = _head(models, batches, hidden, device)
        if bar is not None:
            bar.update(1)
    finally:
        loader.close()
        if bar is not None:
            bar.close()
        for m in models:
            close = getattr(m.reader, "close", None)
            if close is not None:
                close()
    return CompareResult(base=str(base), quant=str(quant), text=str(text) if text is not None else None,
                         device=str(device), dtype=str(dtype).replace("torch.", ""), seq_len=seq_len,
                         windows=len(starts), error_windows=min(err_batches * batch_size, len(starts)),
                         same_basis=same_basis, layers=layers_out, seconds=round(time.time() - t0, 3), **head)


def _head(models, batches: list, hidden: list, device) -> dict:
    """Per-token KL, top-1 agreement and both perplexities from the final hidden states, in chunks of windows."""
    vocab = int(models[0].model.get_output_embeddings().weight.shape[0])
    kls, agree, nll = [], torch.zeros((), dtype=torch.float64, device=device), [0.0, 0.0]
    for b, ids in enumerate(batches):
        rows = max(1, _HEAD_ELEMENTS // (ids.shape[1] * vocab))
        for r in range(0, ids.shape[0], rows):
            chunk = ids[r: r + rows].to(device)
            lp = [F.log_softmax(_logits(m, chunk, hidden[k][b][r: r + rows], device)[:, :-1].float(), -1)
                  for k, m in enumerate(models)]
            target = chunk[:, 1:].unsqueeze(-1)
            kls.append((lp[0].exp() * (lp[0] - lp[1])).sum(-1).reshape(-1).clamp_min(0).double())
            agree += (lp[0].argmax(-1) == lp[1].argmax(-1)).sum()
            for k in range(2):
                nll[k] += -float(lp[k].gather(-1, target).double().sum())
    kl = torch.cat(kls).cpu()
    tokens = kl.numel()
    q = torch.quantile(kl.float(), torch.tensor([0.5, 0.9, 0.99])).tolist() if tokens <= 1 << 24 else [None] * 3
    edges = [10.0 ** (e / 4) for e in range(-28, 9)]  # 1e-7 .. 100 nats, 4 bins a decade
    hist = torch.histc(kl.clamp(edges[0], edges[-1]).log10().float(), bins=len(edges) - 1, min=-7.0, max=2.0)
    return dict(tokens=tokens, kl_mean=float(kl.mean()), kl_median=q[0], kl_p90=q[1], kl_p99=q[2],
                kl_max=float(kl.max()), kl_hist_edges=edges, kl_hist=[int(c) for c in hist.tolist()],
                top1_agreement=float(agree) / tokens, ppl_base=float(torch.tensor(nll[0] / tokens).exp()),
                ppl_quant=float(torch.tensor(nll[1] / tokens).exp()))
