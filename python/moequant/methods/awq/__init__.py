"""AWQ (activation-aware weight quantization) before the solve: its recipe section (:class:`AWQConfig`), the math
(:mod:`~moequant.methods.awq.search`), the layer orchestration (:mod:`~moequant.methods.awq.layer` stage 1,
:mod:`~moequant.methods.awq.pairs` stages 2-3, sharing :class:`~moequant.methods.awq.context.AWQContext`) and the
pipeline adapter (:class:`AWQTransform`). Twins: :func:`moequant.ref.fake_quantize_ref`,
:func:`moequant.ref.search_clip_ref`."""
from .config import AWQConfig
from .layer import AWQLayerResult, apply_awq
from .transform import AWQTransform

__all__ = ["AWQConfig", "AWQLayerResult", "apply_awq", "AWQTransform"]
