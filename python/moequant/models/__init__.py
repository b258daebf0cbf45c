"""The models moequant reads: declarative MoE family adapters (:mod:`moequant.models.base` for the layouts,
:mod:`moequant.models.families` for the entries) and lazy, layer-at-a-time loading (:mod:`moequant.models.lazy`:
:class:`LazyModel`, :func:`layer_plan`, :func:`record_layer_inputs`)."""
from .base import (
    STANDARD,
    TRANSPOSED,
    ExpertTensors,
    MoEFamily,
    get_path,
    glu_act_fn,
    glu_gpt_oss,
    intermediate_size,
    linear_modules,
    num_experts,
    fuse_experts,
    split_expert,
    split_expert_tensors,
    text_config,
)
from .families import FAMILIES, detect_family, supported_model_types
from .lazy import LazyModel, layer_plan, record_layer_inputs

__all__ = [
    "STANDARD", "TRANSPOSED", "ExpertTensors", "MoEFamily", "FAMILIES", "detect_family", "get_path",
    "glu_act_fn", "glu_gpt_oss", "intermediate_size", "linear_modules", "num_experts", "split_expert",
    "split_expert_tensors", "fuse_experts",
    "supported_model_types", "text_config", "LazyModel", "layer_plan", "record_layer_inputs",
]
