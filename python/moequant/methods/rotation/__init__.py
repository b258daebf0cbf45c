"""Offline rotation of the residual stream (QuaRot R1): its recipe section (:class:`RotationConfig`), the math
(:mod:`~moequant.methods.rotation.rotate`) and the pipeline adapter (:class:`RotationTransform`,
:mod:`~moequant.methods.rotation.adapter`). Twin: :mod:`moequant.ref.rotation`."""
from .adapter import PipelineRotation, RotationTransform, rotated_export_tensors
from .config import RotationConfig
from .rotate import (DenseRotation, HadamardRotation, Rotation, RotationPlan, hadamard_size_supported,
                     hidden_size_of, norm_gain, random_hadamard, rotate_globals_, rotate_layer_, rotate_model_,
                     rotation_plan)

__all__ = ["RotationConfig", "RotationTransform", "PipelineRotation", "rotated_export_tensors", "Rotation",
           "HadamardRotation", "DenseRotation", "random_hadamard", "hadamard_size_supported", "RotationPlan",
           "rotation_plan", "rotate_layer_", "rotate_globals_", "rotate_model_", "norm_gain", "hidden_size_of"]
