"""Loading a model for evaluation: plain transformers where it reads the checkpoint, else moequant's own
dequantizing loader (:func:`moequant.io.exported.load_model`); :func:`choose_loader` decides from
:mod:`moequant.io.compat`."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

__all__ = ["load_model", "choose_loader", "simulation_of", "LOADERS"]

logger = logging.getLogger(__name__)

LOADERS = ("auto", "transformers", "moequant")


def choose_loader(model_dir: str | os.PathLike, loader: str = "auto") -> tuple[str, str]:
    """``(loader, why)``: how :func:`load_model` reads ``model_dir``. ``"auto"`` is transformers, unless
    :mod:`moequant.io.compat` says transformers cannot read the checkpoint (asymmetric schemes, different expert
    schemes per layer, the quantized experts of GPT-OSS / GraniteMoE): then moequant's own loader."""
    if loader not in LOADERS:
        raise ValueError(f"loader: expected one of {', '.join(LOADERS)}, got {loader!r}")
    if loader != "auto":
        return loader, "requested"
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if "quantization_config" not in config:
        return "transformers", "not quantized"
    from ..io.compat import loader_support
    from ..io.exported import checkpoint_schemes, fused_expert_layers

    _, schemes = checkpoint_schemes(model_dir)
    family = _family(model_dir)
    tf = loader_support(family, schemes, "pack-quantized", fused_expert_layers(model_dir, family))[0]
    if tf.loads:
        return "transformers", "transformers reads this checkpoint"
    return "moequant", "; ".join(tf.reasons)


def _family(model_dir):
    import transformers

    from ..models import detect_family

    return detect_family(transformers.AutoConfig.from_pretrained(str(model_dir)))


def load_model(model_dir: str | os.PathLike, device: torch.device | str = "cpu", loader: str = "auto",
               simulate: bool = True) -> torch.nn.Module:
    """A causal LM ready for :func:`perplexity`: bf16 weights on a GPU; on the CPU, where bf16 matmuls are slow,
    float32 holding exactly the bf16 values. Quantized checkpoints are dequantized at load time: by transformers
    and compressed-tensors (its dense Linears are decompressed in bf16 before any cast, so that the float32 copy
    holds the bf16 weights a GPU would use) or, for what transformers cannot read, by
    :func:`moequant.io.exported.load_model` (see :func:`choose_loader`).

    ``simulate`` (default): the model also quantizes what the checkpoint's runtime quantizes besides the weights
    -- the inputs of the Linears and routed experts of W8A8 / W4A4 schemes and the FP8 KV cache
    (:mod:`moequant.eval.simulate`) -- so that its perplexity is the deployed model's; False: the weights alone.
    Either way compressed-tensors' own fake quantization (dense Linears only) is off, and
    :func:`simulation_of` tells what is simulated."""
    import transformers

    from .simulate import Simulation, SimulationPlan

    try:  # what to simulate, read before the model
        plan = SimulationPlan.from_checkpoint(model_dir)
    except ValueError as exc:  # a checkpoint moequant did not write, in a format it does not read
        if simulate:
            raise ValueError(f"{exc}; evaluate its weights alone with simulate=False (--no-simulate-activations)"
                             ) from None
        plan = SimulationPlan()
    which, why = choose_loader(model_dir, loader)
    on_gpu = str(device).startswith("cuda")
    logger.info("loading %s with the %s loader (%s)", model_dir, which, why)
    if which == "moequant":
        from ..io.exported import load_model as load_exported

        model = load_exported(model_dir, dtype=torch.bfloat16, device="cpu")
        if not on_gpu:
            model.config._experts_implementation = "eager"
    else:
        extra = {} if on_gpu else {"experts_implementation": "eager"}  # eager experts are fastest on CPUs
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, **extra)
        # compressed-tensors keeps dense Linears packed until their first forward; decompress them now, in bf16
        # (CompressedTensorsConfig(dequantize=True) would decompress every dense module with one config group).
        compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
        if compressor is not None:
            compressor.decompress_model(model)
            # compressed-tensors would fake-quantize the inputs of the dense Linears only (not the routed experts')
            # and the KV cache; moequant's simulation (below) does all of them, the same for both loaders
            from compressed_tensors.quantization import disable_quantization

            model.apply(disable_quantization)
        _remove_offloading(model)
    # nn.Module.float is called directly: transformers refuses .float() on a model loaded from a quantized
    # checkpoint, although its weights are plain bf16 tensors here.
    model = (model if on_gpu else torch.nn.Module.float(model)).to(device).eval()
    sim = None if plan.empty else Simulation(model, _family(model_dir), plan)
    if sim is not None and simulate:
        sim.attach()
    model.moequant_simulation = sim
    return model


def _remove_offloading(model: torch.nn.Module) -> None:
    """Plain modules again where compressed-tensors' loader wrapped them in its offloading (FP8 checkpoints, with
    compressed-tensors >= 0.20: parameters held in an ``OffloadCache`` that onloads to the CPU in every forward, so
    that a later ``model.to("cuda")`` leaves the forwards, and the logits, on the CPU)."""
    try:
        from compressed_tensors.offload import remove_dispatch
    except ImportError:  # older compressed-tensors: no offloading of its own
        return
    remove_dispatch(model, onload_tensors=True)


def simulation_of(model: torch.nn.Module):
    """The :class:`~moequant.eval.simulate.Simulation` of a model :func:`load_model` returned (attached when
    it simulates), None when its checkpoint quantizes nothing but weights."""
    return getattr(model, "moequant_simulation", None)

