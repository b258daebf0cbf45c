"""``moequant inspect MODEL``: the structure of a model and what the default recipe quantizes (no weights read
but the safetensors headers)."""
from __future__ import annotations

import argparse
import re
from collections import Counter

from . import common

__all__ = ["add_parser", "run", "model_summary"]

_EXPERT_PROJS = 3  # gate, up, down


def add_parser(sub, parent) -> None:
    """Adds the ``inspect`` subcommand (``parent``: the shared -v/-q parser)."""
    i = sub.add_parser("inspect", parents=[parent], help="describe a model and what the default recipe quantizes")
    i.add_argument("model", metavar="MODEL", help="local model directory")
    i.set_defaults(func=run)


def _group_name(name: str) -> str:
    return re.sub(r"\.(layers|experts)\.\d+(?=\.|$)", r".\1.*", name)


def model_summary(model_path: str, recipe=None) -> dict:
    """Structure of a model directory (built on the meta device, no weights read) and what ``recipe`` (default:
    ``Recipe()``) quantizes, resolving modules by checkpoint name like the pipeline.

    Returns a dict with ``family``, ``model_type``, ``layers``, ``moe_layers``, ``dense_layers``,
    ``experts_per_layer`` (sorted distinct counts), ``top_k``, ``hidden_size``, ``intermediate_size`` (dense MLP,
    from the config), ``moe_intermediate_size`` (sorted distinct expert widths), ``shared_expert``, ``parameters``,
    ``expert_parameters``, ``tied_embeddings``, ``recipe`` (label of the base scheme), ``quantized_linears``,
    ``quantized_experts``, ``quantized_expert_matrices`` and ``high_precision`` ({grouped name: count}).
    """
    import torch
    import transformers
    from torch import nn

    from moequant.models import get_path, intermediate_size, linear_modules, num_experts, text_config
    from moequant.recipe import Recipe

    config, family = common.load_config(common.model_dir(model_path))
    text_cfg = text_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    recipe = Recipe() if recipe is None else recipe
    experts, widths, top_k, quant, high = [], [], set(), [], Counter()
    moe_layers = shared = n_exp = 0
    expert_params = 0
    in_layers: set[str] = set()
    for _, prefix, layer in family.iter_layers(model):
        in_layers.add(prefix)
        for p in family.high_precision:  # router, shared_expert_gate, family extras
            if get_path(layer, p) is not None:
                high[_group_name(family.disk_name(f"{prefix}.{p}"))] += 1
        for name in linear_modules(layer, family, prefix):  # resolved by checkpoint name, like the pipeline
            disk = family.disk_name(name)
            if recipe.resolve(disk) is None:
                high[_group_name(disk)] += 1
            else:
                quant.append(disk)
        ex = family.experts_of(layer)
        if ex is None:
            continue
        moe_layers += 1
        shared += family.shared_expert_of(layer) is not None
        experts.append(num_experts(ex))
        widths.append(intermediate_size(ex, family))
        expert_params += sum(p.numel() for p in ex.parameters())
        router = family.router_of(layer)
        if getattr(router, "top_k", None) is not None:
            top_k.add(int(router.top_k))
        for e in range(num_experts(ex)):
            for name in family.disk_expert_names(prefix, e).values():
                if recipe.resolve(name) is None:
                    high[_group_name(name)] += 1
                else:
                    quant.append(name)
                    n_exp += 1
    for name, mod in model.named_modules():  # outside the decoder layers: embeddings, lm_head (never quantized)
        if isinstance(mod, (nn.Linear, nn.Embedding)) and not any(name.startswith(p + ".") for p in in_layers):
            high[name] += 1
    if not top_k:
        for key in ("num_experts_per_tok", "moe_topk", "top_k"):
            if isinstance(getattr(text_cfg, key, None), int):
                top_k.add(getattr(text_cfg, key))
                break
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    return {
        "family": family.name, "model_type": getattr(text_cfg, "model_type", None),
        "layers": len(family.layers(model)), "moe_layers": moe_layers,
        "dense_layers": len(family.layers(model)) - moe_layers, "experts_per_layer": sorted(set(experts)),
        "top_k": sorted(top_k), "hidden_size": getattr(text_cfg, "hidden_size", None),
        "intermediate_size": getattr(text_cfg, "intermediate_size", None),
        "moe_intermediate_size": sorted(set(widths)), "shared_expert": shared,
        "parameters": sum(p.numel() for p in model.parameters()), "expert_parameters": expert_params,
        "tied_embeddings": out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight,
        "recipe": recipe.scheme.describe(), "quantized_linears": len(quant) - n_exp,
        "quantized_experts": n_exp // _EXPERT_PROJS, "quantized_expert_matrices": n_exp,
        "high_precision": dict(high),
    }


def _fmt(values: list) -> str:
    return ", ".join(str(v) for v in values) if values else "-"


def run(args: argparse.Namespace) -> int:
    """``moequant inspect``: the model's structure, what the default recipe quantizes, the weights' headers."""
    from moequant.io.safetensors import check_checkpoint, has_checkpoint

    s = model_summary(args.model)
    weights, index = "none (config.json only)", None
    if has_checkpoint(args.model):  # headers and file sizes only: truncated or corrupt files are an error
        index = check_checkpoint(args.model)
        weights = f"{len(index.files)} safetensors file(s), {len(index.tensors)} tensors, " \
                  f"{index.total_bytes / 1e9:.2f} GB (headers checked)"
    total = s["parameters"]
    if index is not None and index.source is not None:  # an FP8 / MXFP4 source, read in its bf16 view
        decoded = sum(1 for v in index.view.values() if v.codec)
        weights += f"\nsource format: {index.source.describe()}; {decoded} tensors decoded to bf16 on load " \
                   f"({len(index.view)} tensors, {index.view_bytes / 1e9:.2f} GB as read)"
    lines = [
        f"model: {args.model}",
        f"family: {s['family']} (model_type {s['model_type']})",
        f"layers: {s['layers']} (MoE {s['moe_layers']}, dense {s['dense_layers']})",
        f"experts per layer: {_fmt(s['experts_per_layer'])}",
        f"top-k: {_fmt(s['top_k'])}",
        f"shared expert: {'yes' if s['shared_expert'] else 'no'}",
        f"hidden size: {s['hidden_size']}",
        f"intermediate size (dense MLP): {s['intermediate_size']}",
        f"moe intermediate size: {_fmt(s['moe_intermediate_size'])}",
        f"parameters: {total:,} ({total / 1e6:.1f}M; routed experts {s['expert_parameters']:,}, "
        f"{100 * s['expert_parameters'] / max(total, 1):.1f}%)" + ("; tied embeddings" if s["tied_embeddings"] else ""),
        f"default recipe: {s['recipe']}",
        f"quantized: {s['quantized_linears']} Linears + {s['quantized_experts']} experts x {_EXPERT_PROJS} projections "
        f"({s['quantized_linears'] + s['quantized_expert_matrices']} weight matrices)",
        "high precision: " + (", ".join(f"{k} (x{v})" if v > 1 else k for k, v in s["high_precision"].items())
                              or "-"),
        f"weights: {weights}",
    ]
    print("\n".join(lines))
    return 0

