"""GPTAQ-style asymmetric calibration of the routed experts' down_proj: its recipe section
(:class:`GPTAQConfig`); the math is :mod:`moequant.ops.gptaq` (twin :mod:`moequant.ref.gptaq`), the orchestration
:mod:`moequant.pipeline.gptaq`."""
from .config import GPTAQConfig

__all__ = ["GPTAQConfig"]
