"""Lazy, layer-at-a-time model loading from a safetensors checkpoint.

The pipeline never materialises the whole model. :class:`LazyModel` builds the transformers model on the
``meta`` device, loads only the small non-layer parts (embeddings, final norm, lm_head, rotary tables) into
memory, and hands out one decoder layer at a time with its weights read from the checkpoint
(:meth:`LazyModel.load_layer`). Checkpoint names come from the family adapter: per-expert tensors
(``...experts.{e}.gate_proj.weight``) are stacked into the fused runtime parameters (``experts.gate_up_proj``),
other names are mapped with :meth:`MoEFamily.disk_name`.

:func:`record_layer_inputs` runs the cheap part of the model's forward (embeddings, masks, rotary tables)
with every decoder layer replaced by a recorder, which yields exactly the arguments the model would pass to
each layer, for any family, without running a single layer.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import MoEFamily, detect_family, text_config

logger = logging.getLogger(__name__)

__all__ = ["CheckpointReader", "LazyModel", "LayerInputs", "record_layer_inputs"]


class CheckpointReader:
    """Reads tensors lazily, one at a time, from a single-file or sharded safetensors checkpoint."""

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            with safe_open(single, "pt") as f:
                self._where = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json; moequant reads Hugging Face "
                f"safetensors checkpoints (convert .bin checkpoints with save_pretrained(safe_serialization=True))")
        self._safe_open = safe_open
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._safe_open(path, "pt")
        return handle.get_tensor(name)


class LayerInputs:
    """What the model passes to each decoder layer for one calibration batch (recorded, not computed here)."""

    def __init__(self, hidden_states: torch.Tensor, kwargs_per_layer: list[dict]):
        self.hidden_states = hidden_states
        self.kwargs_per_layer = kwargs_per_layer


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its keyword arguments and passes hidden states through."""

    def __init__(self, like: nn.Module, sink: list):
        super().__init__()
        self._sink = sink
        for k, v in vars(like).items():  # plain attributes the model loop may read (layer_type, attention_type)
            if not k.startswith("_") and isinstance(v, (str, int, float, bool)):
                setattr(self, k, v)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("moequant: decoder layers are expected to receive keyword arguments after "
                               "hidden_states; this model's loop passes positional ones")
        self._sink.append(kwargs)
        return hidden_states


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class LazyModel:
    """A causal LM whose decoder layers are loaded from disk one at a time.

    Args:
        model_dir: a Hugging Face checkpoint directory (config.json + safetensors).
        dtype: dtype of the layers (default: the checkpoint's ``config.dtype``, else bfloat16).
    """

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                 experts_implementation: str | None = None, reader: Any = None):
        import transformers

        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.dir}: no config.json; pass a Hugging Face model directory")
        self.config = transformers.AutoConfig.from_pretrained(self.dir)
        if reader is not None and hasattr(self.config, "quantization_config"):
            del self.config.quantization_config  # the reader dequantizes: build the plain model
        self.family: MoEFamily = detect_family(self.config)
        self.dtype = dtype or _config_dtype(self.config)
        # ``reader``: where tensors come from (default the directory's safetensors files; names(), in, get()),
        # e.g. moequant.exported.ExportedCheckpoint, the source view of a quantized checkpoint.
        self.reader = reader if reader is not None else CheckpointReader(self.dir)
        # The capture hook sees the same arguments whatever experts implementation the config dispatches to.
        for attr, value in ((("_experts_implementation", experts_implementation),) if experts_implementation else ()):
            if hasattr(self.config, attr):
                setattr(self.config, attr, value)
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.eval()
        self.layers = self.family.layers(self.model)
        self._meta_layers = list(self.layers)
        self._load_non_layer_parts()

    @property
    def num_layers(self) -> int:
        return len(self._meta_layers)

    def layer_prefix(self, index: int) -> str:
        return self.family.layer_prefix(self.model, index)

    def meta_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` as built on the meta device (structure and names only, no weights)."""
        return self._meta_layers[index]

    # ------------------------------------------------------------------------------------------ non-layer parts
    def _load_non_layer_parts(self) -> None:
        layers_name = self.family.layer_prefix(self.model, 0).rsplit(".", 1)[0]
        state = {}
        for name, t in self.model.state_dict().items():
            if name.startswith(layers_name + "."):
                continue
            disk = self.family.disk_name(name)
            if disk in self.reader:
                state[name] = self.reader.get(disk).to(t.dtype)
        missing = [n for n in self.model.state_dict() if not n.startswith(layers_name + ".") and n not in state]
        tied = getattr(self.config, "tie_word_embeddings", False) or getattr(
            text_config(self.config), "tie_word_embeddings", False)
        if tied:
            missing = [n for n in missing if not n.endswith("lm_head.weight")]
        if missing:
            raise KeyError(f"{self.dir}: checkpoint tensors missing for {missing[:5]}")
        self.model.load_state_dict(state, strict=False, assign=True)
        if tied and hasattr(self.model, "get_output_embeddings") and self.model.get_output_embeddings() is not None:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        # Non-persistent buffers (rotary inverse frequencies) are computed at construction: rebuild those modules.
        for name, module in list(self.model.named_modules()):
            if name.startswith(layers_name):
                continue
            meta_bufs = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
            if not meta_bufs:
                continue
            try:
                fresh = type(module)(config=self.config)
            except TypeError as exc:
                raise ValueError(
                    f"moequant cannot rebuild module {name!r} ({type(module).__name__}) with buffers {meta_bufs}; "
                    f"this model family is not supported by the lazy loader") from exc
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, fresh)
        leftovers = [n for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
                     if t.is_meta and not n.startswith(layers_name + ".")]
        if leftovers:
            raise ValueError(f"moequant: could not materialise {leftovers[:5]} from {self.dir}")

    # ------------------------------------------------------------------------------------------ layers
    def load_layer(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Decoder layer ``index`` with its checkpoint weights, on ``device`` (a fresh module each call)."""
        import copy

        layer = copy.deepcopy(self._meta_layers[index])
        prefix = self.layer_prefix(index)
        state = self._layer_state(layer, prefix)
        layer.load_state_dict(state, strict=True, assign=True)
        still_meta = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
        if still_meta:
            raise ValueError(f"moequant: layer {index} has tensors not stored in the checkpoint "
                                      f"{still_meta[:5]}; this family is not supported by the lazy loader")
        return layer.to(device).eval()

    def _layer_state(self, layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        fam = self.family
        experts = fam.experts_of(layer)
        out: dict[str, torch.Tensor] = {}
        for name, t in layer.state_dict().items():
            full = f"{prefix}.{name}"
            leaf = name.rsplit(".", 1)[-1]
            in_experts = experts is not None and name.startswith(fam.experts + ".")
            if in_experts and not fam.disk_fused and leaf in ("gate_up_proj", "down_proj"):
                if fam.layout != "standard":
                    raise ValueError(f"{fam.name}: per-expert checkpoints of a transposed layout")
                parts = []
                for e in range(t.shape[0]):
                    names = fam.disk_expert_names(prefix, e)
                    if leaf == "gate_up_proj":
                        parts.append(torch.cat([self.reader.get(names["gate"] + ".weight"),
                                                self.reader.get(names["up"] + ".weight")], dim=0))
                    else:
                        parts.append(self.reader.get(names["down"] + ".weight"))
                out[name] = torch.stack(parts).to(t.dtype)
            else:
                disk = fam.disk_name(full)
                if disk not in self.reader:
                    raise KeyError(f"{self.dir}: checkpoint has no tensor {disk!r} (for module state {full!r})")
                out[name] = self.reader.get(disk).to(t.dtype)
        return out


def _config_dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.bfloat16


@torch.no_grad()
def record_layer_inputs(lazy: LazyModel, input_ids: torch.Tensor, device: torch.device | str = "cpu"
                        ) -> LayerInputs:
    """Arguments the model passes to every decoder layer for ``input_ids`` ``[B, S]`` (embeddings included).

    Runs the model's own forward with each decoder layer replaced by a recorder, so masks, position ids and
    rotary tables are exactly the model's. Returned tensors live on ``device``.
    """
    model = lazy.model
    sink: list[dict] = []
    recorders = nn.ModuleList(_Recorder(layer, sink) for layer in lazy._meta_layers)
    base = model.get_submodule(lazy.layer_prefix(0).rsplit(".", 2)[0]) if "." in lazy.layer_prefix(0) else model
    original = base.layers
    base.layers = recorders
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["h"] = kwargs.get("hidden_states", args[0] if args else None)

    hook = recorders[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        base.to(device)
        base(input_ids=input_ids.to(device), use_cache=False)
    finally:
        hook.remove()
        base.layers = original
    kwargs = [{k: v for k, v in kw.items() if k not in ("past_key_values",)} for kw in sink]
    return LayerInputs(captured["h"], kwargs)
