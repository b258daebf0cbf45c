"""Lazy, layer-at-a-time model loading from a safetensors checkpoint.

(Over 400 lines: the lazy model, its load plan and the layer-input recorder are one unit; the plan and the loader
must agree tensor for tensor, and the recorder drives the same meta model.)

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

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..io.safetensors import WEIGHT_DTYPES, CheckpointIndex, CheckpointReader, layer_of
from .base import MoEFamily, text_config
from .families import detect_family

logger = logging.getLogger(__name__)

__all__ = ["LazyModel", "LayerInputs", "DiskTensor", "PlannedTensor", "config_dtype", "fused_expert_disk_name",
           "layer_plan", "record_layer_inputs"]


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
        dtype: dtype of the layers (default: the checkpoint's ``config.dtype``, else bfloat16; bfloat16 for an FP8 /
            MXFP4 source).
        index: the directory's :func:`check_checkpoint` result, when the caller has it already (else made here).
        decode_device: where an FP8 / MXFP4 source's tensors are decoded (the compute device when it is a GPU;
            None: on the CPU); a layer's decoded tensors stay on the device :meth:`load_layer` puts them on.
    """

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                 experts_implementation: str | None = None, index: CheckpointIndex | None = None,
                 reader: Any = None, decode_device: torch.device | str | None = None):
        import transformers

        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.dir}: no config.json; pass a Hugging Face model directory")
        self.config = transformers.AutoConfig.from_pretrained(self.dir)
        self.family: MoEFamily = detect_family(self.config)
        self._released = False  # release_non_layer_parts() was called
        self.dtype = dtype or config_dtype(self.config)
        # ``reader``: where tensors come from (default the directory's safetensors files, validated by their
        # headers, an FP8 / MXFP4 source in its bf16 view; names(), in, get()), e.g.
        # moequant.io.exported.ExportedCheckpoint, the source view of a quantized checkpoint: a reader without an
        # ``index`` of headers gets no header checks (load_state_dict still checks every shape).
        self.reader = reader if reader is not None else CheckpointReader(self.dir, index, decode_device)
        # the source format a CheckpointReader decodes (moequant.io.source.SourceFormat), else None
        self.source = getattr(getattr(self.reader, "index", None), "source", None)
        if (reader is not None or self.source is not None) and hasattr(self.config, "quantization_config"):
            del self.config.quantization_config  # the reader dequantizes: build the plain (bf16) model
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
                _check_disk_tensor(getattr(self.reader, "index", None), DiskTensor(disk, tuple(t.shape)), t.dtype,
                                   f"model state {name!r}")
                state[name] = self.reader.get(disk).to(t.dtype)
        missing = [n for n in self.model.state_dict() if not n.startswith(layers_name + ".") and n not in state]
        tied = getattr(self.config, "tie_word_embeddings", False) or getattr(
            text_config(self.config), "tie_word_embeddings", False)
        if tied:
            missing = [n for n in missing if not n.endswith("lm_head.weight")]
        if missing:
            raise ValueError(f"{self.dir}: the checkpoint has no tensor for {missing[:5]} (checkpoint names "
                             f"{[self.family.disk_name(n) for n in missing[:5]]}); it does not match its config.json: "
                             f"re-download it or re-save the model")
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

    def release_non_layer_parts(self) -> int:
        """Frees the embeddings, final norm and lm_head (their tensors become ``meta``; the decoder layers are
        loaded as before): once the calibration inputs are recorded the pipeline needs none of them, and they are
        GBs for a large vocabulary (DeepSeek-V3's lm_head 1.85 GB in host memory, its embeddings as much on the
        GPU). :func:`record_layer_inputs` cannot run afterwards. Returns the bytes freed."""
        layers_name = self.family.layer_prefix(self.model, 0).rsplit(".", 1)[0]
        freed, seen = 0, set()
        for name, module in self.model.named_modules():
            if name == layers_name or name.startswith(layers_name + "."):
                continue
            for kind in ("_parameters", "_buffers"):
                table = getattr(module, kind)
                for key, t in list(table.items()):
                    if t is None or t.is_meta:
                        continue
                    if t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        freed += t.numel() * t.element_size()
                    meta = torch.empty_like(t, device="meta")
                    table[key] = nn.Parameter(meta, requires_grad=False) if kind == "_parameters" else meta
        self._released = True
        return freed

    # ------------------------------------------------------------------------------------------ layers
    def load_layer(self, index: int, device: torch.device | str = "cpu",
                   experts_device: torch.device | str | None = None, pin_memory: bool = False) -> nn.Module:
        """Decoder layer ``index`` with its checkpoint weights, on ``device`` (a fresh module each call); its fused
        routed experts on ``experts_device`` when given (the expert streaming engine keeps them in host memory and
        brings a group at a time to the device). Every tensor is read straight into its place on its device
        (:meth:`_layer_state`); ``pin_memory``: tensors that stay in host memory are page-locked (they are copied
        to a GPU later: a prefetched layer, streamed experts)."""
        layer = copy.deepcopy(self._meta_layers[index])
        prefix = self.layer_prefix(index)
        state = self._layer_state(layer, prefix, device, experts_device, pin_memory)
        layer.load_state_dict(state, strict=True, assign=True)
        still_meta = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
        if still_meta:
            raise ValueError(f"moequant: layer {index} has tensors not stored in the checkpoint "
                                      f"{still_meta[:5]}; this family is not supported by the lazy loader")
        return self.place_layer(layer, device, experts_device)

    def place_layer(self, layer: nn.Module, device: torch.device | str,
                    experts_device: torch.device | str | None = None) -> nn.Module:
        """Moves a loaded layer to ``device``, its fused routed experts to ``experts_device`` when given."""
        experts = self.family.experts_of(layer)
        if experts is None or experts_device is None or torch.device(experts_device) == torch.device(device):
            return layer.to(device).eval()
        parent_path, _, leaf = self.family.experts.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        parent._modules[leaf] = nn.Identity()  # moved without the experts, which go to experts_device
        try:
            layer.to(device)
        finally:
            parent._modules[leaf] = experts.to(experts_device)
        return layer.eval()

    def layer_plan(self, index: int) -> list["PlannedTensor"]:
        """Which checkpoint tensors (names and shapes) layer ``index`` is read from (:func:`layer_plan`)."""
        return layer_plan(self.family, self._meta_layers[index], self.layer_prefix(index))

    def check_layer_tensors(self) -> int:
        """Checks, from the headers alone, that every tensor :meth:`load_layer` will read for every layer exists
        with the shape (and a floating dtype where the model has one) that the config implies; raises ValueError
        naming the first bad tensor, its layer, the expected and the actual shape. Returns the number checked."""
        n = 0
        for i in range(self.num_layers):
            for entry in self.layer_plan(i):
                for group in entry.groups:
                    for d in group:
                        _check_disk_tensor(getattr(self.reader, "index", None), d, entry.dtype,
                                           f"layer {i} state {entry.state!r}")
                        n += 1
        return n

    def _layer_state(self, layer: nn.Module, prefix: str, device, experts_device,
                     pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """The layer's state dict read by its :func:`layer_plan`. Each entry is allocated once, in its runtime
        dtype, on the device :meth:`place_layer` puts it on (the routed experts on ``experts_device`` when given;
        host buffers page-locked with ``pin_memory``), and every checkpoint tensor is read into its slice of it
        (:meth:`~moequant.io.safetensors.CheckpointReader.read_into`: per-expert tensors straight into their rows
        of the fused parameter, no ``torch.cat`` / ``torch.stack`` copies; a tensor already in the runtime dtype
        goes from the file into the buffer directly). Host memory above the layer itself: one checkpoint tensor
        (when it is converted or decoded), none otherwise."""
        experts = self.family.experts + "."
        index = getattr(self.reader, "index", None)
        out: dict[str, torch.Tensor] = {}
        for entry in layer_plan(self.family, layer, prefix):
            to = torch.device(experts_device if experts_device is not None and entry.state.startswith(experts)
                              else device)
            buf = torch.empty(entry.shape, dtype=entry.dtype, device=to,
                              pin_memory=pin_memory and to.type == "cpu")
            for e, group in enumerate(entry.groups):
                dst, row = (buf[e] if entry.stacked else buf), 0
                for d in group:
                    _check_disk_tensor(index, d, entry.dtype, f"{prefix} state {entry.state!r}")
                    part = dst if len(group) == 1 else dst[row:row + d.shape[0]]
                    if tuple(part.shape) != tuple(d.shape):  # the plan's own consistency (headers checked above)
                        raise ValueError(f"{d.name}: planned shape {list(d.shape)} does not fill "
                                         f"{prefix}.{entry.state} {list(entry.shape)}")
                    self._read_into(d.name, part)
                    row += d.shape[0]
            out[entry.state] = buf
        return out

    def _read_into(self, name: str, dst: torch.Tensor) -> None:
        """Reads checkpoint tensor ``name`` into ``dst`` (a reader without ``read_into``: read, then copied)."""
        read_into = getattr(self.reader, "read_into", None)
        if read_into is not None:
            read_into(name, dst)
        else:
            dst.copy_(self.reader.get(name))


# ---------------------------------------------------------------------------------------------- load plan
class DiskTensor(NamedTuple):
    """A checkpoint tensor and the shape the model's config implies for it."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """One entry of a decoder layer's state dict and the checkpoint tensors it is read from.

    ``groups``: one tuple of :class:`DiskTensor` per stacked slice (per expert), concatenated along dim 0 inside a
    group (gate then up); ``stacked``: the groups are stacked into a new leading (expert) dim, else there is one
    group of one tensor, read as it is."""

    state: str                  # layer-relative state-dict name ("mlp.experts.gate_up_proj")
    shape: tuple[int, ...]      # its runtime shape
    dtype: torch.dtype          # its runtime dtype
    groups: tuple[tuple[DiskTensor, ...], ...]
    stacked: bool = False


def fused_expert_disk_name(family: MoEFamily, layer_prefix: str, state: str) -> str:
    """Checkpoint name of a fused expert tensor (``experts.gate_up_proj`` / ``down_proj`` and their biases) of a
    family whose checkpoint stores the experts fused (``family.disk_fused``).

    This is the one place where a family's own on-disk names for fused experts belong (GraniteMoE:
    ``block_sparse_moe.input_linear.weight`` / ``output_linear.weight``); today the runtime name goes through
    :meth:`MoEFamily.disk_name`, like every other non-expert tensor."""
    return family.disk_name(f"{layer_prefix}.{state}")


def layer_plan(family: MoEFamily, layer: nn.Module, prefix: str) -> list[PlannedTensor]:
    """The load plan of one decoder layer (``layer`` may live on the meta device): for every entry of its state
    dict, the checkpoint tensors it is read from and their expected shapes. Per-expert checkpoint tensors
    (``...experts.{e}.gate_proj.weight [I, H]``, ``up_proj`` ``[I, H]``, ``down_proj`` ``[H, I]``) are stacked
    into the fused runtime parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``); other names map
    through :meth:`MoEFamily.disk_name` (fused expert tensors through :func:`fused_expert_disk_name`).
    :meth:`LazyModel.load_layer` reads by this plan and :meth:`LazyModel.check_layer_tensors` checks it against the
    checkpoint's headers, so both always agree."""
    fam = family
    experts = fam.experts_of(layer)
    out: list[PlannedTensor] = []
    for name, t in layer.state_dict().items():
        full = f"{prefix}.{name}"
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(t.shape)
        in_experts = experts is not None and name.startswith(fam.experts + ".")
        if in_experts and not fam.disk_fused and leaf in ("gate_up_proj", "down_proj"):
            if fam.layout != "standard":
                raise ValueError(f"{fam.name}: per-expert checkpoints of a transposed layout are not supported")
            n_exp = shape[0]
            groups = []
            for e in range(n_exp):
                names = fam.disk_expert_names(prefix, e)
                if leaf == "gate_up_proj":  # [E, 2I, H]: gate rows first, then up
                    half = (shape[1] // 2, shape[2])
                    groups.append((DiskTensor(names["gate"] + ".weight", half),
                                   DiskTensor(names["up"] + ".weight", half)))
                else:  # [E, H, I]
                    groups.append((DiskTensor(names["down"] + ".weight", shape[1:]),))
            out.append(PlannedTensor(name, shape, t.dtype, tuple(groups), stacked=True))
        else:
            disk = fused_expert_disk_name(fam, prefix, name) if in_experts else fam.disk_name(full)
            out.append(PlannedTensor(name, shape, t.dtype, ((DiskTensor(disk, shape),),)))
    return out


def _check_disk_tensor(index: CheckpointIndex | None, d: DiskTensor, runtime_dtype: torch.dtype, what: str) -> None:
    """Raises ValueError unless checkpoint tensor ``d`` exists with the expected shape (and a floating dtype where
    the runtime tensor is floating). No ``index`` (a reader without headers): nothing to check here."""
    if index is None:
        return
    h = index.view.get(d.name)  # the runtime view: an FP8 / MXFP4 source's tensors as decoded (bf16, their shapes)
    if h is None:
        raise ValueError(f"{index.dir}: the checkpoint has no tensor {d.name!r} (needed for {what}, expected shape "
                         f"{list(d.shape)}); the weights do not match config.json: re-download the model or re-save it")
    if h.shape != d.shape:
        how = f" ({h.describe()})" if h.codec else ""
        raise ValueError(f"{d.name} ({layer_of(d.name)}, {h.file.name}): shape {list(h.shape)}{how}, but config.json "
                         f"implies {list(d.shape)}; the weights do not belong to this config: use the config.json "
                         f"saved with these weights, or re-save the model")
    if runtime_dtype.is_floating_point and h.dtype not in WEIGHT_DTYPES:
        from ..io.source import SUPPORTED

        raise ValueError(f"{d.name} ({layer_of(d.name)}, {h.file.name}): dtype {h.dtype}, expected one of "
                         f"{', '.join(WEIGHT_DTYPES)}; moequant reads BF16/F16/F32 checkpoints and {SUPPORTED} "
                         f"declared by config.json's quantization_config: start from the BF16 weights, or from the "
                         f"release with its original quantization_config")


def config_dtype(config) -> torch.dtype:
    """The checkpoint dtype a transformers config declares (``dtype`` / ``torch_dtype``), else bfloat16; bfloat16
    for an FP8 / MXFP4 source (:mod:`moequant.io.source`: decoded to bf16, whatever its config says)."""
    from ..io.source import source_format

    q = getattr(config, "quantization_config", None) or getattr(text_config(config), "quantization_config", None)
    if source_format(q if isinstance(q, dict) else getattr(q, "to_dict", lambda: None)()) is not None:
        return torch.bfloat16
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
    if getattr(lazy, "_released", False):
        raise RuntimeError("record_layer_inputs: the model's embeddings were released (release_non_layer_parts)")
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
