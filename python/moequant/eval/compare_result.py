"""The result of :func:`moequant.eval.compare.compare` (definitions in that module's docstring): saved as JSON
(``moequant_compare.json`` in the quantized checkpoint by ``moequant compare``), read back by ``moequant report``."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

__all__ = ["LayerDiff", "CompareResult", "load_compare"]


@dataclasses.dataclass
class LayerDiff:
    """One decoder layer: hidden-state errors (None when not comparable or not measured) and, for a MoE layer,
    routing drift and expert loads (shares of the routed slots, base and quantized)."""

    index: int
    prefix: str
    moe: bool
    hidden_drift: Optional[float] = None
    layer_error: Optional[float] = None
    update_error: Optional[float] = None
    topk_changed: Optional[float] = None
    top1_flip: Optional[float] = None
    overlap: Optional[float] = None
    load_base: list = dataclasses.field(default_factory=list)
    load_quant: list = dataclasses.field(default_factory=list)

    @property
    def load_change(self) -> list:
        """Per expert: quantized load minus base load (shares of the routed slots)."""
        return [q - b for b, q in zip(self.load_base, self.load_quant)]


@dataclasses.dataclass
class CompareResult:
    """Per-token fidelity (``tokens`` next-token predictions), per-layer errors and routing drift."""

    base: str
    quant: str
    text: Optional[str]
    device: str
    dtype: str
    seq_len: int
    windows: int
    tokens: int
    kl_mean: float
    kl_median: Optional[float]
    kl_p90: Optional[float]
    kl_p99: Optional[float]
    kl_max: float
    top1_agreement: float
    ppl_base: float
    ppl_quant: float
    error_windows: int = 0
    same_basis: bool = True
    kl_hist_edges: list = dataclasses.field(default_factory=list)
    kl_hist: list = dataclasses.field(default_factory=list)
    layers: list = dataclasses.field(default_factory=list)  # LayerDiff
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CompareResult":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(LayerDiff)}
        d["layers"] = [LayerDiff(**{k: v for k, v in x.items() if k in names}) for x in d.get("layers", [])]
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def save(self, path: str | os.PathLike) -> None:
        from ..io.files import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @property
    def moe_layers(self) -> list:
        return [x for x in self.layers if x.moe]

    def worst_layer(self, key: str) -> Optional[LayerDiff]:
        """The layer with the largest value of ``key`` (``"topk_changed"``, ``"layer_error"``, ...), if any."""
        cands = [x for x in self.layers if getattr(x, key) is not None]
        return max(cands, key=lambda x: getattr(x, key)) if cands else None

    def summary(self) -> str:
        """Plain text: the per-token figures, then one line per layer."""
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines = [f"compare: {self.quant} against {self.base}",
                 f"  {self.tokens} tokens ({self.windows} windows of {self.seq_len}) of {self.text or 'token ids'} on "
                 f"{self.device} ({self.dtype}), {self.seconds:.1f} s",
                 f"  KL(base || quant) per token: mean {self.kl_mean:.5f}, median {f(self.kl_median, '.5f')}, "
                 f"p99 {f(self.kl_p99, '.4f')}, max {self.kl_max:.3f} nats",
                 f"  top-1 agreement {self.top1_agreement:.4f}; perplexity base {self.ppl_base:.4f}, quantized "
                 f"{self.ppl_quant:.4f} ({100 * (self.ppl_quant / self.ppl_base - 1):+.2f}%)"]
        if not self.same_basis:
            lines.append("  hidden-state errors left out: the residual streams are in different bases (rotation)")
        lines.append(f"  {'layer':>5}  {'hidden drift':>12}  {'layer error':>11}  {'update err':>10}  "
                     f"{'top-k changed':>13}  {'top-1 flip':>10}  {'max load change':>15}")
        for x in self.layers:
            ch = x.load_change
            big = max(range(len(ch)), key=lambda e: abs(ch[e])) if ch else None
            load = "-" if big is None else f"e{big} {100 * ch[big]:+.2f}pt"
            lines.append(f"  {x.index:>5}  {f(x.hidden_drift, '12.5f')}  {f(x.layer_error, '11.5f')}  "
                         f"{f(x.update_error, '10.4f')}  {f(x.topk_changed, '13.4f')}  {f(x.top1_flip, '10.4f')}  "
                         f"{load:>15}")
        if self.error_windows:
            lines.append(f"  (layer / update error on the first {self.error_windows} windows)")
        return "\n".join(lines)


def load_compare(path: str | os.PathLike) -> CompareResult:
    """A saved :class:`CompareResult`; ValueError naming the file when it is not one."""
    try:
        return CompareResult.from_dict(json.loads(open(path).read()))
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: not a moequant compare result ({type(exc).__name__}: {exc}); rerun moequant "
                         f"compare") from None
